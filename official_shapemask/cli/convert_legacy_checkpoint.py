r"""Converts a checkpoint of tf-models-official's legacy ShapeMask to ours.

The Model Garden port (`official/legacy/detection`, `--model=shapemask`)
writes `params.yaml` and `ckpt-N` into its model directory. This tool builds
the port's model from those params, restores the checkpoint, builds our
`ShapeMaskModel` with the same settings, copies every variable (printing
the mapping: port variable -> our variable, shape) and writes our weights:

- `--output=FILE.weights.h5` (recommended): a Keras weights file with every
  variable, which loads on every backend (`model.load_weights`), JAX
  included;
- `--output=DIR/ckpt` (no `.weights.h5` suffix): a
  `tf.train.Checkpoint(model=...)` prefix, written only when TensorFlow's
  object graph reaches every variable of the model (see
  `checkpoints.save_model_weights`).

The shape priors come from the port's `shapemask_head.shape_prior_path`
(override with `--shape_prior_path` when that path is not reachable); they
are saved with the weights. `--verify` then runs random images through both
models and prints the relative difference of backbone, FPN, RetinaNet and
mask-branch outputs (see `legacy_converter.parity_report`).

Example:
  python tools/convert_legacy_checkpoint.py --legacy_model_dir=/tmp/port_run \
      --output=/tmp/ours/shapemask.weights.h5 --verify
"""

import json
import os
import sys

from absl import flags

from official_shapemask import quiet_logs
from official_shapemask.cli import entry

FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string("legacy_model_dir", None,
                      "Model directory of the port's run (params.yaml and "
                      "checkpoints).")
  flags.DEFINE_string("legacy_params", None,
                      "The port's params.yaml (default: "
                      "legacy_model_dir/params.yaml).")
  flags.DEFINE_string("legacy_checkpoint", None,
                      "Checkpoint prefix (default: the latest in "
                      "legacy_model_dir).")
  flags.DEFINE_string("shape_prior_path", None,
                      "Overrides the port's shapemask_head.shape_prior_path.")
  flags.DEFINE_string("output", None,
                      "Checkpoint prefix of ours, or a *.weights.h5 file.")
  flags.DEFINE_boolean("verify", False,
                       "Compare the two models' outputs on random images.")
  flags.DEFINE_integer("verify_batch_size", 1, "Images for --verify.")
  flags.DEFINE_string("verify_json", None,
                      "Also write the --verify numbers to this JSON file.")
  flags.DEFINE_boolean("print_mapping", True,
                       "Print every converted variable.")


def convert(legacy_model_dir=None,
            legacy_params=None,
            legacy_checkpoint=None,
            shape_prior_path=None,
            output=None,
            verify_batch_size=0,
            print_fn=print,
            print_mapping=True):
  """Converts a port checkpoint; returns `(model, report, parity or None)`.

  Args:
    legacy_model_dir: port model directory (params.yaml, checkpoints).
    legacy_params: path of params.yaml (default: in legacy_model_dir).
    legacy_checkpoint: checkpoint prefix (default: latest in the directory).
    shape_prior_path: overrides the params' prior file.
    output: where our weights go (None: not saved).
    verify_batch_size: > 0 runs `parity_report` on that many random images.
    print_fn: progress output (None: silent).
    print_mapping: also print every converted variable.
  """
  import numpy as np
  from official_shapemask.modeling import factory
  from official_shapemask.weights import checkpoints
  from official_shapemask.weights import legacy_converter
  from official_shapemask.weights import legacy_shapemask

  say = print_fn or (lambda *a, **k: None)
  if output:  # Before the slow part: never into a training run's directory.
    checkpoints.check_output(output)
  params_path = legacy_params or legacy_model_dir
  if not params_path:
    raise ValueError("give --legacy_model_dir or --legacy_params")
  checkpoint = legacy_checkpoint or legacy_model_dir
  if not checkpoint:
    raise ValueError("give --legacy_model_dir or --legacy_checkpoint")
  params = legacy_shapemask.read_params(params_path)
  override = {"architecture": {"use_bfloat16": False}}
  if shape_prior_path is not None:
    override["shapemask_head"] = {"shape_prior_path": shape_prior_path}
  params.override(override, is_strict=True)
  prior_file = params.shapemask_head.shape_prior_path
  if prior_file and not os.path.exists(prior_file) and "://" not in prior_file:
    raise FileNotFoundError(
        f"shape_prior_path {prior_file!r} of the port's params does not "
        "exist; pass --shape_prior_path")

  legacy_model, _ = legacy_shapemask.build_legacy_model(params, "predict")
  used = legacy_converter.restore_legacy_checkpoint(legacy_model, checkpoint)
  say(f"Restored the port's checkpoint {used}")
  priors = legacy_shapemask.load_legacy_priors(params)
  kwargs = legacy_shapemask.model_kwargs_from_params(params)
  model = factory.build_shapemask_model(num_clusters=priors.shape[1],
                                        **kwargs)
  report = legacy_converter.convert_weights(legacy_model, model, priors)
  if print_mapping:
    say(report.table())
  if output:
    written = checkpoints.save_model_weights(model, output)
    say("Wrote " + ", ".join(written))
  parity = None
  if verify_batch_size > 0:
    rng = np.random.default_rng(0)
    size = kwargs["image_size"]
    images = rng.normal(0.0, 1.0, (verify_batch_size, size, size, 3))
    parity = legacy_converter.parity_report(legacy_model, model,
                                            images.astype(np.float32))
    say("Relative difference ours vs port (||a-b|| / ||b||):")
    for key, value in parity.items():
      say(f"  {key:<42} {value:.3g}")
  return model, report, parity


def main(argv):
  del argv
  try:
    _, _, parity = convert(
        legacy_model_dir=FLAGS.legacy_model_dir,
        legacy_params=FLAGS.legacy_params,
        legacy_checkpoint=FLAGS.legacy_checkpoint,
        shape_prior_path=FLAGS.shape_prior_path,
        output=FLAGS.output,
        verify_batch_size=FLAGS.verify_batch_size if FLAGS.verify else 0,
        print_mapping=FLAGS.print_mapping)
  except (OSError, ValueError) as e:  # FileNotFoundError is an OSError.
    print(f"error: {e}", file=sys.stderr)
    return 1
  if parity is not None and FLAGS.verify_json:
    tmp = FLAGS.verify_json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(parity, f, indent=1, sort_keys=True)
    os.replace(tmp, FLAGS.verify_json)


def console_entry():
  """Entry point of the console script and of the tools/ launcher."""
  quiet_logs.install()  # Before TensorFlow is imported.
  _define_flags()
  entry.run(main, __name__)


if __name__ == "__main__":
  console_entry()
