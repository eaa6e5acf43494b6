"""The one place that picks the reader of an init checkpoint.

`RESNET_CHECKPOINT` (`Experiment.init_checkpoint`) may be any of:

| kind | what | reader |
| --- | --- | --- |
| `keras_weights` | a Keras `*.weights.h5` file (`checkpoints.save_backbone_weights`, `model.save_weights`) | `checkpoints.restore_keras_weights` |
| `tf2` | a ShapeMask training checkpoint of ours (`tf.train.Checkpoint`, prefix or model directory) | `checkpoints.restore_partial` |
| `tf1` | a TF1 name-based checkpoint of the seed's code: its ImageNet ResNet files (with `RESNET_CHECKPOINT_PREFIX`, e.g. `resnet101/`), whole-model checkpoints, TF1 SavedModel directories | `checkpoints.restore_tf1_checkpoint` |
| `keras_hub` | a keras-hub ResNet preset: `keras_hub:NAME` (e.g. `keras_hub:resnet_101_imagenet`) or a local preset folder | `keras_hub_weights.restore_keras_hub_backbone` |

`checkpoint_kind` tells them apart (a `.weights.h5` name; a `keras_hub:`
name or a folder holding a keras-hub `config.json`; otherwise whether the
checkpoint carries TensorFlow's object graph), `validate` checks a file
before any accelerator starts, and `restore` reads it into a built model.
Another kind of file is one more branch in `checkpoint_kind` and `restore`.
"""

import tensorflow as tf

from official_shapemask.weights import checkpoints
from official_shapemask.weights import keras_hub_weights
from official_shapemask.weights import paths
from official_shapemask.weights import restore_report
from official_shapemask.weights import tf1_checkpoints

KERAS_WEIGHTS = "keras_weights"
TF2 = "tf2"
TF1 = "tf1"
KERAS_HUB = "keras_hub"


def _kind_and_names(path, timeout_s):
  """`(kind, name -> shape or None)`; reads the file's index once."""
  if keras_hub_weights.is_keras_hub_preset(path):
    return KERAS_HUB, None
  if paths.is_keras_weights_file(path):
    exists = tf1_checkpoints.call_with_timeout(
        lambda: tf.io.gfile.exists(path), timeout_s, path)
    if not exists:
      raise FileNotFoundError(f"Keras weights file not found: {path}")
    return KERAS_WEIGHTS, None
  _, _, shapes = tf1_checkpoints.open_checkpoint(path, timeout_s)
  return (TF1 if tf1_checkpoints.is_name_based(shapes) else TF2), shapes


def checkpoint_kind(path, timeout_s=tf1_checkpoints.OPEN_TIMEOUT_S):
  """`keras_weights`, `tf2`, `tf1` or `keras_hub` for the file at `path`.

  Raises:
    FileNotFoundError: nothing at `path`.
    OSError: `path` cannot be read (within `timeout_s` for remote paths).
  """
  return _kind_and_names(path, timeout_s)[0]


def validate(path, prefix=None, modules="backbone", depth=None,
             timeout_s=tf1_checkpoints.OPEN_TIMEOUT_S):
  """Checks an init checkpoint from its names, before the model exists.

  Reads only the file's index. For a TF1 file whose backbone is wanted,
  checks that the prefix finds a ResNet of `depth` (see
  `tf1_checkpoints.check_backbone`); for a keras-hub preset, reads its
  config only (`keras_hub_weights.check_keras_hub_preset`).

  Args:
    path: the init checkpoint.
    prefix: `RESNET_CHECKPOINT_PREFIX` (TF1 files only).
    modules: `all`, `backbone` or `backbone_fpn`.
    depth: the model's ResNet depth (None: not checked).
    timeout_s: limit for opening the file.

  Returns:
    the kind of the file (`checkpoint_kind`).

  Raises:
    FileNotFoundError, OSError: the file is missing or unreadable.
    ValueError: naming the file, when it cannot initialise the model.
    ImportError: a keras-hub preset without keras-hub installed.
    RuntimeError: keras-hub cannot fetch or read the preset's config.
  """
  if modules not in restore_report.MODULES:
    raise ValueError(f"init_checkpoint_modules={modules!r} is not one of "
                     f"{sorted(restore_report.MODULES)}")
  kind, shapes = _kind_and_names(path, timeout_s)
  if kind == KERAS_HUB:
    if modules != "backbone":
      raise ValueError(f"init_checkpoint_modules={modules!r}: the keras-hub "
                       f"preset {path} holds a ResNet only; use 'backbone'")
    keras_hub_weights.check_keras_hub_preset(path, depth=depth)
    return kind
  wanted = restore_report.MODULES[modules]
  if kind == TF1 and depth is not None and (wanted is None or
                                            "backbone" in wanted):
    tf1_checkpoints.check_backbone(path, shapes, prefix, depth)
  return kind


def restore(model, path, modules="backbone", prefix=None, print_fn=print):
  """Initialises `model` from `path` with the reader of its kind.

  Args:
    model: a built `ShapeMaskModel`.
    path: the init checkpoint (see the module docstring).
    modules: `all`, `backbone` or `backbone_fpn`.
    prefix: `RESNET_CHECKPOINT_PREFIX`; used by TF1 files, ignored (and
      said so) for the others.
    print_fn: where the restored/skipped table goes (None = silent).

  Returns:
    a `restore_report.RestoreReport`.
  """
  kind = checkpoint_kind(path)
  if prefix and kind != TF1 and print_fn is not None:
    print_fn(f"RESNET_CHECKPOINT_PREFIX={prefix!r} is not used: {path} is "
             f"not a TF1 name-based checkpoint ({kind})")
  if kind == KERAS_WEIGHTS:
    return checkpoints.restore_keras_weights(model, path, modules, print_fn)
  if kind == KERAS_HUB:
    return keras_hub_weights.restore_keras_hub_backbone(
        model, path, modules=modules, print_fn=print_fn)
  if kind == TF2:
    return checkpoints.restore_partial(model, path, modules, print_fn)
  return checkpoints.restore_tf1_checkpoint(model, path, prefix=prefix,
                                            modules=modules,
                                            print_fn=print_fn)
