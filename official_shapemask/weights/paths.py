"""Where a checkpoint is: the one resolver of checkpoint paths.

A user names weights in one of these ways (local paths or `gs://`):

| given | resolves to |
| --- | --- |
| a Keras weights file, `*.weights.h5` | itself |
| a SavedModel directory (`saved_model.pb`) or its `variables/` folder | its `variables/variables` prefix |
| a directory with a `checkpoint` state file (a model directory) | its newest checkpoint prefix |
| with `model_weights=True`, a model directory without one (the JAX engine's) | its newest `shapemask-<step>.weights.h5` |
| a checkpoint prefix (`.../ckpt-200`, `.../model.ckpt-45000`) | itself |

`resolve_checkpoint` raises FileNotFoundError, naming the path, when none
applies. It reads directory listings and index names only.
"""

import os

import tensorflow as tf

KERAS_WEIGHTS_SUFFIX = ".weights.h5"
MODEL_WEIGHTS_PREFIX = "shapemask-"
# The JAX engine's Orbax checkpoints: `model_dir/checkpoints/<step>/`.
ORBAX_SUBDIR = "checkpoints"


def is_keras_weights_file(path):
  return str(path).endswith(KERAS_WEIGHTS_SUFFIX)


def model_weights_path(model_dir, step):
  """`model_dir/shapemask-<step>.weights.h5`: a whole model's Keras weights.

  The JAX engine writes one at the end of training (its own checkpoints are
  Orbax folders); the export tools read it on any backend.
  """
  return os.path.join(model_dir,
                      f"{MODEL_WEIGHTS_PREFIX}{step}{KERAS_WEIGHTS_SUFFIX}")


def model_weights_steps(model_dir):
  """`[(step, path)]` of the `shapemask-<step>.weights.h5` files, by step."""
  found = []
  for path in tf.io.gfile.glob(
      os.path.join(model_dir, f"{MODEL_WEIGHTS_PREFIX}*{KERAS_WEIGHTS_SUFFIX}")):
    step = os.path.basename(path)[len(MODEL_WEIGHTS_PREFIX):-len(
        KERAS_WEIGHTS_SUFFIX)]
    if step.isdigit():
      found.append((int(step), path))
  return sorted(found)


def latest_model_weights(model_dir):
  """The `shapemask-<step>.weights.h5` of `model_dir` with the highest step."""
  found = model_weights_steps(model_dir)
  return found[-1][1] if found else None


def saved_model_variables(path):
  """`path/variables/variables` when `path` is a SavedModel directory."""
  path = str(path).rstrip("/")
  if tf.io.gfile.exists(path + "/saved_model.pb") or tf.io.gfile.exists(
      path + "/saved_model.pbtxt"):
    return path + "/variables/variables"
  if path.endswith("/variables") and tf.io.gfile.exists(
      path + "/variables.index"):
    return path + "/variables"
  return None


def resolve_checkpoint(path, model_weights=False):
  """The file or checkpoint prefix that `path` names (see the table above).

  Args:
    path: what the user gave.
    model_weights: let a model directory without TensorFlow checkpoints
      resolve to its newest `shapemask-<step>.weights.h5`.

  Returns:
    a `*.weights.h5` path or a checkpoint prefix.

  Raises:
    FileNotFoundError: naming `path`, when it names none of them.
  """
  path = str(path)
  if is_keras_weights_file(path):
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f"Keras weights file not found: {path}")
    return path
  saved = saved_model_variables(path)
  if saved is not None:
    if not tf.io.gfile.exists(saved + ".index"):
      raise FileNotFoundError(f"SavedModel {path} has no variables "
                              f"({saved}.index missing)")
    return saved
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None and model_weights:
      latest = latest_model_weights(path)
    if latest is None:
      raise FileNotFoundError(f"no checkpoint found in directory {path}")
    return latest
  if not tf.io.gfile.exists(path + ".index"):
    raise FileNotFoundError(f"checkpoint not found: {path} (no "
                            f"{path}.index)")
  return path
