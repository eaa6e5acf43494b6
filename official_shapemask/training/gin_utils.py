"""gin helpers: short config names, parsing, and the operative config."""

import os
import uuid

import gin
import tensorflow as tf

REPO_GIN_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), "gin")


def find_gin_file(name, search_dirs=(REPO_GIN_DIR,)):
  """Resolves `shapemask_r101.gin` (or a path) to an existing file."""
  candidates = [name]
  if not name.endswith(".gin"):
    candidates.append(name + ".gin")
  for candidate in list(candidates):
    for directory in search_dirs:
      candidates.append(os.path.join(directory, candidate))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(
      f"gin file {name!r} not found (looked in the working directory and "
      f"{', '.join(search_dirs)})")


def register_configurables():
  """Imports every module that defines gin configurables.

  gin only knows a configurable after its module is imported; importing them
  all first makes an unknown name in a gin file fail at parse time.
  """
  # pylint: disable=g-import-not-at-top,unused-import
  from official_shapemask.dataloaders import shapemask_parser  # noqa: F401
  from official_shapemask.modeling import factory  # noqa: F401
  from official_shapemask.training import experiment  # noqa: F401
  from official_shapemask.training import schedules  # noqa: F401


def parse_config(gin_files=(), gin_bindings=(), search_dirs=(REPO_GIN_DIR,)):
  """Parses gin files (short names allowed) and bindings."""
  register_configurables()
  files = [find_gin_file(f, search_dirs) for f in gin_files]
  for directory in search_dirs:
    gin.add_config_file_search_path(directory)
  gin.parse_config_files_and_bindings(files, list(gin_bindings),
                                      finalize_config=False)
  return files


def write_operative_config(model_dir):
  """Writes gin's operative config to `model_dir/config.gin` atomically."""
  tf.io.gfile.makedirs(model_dir)
  final = os.path.join(model_dir, "config.gin")
  tmp = os.path.join(model_dir, f".config.gin.{uuid.uuid4().hex}.tmp")
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(gin.operative_config_str())
  tf.io.gfile.rename(tmp, final, overwrite=True)
  return final
