"""Remote shape-prior files (`gs://...`): a local copy for the model builder.

The seed's configs name the seed's public prior file,
`gs://cloud-tpu-checkpoints/shapemask/kmeans_class_priors_91x20x32x32.npy`.
The model builder reads priors with numpy (model code imports no
TensorFlow), so the training side copies a remote file once, through
`tf.io.gfile` and within a time limit (a machine without network access
would otherwise wait on the GCS client for minutes), into a local cache,
and builds the model from the copy (`model_overrides`). Every entry point
that builds the model from gin (`train.py` under both engines, the JAX
engine's init subprocess, the export and conversion tools) does so.

The cache folder is `$OFFICIAL_SHAPEMASK_CACHE` or
`~/.cache/official_shapemask`; a copy is written under a temporary name and
renamed, so a killed copy leaves nothing that looks complete.
"""

import hashlib
import os

import gin
import tensorflow as tf

from official_shapemask.modeling import factory
from official_shapemask.weights import errors, tf1_checkpoints

# Seconds allowed for copying a remote prior file (it is 7.5 MB for COCO).
COPY_TIMEOUT_S = tf1_checkpoints.OPEN_TIMEOUT_S
CACHE_ENV = "OFFICIAL_SHAPEMASK_CACHE"


class UnreadablePriorsError(ValueError):
  """A remote `SHAPE_PRIOR_PATH` cannot be read; the message says what to do."""


def is_remote(path):
  return "://" in str(path)


def cache_dir():
  """Where copies of remote files go (`$OFFICIAL_SHAPEMASK_CACHE`)."""
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "official_shapemask")


def cached_path(path):
  """The local file that holds (or will hold) the copy of `path`."""
  digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
  name = str(path).rstrip("/").split("/")[-1]
  return os.path.join(cache_dir(), "shape_priors", f"{digest}-{name}")


def unreadable_message(path, reason):
  """The one-line error for a prior file that cannot be read."""
  name = str(path).rstrip("/").split("/")[-1]
  return (
      f"SHAPE_PRIOR_PATH={path!r} cannot be read ({reason}). Point "
      f"SHAPE_PRIOR_PATH at a local copy of it (e.g. gsutil cp '{path}' "
      f"DIR/, then SHAPE_PRIOR_PATH='DIR/{name}'), or make priors from your "
      "training annotations with tools/generate_shape_priors.py "
      "(--annotation_file=... --output=priors.npy --num_clusters=20)")


def _copy(path, target):
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError("no such file")
  os.makedirs(os.path.dirname(target), exist_ok=True)
  partial = f"{target}.partial-{os.getpid()}"
  try:
    tf.io.gfile.copy(path, partial, overwrite=True)
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def local_copy(path, timeout_s=COPY_TIMEOUT_S):
  """A local file with the contents of `path` (itself when local).

  Copies a remote file once per cache folder; later calls find the copy.

  Raises:
    UnreadablePriorsError: one line naming `path`, when it is missing or
      cannot be read within `timeout_s` (no network access), with what to
      do instead.
  """
  if not is_remote(path):
    return path
  target = cached_path(path)
  if os.path.isfile(target):
    return target
  try:
    tf1_checkpoints.call_with_timeout(lambda: _copy(path, target), timeout_s,
                                      path)
  except errors.CheckpointTimeoutError:
    raise UnreadablePriorsError(unreadable_message(
        path, f"not read within {timeout_s} s: no network access to it?"
    )) from None
  except (tf.errors.OpError, OSError) as e:
    message = getattr(e, "message", None) or str(e) or type(e).__name__
    raise UnreadablePriorsError(unreadable_message(
        path, message.strip().splitlines()[0])) from None
  return target


def configured_path():
  """`build_shapemask_model.shape_prior_path` as gin binds it (or None)."""
  return gin.get_bindings(factory.build_shapemask_model).get(
      "shape_prior_path")


def model_overrides(timeout_s=COPY_TIMEOUT_S):
  """`build_shapemask_model` overrides: a remote prior file's local copy.

  Returns:
    `{'shape_prior_path': local copy}` when gin binds a remote path, else
    `{}`.

  Raises:
    UnreadablePriorsError: see `local_copy`.
  """
  path = configured_path()
  if path and is_remote(path):
    return {"shape_prior_path": local_copy(path, timeout_s)}
  return {}
