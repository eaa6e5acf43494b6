"""How weights files are written: under a temporary name, then renamed.

A reader never sees a half-written file. `write_file(path, write_fn)` has
`write_fn` write a temporary file beside `path`, which becomes `path` in one
rename when `write_fn` returns; if it raises, the temporary file is removed
and `path` is left as it was. A remote destination (`gs://...`) is written
to a local scratch file first, copied beside `path` and renamed there.
`write_prefix` does the same for the files of a TensorFlow checkpoint prefix
(`.index`, `.data-*`), renamed one after the other.
"""

import os
import shutil
import tempfile
import uuid

import tensorflow as tf

# Keras infers a weights file's format from its name: the temporary name
# keeps these endings.
_KEPT_SUFFIXES = (".weights.h5", ".h5", ".keras")


def _is_remote(path):
  return "://" in path


def temporary_name(path):
  """A unique name beside `path` with the same Keras file ending."""
  path = str(path)
  suffix = next((s for s in _KEPT_SUFFIXES if path.endswith(s)), "")
  stem = path[:len(path) - len(suffix)]
  return f"{stem}.tmp-{uuid.uuid4().hex[:8]}{suffix}"


def _make_parent(path):
  directory = os.path.dirname(path)
  if directory:
    tf.io.gfile.makedirs(directory)


def _remove_if_there(path):
  if tf.io.gfile.exists(path):
    tf.io.gfile.remove(path)


def write_file(path, write_fn):
  """Writes one file atomically.

  Args:
    path: the destination, local or remote; its folder is created.
    write_fn: `write_fn(local_path)` writes the file (e.g.
      `model.save_weights`); the name keeps `path`'s Keras ending.

  Returns:
    `path`.
  """
  path = str(path)
  _make_parent(path)
  tmp = temporary_name(path)
  if not _is_remote(path):
    try:
      write_fn(tmp)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return path
  scratch = tempfile.mkdtemp(prefix="shapemask-write-")
  try:
    local = os.path.join(scratch, os.path.basename(tmp))
    write_fn(local)
    tf.io.gfile.copy(local, tmp, overwrite=True)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
    _remove_if_there(tmp)
  return path


def write_prefix(prefix, write_fn):
  """Writes the files of a checkpoint prefix, each renamed when complete.

  Args:
    prefix: the destination prefix (`.../ckpt`), local or remote.
    write_fn: `write_fn(tmp_prefix)` writes `tmp_prefix.index`,
      `tmp_prefix.data-*`, ... (e.g. `tf.train.Checkpoint.write`); when it
      raises, those files are removed.

  Returns:
    the written paths, sorted.
  """
  prefix = str(prefix)
  _make_parent(prefix)
  tmp = temporary_name(prefix)
  try:
    write_fn(tmp)
  except BaseException:
    for leftover in tf.io.gfile.glob(tmp + ".*"):
      _remove_if_there(leftover)
    raise
  written = []
  for src in sorted(tf.io.gfile.glob(tmp + ".*")):
    dst = prefix + src[len(tmp):]
    tf.io.gfile.rename(src, dst, overwrite=True)
    written.append(dst)
  return written
