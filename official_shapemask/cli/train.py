"""Train and evaluate ShapeMask.

  python train.py --gin_file=shapemask_r101.gin \
      --gin_bindings="TRAIN_FILE_PATTERN='gs://bucket/coco/train-*'" \
      --model_dir=gs://bucket/shapemask --mode=train --strategy=tpu --tpu=NAME

The Keras backend chooses the engine: TensorFlow (default) runs the
tf.distribute loop; `KERAS_BACKEND=jax python train.py ...` runs the JAX
engine (keras.distribution over every device; same gin files and outputs).

SIGTERM (a preemption) or SIGINT (Ctrl-C) while training: the current step
finishes, is saved, one line says so, and the exit status is 128 + the
signal number (143, 130); the same command resumes from that step.

Short gin names are looked up among the package's gin files (gin/ in a
checkout); paths work too. See README.md for the seed's commands and their
equivalents.
"""

import sys

from absl import app
from absl import flags

from official_shapemask import quiet_logs
from official_shapemask.cli import entry

_GIN_FILES = flags.DEFINE_multi_string(
    "gin_file", [], "gin config file; repeatable, later files override "
    "earlier ones. A short name such as shapemask_r101.gin is found among the "
    "package's gin files (gin/ in a checkout).")
_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "a gin binding 'NAME=VALUE' applied after the files; "
    "repeatable, e.g. --gin_bindings=\"TRAIN_FILE_PATTERN='data/train-*'\".")
_MODEL_DIR = flags.DEFINE_string(
    "model_dir", None, "directory for checkpoints, config.gin, TensorBoard "
    "logs and eval_<step>.json results (local or gs://).")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "train_and_eval"],
    "train: train to the configured total steps (resuming from model_dir); "
    "eval: evaluate the latest checkpoint once, or each new one while "
    "--eval_timeout allows; train_and_eval: alternate training and "
    "evaluation on the gin-set interval, and evaluate once more at the end.")
_STRATEGY = flags.DEFINE_enum(
    "strategy", "one_device", ["tpu", "mirrored", "multi_worker",
                               "one_device"],
    "tf.distribute strategy of the TensorFlow loop: tpu (TPUStrategy, "
    "--tpu), mirrored (local GPUs), multi_worker (MultiWorkerMirrored, reads "
    "TF_CONFIG), one_device. With KERAS_BACKEND=jax the JAX engine runs "
    "instead, data parallel over every device (multi-host: the "
    "KERAS_DISTRIBUTION_* environment variables).")
_TPU = flags.DEFINE_string(
    "tpu", None, "TPU name or grpc:// address for --strategy=tpu "
    "(empty on a TPU VM).")
_EVAL_TIMEOUT = flags.DEFINE_integer(
    "eval_timeout", 0, "--mode=eval: seconds to keep waiting for a new "
    "checkpoint after the last evaluation; 0 evaluates the latest once.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _MODEL_DIR.value:
    raise app.UsageError("--model_dir is required")
  if not _GIN_FILES.value:
    raise app.UsageError("give at least one --gin_file")
  # pylint: disable=g-import-not-at-top
  import keras
  if keras.backend.backend() == "jax" and (
      _STRATEGY.value != "one_device" or _TPU.value):
    raise app.UsageError(
        "--strategy and --tpu choose the TensorFlow loop's tf.distribute "
        "strategy; with KERAS_BACKEND=jax the JAX engine uses every device "
        "of every process (see docs/engines.md: several hosts)")
  from official_shapemask.training import divergence
  from official_shapemask.training import gin_utils
  from official_shapemask.training import interrupt
  from official_shapemask.training import modes
  from official_shapemask.training import run_lock
  from official_shapemask.training import settings
  from official_shapemask.weights import errors
  try:
    gin_utils.parse_config(_GIN_FILES.value, _BINDINGS.value)
    modes.run(mode=_MODE.value, model_dir=_MODEL_DIR.value,
              strategy_name=_STRATEGY.value, tpu=_TPU.value,
              eval_timeout=_EVAL_TIMEOUT.value)
  except (gin_utils.ConfigError, settings.InvalidInputError,
          errors.CheckpointError, divergence.DivergenceError,
          run_lock.RunDirError) as e:
    # Configuration, input and checkpoint errors, a model_dir that cannot
    # be used (another run holds it), and a diverged run: one clear line.
    sys.exit(f"train.py: error: {e}")
  except interrupt.StopRequested as e:
    # Saved and said so (`Controller.check_stop`); the status tells a
    # scheduler that a signal ended the run (128 + its number).
    sys.exit(e.exit_status)


def console_entry():
  """Entry point of the console script and of train.py."""
  quiet_logs.install()  # Before TensorFlow is imported.
  entry.run(main, __name__)


if __name__ == "__main__":
  console_entry()
