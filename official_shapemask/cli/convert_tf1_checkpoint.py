r"""Converts a checkpoint or SavedModel of the seed's TF1 code to ours.

The TF1 ShapeMask code (tensorflow/tpu `models/official/detection`) writes
name-based checkpoints (`model.ckpt-N` in its model directory) and exports
TF1 SavedModels (e.g. `gs://cloud-tpu-checkpoints/shapemask/1571767330`).
This tool builds our `ShapeMaskModel` from gin (the same files and bindings
as the run that will use the weights), restores the TF1 variables into it
(`checkpoints.restore_tf1_checkpoint`: creation-order + scope mapping, every
tensor shape-checked, batch-norm moving statistics included), prints the
restored / skipped table and writes:

- `--output=DIR/ckpt` (no `.weights.h5` suffix): a `tf.train.Checkpoint`
  prefix, which `train.py` fine-tunes from (`RESNET_CHECKPOINT='DIR/ckpt'`,
  `INIT_CHECKPOINT_MODULES='all'`) and `tools/export_saved_model.py`
  exports;
- `--output=FILE.weights.h5`: a Keras weights file (`model.load_weights`,
  any backend).

The shape priors are no TF1 variable: they come from the gin config's
`SHAPE_PRIOR_PATH` and are saved with the weights. With `--modules=all`,
any other variable the file does not fill (e.g. the class predictors of a
checkpoint with another class count) stops the conversion unless
`--allow_skipped`.

Examples:
  # A trained TF1 ShapeMask (R-101, COCO) -> our checkpoint.
  python tools/convert_tf1_checkpoint.py \
      --checkpoint=/data/tf1_run/model.ckpt-45000 \
      --gin_file=shapemask_r101.gin \
      --gin_bindings="SHAPE_PRIOR_PATH='/data/kmeans_class_priors_91x20x32x32.npy'" \
      --output=/data/ours/ckpt
  # The TF1 SavedModel the reference's Colab serves (a local copy).
  python tools/convert_tf1_checkpoint.py --checkpoint=/data/1571767330 \
      --gin_file=shapemask_r101.gin --gin_bindings="SHAPE_PRIOR_PATH='...'" \
      --output=/data/ours/shapemask.weights.h5
  # The seed's ImageNet ResNet-101 -> a backbone-initialised model.
  python tools/convert_tf1_checkpoint.py \
      --checkpoint=/data/resnet101-checkpoint-2018-02-24 --prefix=resnet101/ \
      --modules=backbone --gin_file=shapemask_r101.gin \
      --gin_bindings="SHAPE_PRIOR_PATH='...'" --output=/data/r101_init/ckpt
"""

import sys

from absl import app
from absl import flags

from official_shapemask import quiet_logs
from official_shapemask.cli import entry

FLAGS = flags.FLAGS


def _define_flags():
  """Defined on run only, so importing this module defines no flags."""
  flags.DEFINE_string(
      "checkpoint", None, "TF1 checkpoint prefix, a model directory with a "
      "`checkpoint` file, or a TF1 SavedModel directory.")
  flags.DEFINE_string(
      "prefix", None, "the seed's checkpoint.prefix: graph scope removed "
      "before the lookup (resnet101/ for its ImageNet files); none for "
      "whole-model checkpoints and SavedModels.")
  flags.DEFINE_enum("modules", "all", ["all", "backbone", "backbone_fpn"],
                    "which parts of the model to take from the file.")
  flags.DEFINE_multi_string(
      "gin_file", [], "gin config of the model (repeatable; short names are "
      "found in gin/), e.g. shapemask_r101.gin.")
  flags.DEFINE_multi_string("gin_bindings", [],
                            "gin binding NAME=VALUE (repeatable).")
  flags.DEFINE_string("output", None,
                      "DIR/ckpt (a tf.train.Checkpoint prefix) or "
                      "FILE.weights.h5.")
  flags.DEFINE_bool("allow_skipped", False,
                    "with --modules=all, write the weights even when "
                    "variables other than the shape priors were skipped.")


def convert(checkpoint, output, gin_files=(), gin_bindings=(), prefix=None,
            modules="all", allow_skipped=False, print_fn=print):
  """Converts a TF1 checkpoint; returns `(model, report, files written)`.

  Args:
    checkpoint: TF1 checkpoint prefix, directory, or SavedModel directory.
    output: `DIR/ckpt` or `FILE.weights.h5`; None writes nothing.
    gin_files, gin_bindings: the model's gin configuration.
    prefix: the seed's `checkpoint.prefix` (None: full names).
    modules: `all`, `backbone` or `backbone_fpn`.
    allow_skipped: see `--allow_skipped`.
    print_fn: progress output (None: silent).

  Raises:
    FileNotFoundError, OSError, ValueError: naming the file or setting.
  """
  # pylint: disable=g-import-not-at-top
  import gin
  from official_shapemask.modeling import factory
  from official_shapemask.weights import checkpoints
  from official_shapemask.training import gin_utils
  from official_shapemask.training import shape_prior_files
  # pylint: enable=g-import-not-at-top
  say = print_fn or (lambda *a, **k: None)
  if output:  # Before the slow part: never into a training run's directory.
    checkpoints.check_output(output)
  with gin.unlock_config():
    gin.clear_config()
  gin_utils.parse_config(list(gin_files), list(gin_bindings))
  model = factory.build_shapemask_model(**shape_prior_files.model_overrides())
  report = checkpoints.restore_tf1_checkpoint(
      model, checkpoint, prefix=prefix, modules=modules, print_fn=print_fn)
  priors = model.prior_head.shape_priors
  others = [(p, r) for p, r in report.skipped
            if not p.endswith(priors.path.split("/")[-1])]
  if modules == "all" and others and not allow_skipped:
    raise ValueError(
        f"{len(others)} variable(s) of the model were not in {checkpoint} "
        f"(e.g. {others[0][0]}: {others[0][1]}); pass --allow_skipped to "
        "write them with their initial values")
  written = []
  if output:
    written = checkpoints.save_model_weights(model, output)
    say("Wrote " + ", ".join(written))
  return model, report, written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("checkpoint", "gin_file", "output"):
    if not FLAGS[name].value:
      raise app.UsageError(f"--{name} is required")
  try:
    convert(FLAGS.checkpoint, FLAGS.output, FLAGS.gin_file,
            FLAGS.gin_bindings, prefix=FLAGS.prefix, modules=FLAGS.modules,
            allow_skipped=FLAGS.allow_skipped)
  except (OSError, ValueError) as e:  # FileNotFoundError is an OSError.
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def console_entry():
  """Entry point of the console script and of the tools/ launcher."""
  quiet_logs.install()  # Before TensorFlow is imported.
  _define_flags()
  entry.run(main, __name__)


if __name__ == "__main__":
  console_entry()
