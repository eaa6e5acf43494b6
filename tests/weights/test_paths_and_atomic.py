"""weights/paths.py (the one checkpoint-path resolver) and weights/atomic.py.

The resolver on each kind of path a user gives; the atomic writers on a
local folder and on TensorFlow's in-memory filesystem (`ram://`, a remote
path: written locally first, then copied and renamed), when the write
succeeds and when it fails.
"""
import os

import pytest
import tensorflow as tf

from official_shapemask.weights import atomic
from official_shapemask.weights import paths


def _checkpoint(prefix):
  """A real TensorFlow checkpoint at `prefix` (one variable)."""
  return tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])).write(str(prefix))


def test_resolves_every_kind_of_path(tmp_path):
  run = tmp_path / "run"
  tf.train.CheckpointManager(
      tf.train.Checkpoint(v=tf.Variable(1.0)), str(run), 3).save(7)
  assert paths.resolve_checkpoint(str(run)) == str(run / "ckpt-7")
  assert paths.resolve_checkpoint(str(run / "ckpt-7")) == str(run / "ckpt-7")

  weights = tmp_path / "model.weights.h5"
  weights.write_bytes(b"h5")
  assert paths.resolve_checkpoint(str(weights)) == str(weights)

  saved = tmp_path / "saved"
  (saved / "variables").mkdir(parents=True)
  (saved / "saved_model.pb").write_bytes(b"pb")
  with pytest.raises(FileNotFoundError, match="has no variables"):
    paths.resolve_checkpoint(str(saved))
  _checkpoint(saved / "variables" / "variables")
  variables = str(saved / "variables" / "variables")
  assert paths.resolve_checkpoint(str(saved)) == variables
  assert paths.resolve_checkpoint(str(saved / "variables")) == variables

  jax_run = tmp_path / "jax_run"
  jax_run.mkdir()
  with pytest.raises(FileNotFoundError,
                     match=f"no checkpoint found in directory {jax_run}"):
    paths.resolve_checkpoint(str(jax_run), model_weights=True)
  for step in (30, 200, 4):
    (jax_run / f"shapemask-{step}.weights.h5").write_bytes(b"h5")
  (jax_run / "shapemask-9.tmp-0a1b2c3d.weights.h5").write_bytes(b"partial")
  newest = str(jax_run / "shapemask-200.weights.h5")
  assert paths.resolve_checkpoint(str(jax_run), model_weights=True) == newest
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    paths.resolve_checkpoint(str(jax_run))

  for missing, message in (
      (tmp_path / "none.weights.h5", "Keras weights file not found"),
      (tmp_path / "ckpt-3", "checkpoint not found: .*ckpt-3 \\(no .*index")):
    with pytest.raises(FileNotFoundError, match=message):
      paths.resolve_checkpoint(str(missing))


@pytest.mark.parametrize("root", ["local", "ram"])
def test_write_file_renames_when_complete(tmp_path, root):
  base = str(tmp_path) if root == "local" else f"ram://{tmp_path.name}"
  path = f"{base}/out/model.weights.h5"
  names = []

  def write(tmp):
    names.append(tmp)
    assert tmp.endswith(".weights.h5") and ".tmp-" in tmp
    assert not tf.io.gfile.exists(path)  # Nothing under the final name yet.
    with open(tmp, "wb") as f:
      f.write(b"first")

  assert atomic.write_file(path, write) == path
  assert tf.io.gfile.GFile(path, "rb").read() == b"first"
  assert tf.io.gfile.listdir(f"{base}/out") == ["model.weights.h5"]
  assert not os.path.exists(names[0])

  def fail(tmp):
    with open(tmp, "wb") as f:
      f.write(b"half")
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    atomic.write_file(path, fail)
  assert tf.io.gfile.GFile(path, "rb").read() == b"first"
  assert tf.io.gfile.listdir(f"{base}/out") == ["model.weights.h5"]


def test_write_prefix_renames_every_file_or_leaves_none(tmp_path):
  prefix = str(tmp_path / "conv" / "ckpt")
  written = atomic.write_prefix(prefix, _checkpoint)
  assert written == sorted(tf.io.gfile.glob(prefix + ".*"))
  assert {os.path.basename(p) for p in written} == {
      "ckpt.index", "ckpt.data-00000-of-00001"}
  assert tf.train.list_variables(prefix)

  def fail(tmp):
    _checkpoint(tmp)
    raise ValueError("holds 1 of 2 variables")

  with pytest.raises(ValueError, match="holds 1 of 2"):
    atomic.write_prefix(str(tmp_path / "conv" / "other"), fail)
  assert sorted(os.listdir(tmp_path / "conv")) == [
      "ckpt.data-00000-of-00001", "ckpt.index"]
