"""A remote SHAPE_PRIOR_PATH (the seed's gs:// file): copied, or one line.

The seed's configs default `SHAPE_PRIOR_PATH` to the seed's public prior
file on gs://. A readable remote file is copied once to the local cache and
the model is built from the copy (TensorFlow's `ram://` file system stands
in for gs:// here); an unreadable one stops `train.py` before the strategy
starts, in one line that says how to use a local copy or make priors.
"""
import io
import os
import pathlib
import subprocess
import sys
import time

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.training import controller
from official_shapemask.training import gin_utils
from official_shapemask.training import settings
from official_shapemask.training import shape_prior_files

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# An object that does not exist in the seed's public bucket: unreadable with
# or without a network.
MISSING_GS = "gs://cloud-tpu-checkpoints/shapemask/no-such-priors-for-tests.npy"


@pytest.fixture
def clean_gin():
  with gin.unlock_config():
    gin.clear_config()
  yield
  with gin.unlock_config():
    gin.clear_config()
  keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def cache(tmp_path, monkeypatch):
  folder = tmp_path / "cache"
  monkeypatch.setenv(shape_prior_files.CACHE_ENV, str(folder))
  return folder


@pytest.fixture(scope="module")
def train_pattern(tmp_path_factory):
  """A train pattern that matches a file (start() reads no data)."""
  tmp = tmp_path_factory.mktemp("data")
  (tmp / "train-00000-of-00001").write_bytes(b"")
  return str(tmp / "train-*")


def _write_remote(path, array):
  buffer = io.BytesIO()
  np.save(buffer, array)
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buffer.getvalue())


def test_remote_priors_are_copied_once_and_built_into_the_model(
    clean_gin, cache, train_pattern, tmp_path):
  priors = np.random.default_rng(3).uniform(
      size=(91, 4, 32, 32)).astype(np.float32)
  remote = "ram://shapemask_test/kmeans_class_priors_91x4x32x32.npy"
  _write_remote(remote, priors)
  gin_utils.parse_config(["tiny_cpu.gin"], [
      f"TRAIN_FILE_PATTERN='{train_pattern}'",
      f"SHAPE_PRIOR_PATH='{remote}'"])
  exp = controller.build(str(tmp_path / "run"), print_fn=lambda *a: None)
  exp.start("train")
  try:
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(
        exp.engine.model.prior_head.shape_priors), priors)
  finally:
    exp.close()
  copy = shape_prior_files.cached_path(remote)
  assert copy.startswith(str(cache)) and copy.endswith(
      "kmeans_class_priors_91x4x32x32.npy")
  np.testing.assert_array_equal(np.load(copy), priors)
  assert [p.name for p in pathlib.Path(copy).parent.iterdir()] == [
      os.path.basename(copy)]  # No partial file left.
  # The copy serves later builds (the JAX engine's init subprocess, the
  # export tools) without reading the remote file again.
  tf.io.gfile.remove(remote)
  assert shape_prior_files.model_overrides() == {"shape_prior_path": copy}
  # A local path is used as it is.
  assert shape_prior_files.local_copy(copy) == copy


def test_unreadable_remote_priors_stop_before_start_in_one_line(
    clean_gin, cache, train_pattern, tmp_path):
  gin_utils.parse_config(["shapemask_r101.gin"], [
      f"TRAIN_FILE_PATTERN='{train_pattern}'",
      f"SHAPE_PRIOR_PATH='{MISSING_GS}'"])
  exp = controller.build(str(tmp_path / "run"))
  start = time.time()
  with pytest.raises(settings.InvalidInputError) as err:
    exp.start("train")
  seconds = time.time() - start
  message = str(err.value)
  assert exp.engine.strategy is None and not (tmp_path / "run").exists()
  assert "\n" not in message
  assert f"SHAPE_PRIOR_PATH='{MISSING_GS}' cannot be read" in message
  assert "local copy" in message and f"gsutil cp '{MISSING_GS}'" in message
  assert "tools/generate_shape_priors.py" in message
  assert not cache.exists() or not any(cache.rglob("*.npy"))
  assert seconds < shape_prior_files.COPY_TIMEOUT_S + 5, seconds


def test_train_py_with_the_seeds_config_stops_in_one_line(train_pattern,
                                                          tmp_path):
  model_dir = tmp_path / "run"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env[shape_prior_files.CACHE_ENV] = str(tmp_path / "cache")
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "train.py"),
       "--gin_file=shapemask_r101.gin",
       f"--gin_bindings=TRAIN_FILE_PATTERN='{train_pattern}'",
       f"--gin_bindings=SHAPE_PRIOR_PATH='{MISSING_GS}'",
       f"--model_dir={model_dir}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("train.py: error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert f"SHAPE_PRIOR_PATH='{MISSING_GS}' cannot be read" in errors[0]
  assert "tools/generate_shape_priors.py" in errors[0]
  assert "Traceback" not in result.stderr
  assert not model_dir.exists()
