"""Which directories an export may replace, and the replacement itself.

`--overwrite` replaces an earlier SavedModel and nothing else: a directory
that holds anything a SavedModel does not (a training run's checkpoints,
`config.gin`, TensorBoard logs, any other file) is refused, naming what it
holds. A SavedModel directory is one with `saved_model.pb` (or `.pbtxt`)
whose entries are all SavedModel entries (`variables/`, `assets/`,
`assets.extra/`, `fingerprint.pb`, Keras 2's `keras_metadata.pb`); its
content is not read, so a damaged earlier export can be replaced too.

`swap_in` puts a finished export in place: the earlier directory is renamed
aside, the new one renamed to its name, and only then the earlier one
deleted; if the second rename fails the earlier one is renamed back. On a
local filesystem every step is a rename, so `export_dir` always holds one
whole SavedModel (or, for an instant between two renames, nothing);
object stores (gs://) rename by copying, so there this holds only as far
as their renames do.
"""

import fnmatch
import os

import tensorflow as tf

SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
SAVED_MODEL_ENTRIES = frozenset(SAVED_MODEL_FILES + (
    "variables", "assets", "assets.extra", "fingerprint.pb",
    "keras_metadata.pb"))
# Names that mark a training run's model directory (either engine).
_RUN_PATTERNS = ("checkpoint", "checkpoints", "config.gin", "config-*.gin",
                 "eval_config.gin", "ckpt-*", "shapemask-*.weights.h5",
                 "train", "eval", "eval_*.json", "unreadable", "train.lock")
_SHOWN = 4


def _entries(path):
  return sorted(name.rstrip("/") for name in tf.io.gfile.listdir(path))


def is_saved_model(path):
  """Whether `path` is a directory laid out as a SavedModel (see above)."""
  if not tf.io.gfile.isdir(path):
    return False
  names = set(_entries(path))
  return bool(names & set(SAVED_MODEL_FILES)) and names <= SAVED_MODEL_ENTRIES


def describe_contents(path):
  """A short account of a directory's entries for an error message.

  Returns:
    e.g. "a training run's files (checkpoint, config.gin, ckpt-4.index,
    train/ and 5 more)" or "notes.txt".
  """
  names = _entries(path)
  run = [n for n in names
         if any(fnmatch.fnmatch(n, p) for p in _RUN_PATTERNS)]
  shown_names = run + [n for n in names if n not in run]
  shown = [n + ("/" if tf.io.gfile.isdir(os.path.join(path, n)) else "")
           for n in shown_names[:_SHOWN]]
  text = ", ".join(shown)
  if len(names) > _SHOWN:
    text += f" and {len(names) - _SHOWN} more"
  return f"a training run's files ({text})" if run else text


def check_export_dir(export_dir, overwrite):
  """Raises unless an export may be written to `export_dir`.

  Allowed: a missing or empty directory, and with `overwrite` a directory
  holding an earlier SavedModel.

  Raises:
    FileExistsError: one line naming `export_dir`, what it holds and what
      to do.
  """
  export_dir = export_dir.rstrip("/")
  if not tf.io.gfile.exists(export_dir):
    return
  if not tf.io.gfile.isdir(export_dir):
    raise FileExistsError(
        f"export_dir {export_dir} is a file; give a directory path for the "
        "SavedModel")
  if not tf.io.gfile.listdir(export_dir):
    return
  if is_saved_model(export_dir):
    if overwrite:
      return
    raise FileExistsError(
        f"export_dir {export_dir} already holds a SavedModel; pass "
        "overwrite=True (--overwrite) to replace it")
  raise FileExistsError(
      f"export_dir {export_dir} is not a SavedModel: it holds "
      f"{describe_contents(export_dir)}. --overwrite replaces only an "
      "earlier SavedModel; export to a new or empty directory, e.g. "
      f"--export_dir={os.path.join(export_dir, 'saved_model')}")


def swap_in(new_dir, export_dir, token):
  """Renames the finished `new_dir` to `export_dir`, replacing it.

  Args:
    new_dir: the complete new export (a sibling of `export_dir`).
    export_dir: the destination; a SavedModel or empty directory there is
      replaced (the caller checked it with `check_export_dir`).
    token: a unique string for the name the earlier directory is kept
      under while the new one moves in.

  Returns:
    the path of an earlier export that could not be deleted after the
    swap (left for the caller to report), or None.
  """
  old_dir = None
  if tf.io.gfile.exists(export_dir):
    old_dir = f"{export_dir}.old-{token}"
    tf.io.gfile.rename(export_dir, old_dir)
  try:
    tf.io.gfile.rename(new_dir, export_dir)
  except BaseException:
    if old_dir is not None and not tf.io.gfile.exists(export_dir):
      tf.io.gfile.rename(old_dir, export_dir)  # The earlier one is back.
    raise
  if old_dir is None:
    return None
  try:
    tf.io.gfile.rmtree(old_dir)
  except (OSError, tf.errors.OpError):
    return old_dir
  return None
