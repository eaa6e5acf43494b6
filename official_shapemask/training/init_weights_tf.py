"""Fine-tuning initialisation for the JAX engine, done by TensorFlow.

The JAX engine starts a fine-tuning run from the same sources as the
TensorFlow loop (a ShapeMask training checkpoint, a Keras backbone weights
file; `Experiment.init_checkpoint`). Those readers follow TensorFlow's object
graph, which a JAX-backend model does not have, so the engine runs this
module in a subprocess with `KERAS_BACKEND=tensorflow` on the CPU:

  python -m official_shapemask.training.init_weights_tf CONFIG.gin \
      CHECKPOINT MODULES PREFIX OUTPUT.weights.h5

It parses the run's full gin config, builds the same model, restores it
with `init_checkpoint.restore` (any kind the TensorFlow loop takes: our
checkpoints, Keras weights files, TF1 checkpoints with PREFIX ('' for
none), keras-hub presets; it prints the restored/skipped table) and
writes the whole model's weights as a Keras weights file, which loads into
the JAX model. Variables the checkpoint does not provide keep the
initialisers' random values.
"""

import os
import sys


def main(argv):
  if len(argv) != 6:
    print("usage: python -m official_shapemask.training.init_weights_tf "
          "CONFIG.gin CHECKPOINT MODULES PREFIX OUTPUT.weights.h5",
          file=sys.stderr)
    return 2
  config, checkpoint, modules, prefix, output = argv[1:]
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # pylint: disable=g-import-not-at-top
  import keras
  if keras.backend.backend() != "tensorflow":
    print(f"init_weights_tf needs KERAS_BACKEND=tensorflow, not "
          f"{keras.backend.backend()}", file=sys.stderr)
    return 2
  from official_shapemask.modeling import factory
  from official_shapemask.training import gin_utils
  from official_shapemask.training import shape_prior_files
  from official_shapemask.weights import init_checkpoint
  try:
    gin_utils.parse_config([config], [])
    # A remote prior file: the copy the engine made before it started us.
    model = factory.build_shapemask_model(
        **shape_prior_files.model_overrides())
    init_checkpoint.restore(model, checkpoint, modules, prefix=prefix or None,
                            print_fn=print)
  except (OSError, ValueError, ImportError, RuntimeError) as e:
    # One line, the last of stderr: the engine shows it as the error.
    print(" ".join(f"init_checkpoint {checkpoint}: {e}".split()),
          file=sys.stderr)
    return 1
  model.save_weights(output)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
