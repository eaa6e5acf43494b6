"""Resuming past damaged checkpoints, and the leftovers of killed saves.

A small Keras model with an SGD optimizer stands in for ShapeMask: the
checkpoint format and the CheckpointManager are the same.
"""
import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.weights import checkpoints
from official_shapemask.weights import errors


def _objects(width=8):
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(width),
                            keras.layers.Dense(3)])
  optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
  optimizer.build(model.trainable_variables)
  return model, optimizer, tf.train.Checkpoint(model=model,
                                               optimizer=optimizer)


@pytest.fixture
def run_dir(tmp_path):
  """ckpt-5, ckpt-10, ckpt-15; the model's kernel holds the step."""
  model, optimizer, checkpoint = _objects()
  manager = tf.train.CheckpointManager(checkpoint, str(tmp_path),
                                       max_to_keep=5)
  for step in (5, 10, 15):
    optimizer.iterations.assign(step)
    model.layers[0].kernel.assign(np.full((4, 8), step, np.float32))
    manager.save(checkpoint_number=step)
  return tmp_path


def _damage(prefix, how):
  data = glob.glob(prefix + ".data-*")[0]
  raw = open(data, "rb").read()
  if how == "truncated":  # IndexError: Read less bytes than requested.
    open(data, "wb").write(raw[:len(raw) // 2])
  elif how == "overwritten":  # DataLossError: checksum does not match.
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    open(data, "wb").write(bytes(flipped))
  elif how == "data_missing":
    os.remove(data)


@pytest.mark.parametrize("how", ["truncated", "overwritten", "data_missing"])
def test_resumes_from_the_newest_readable_and_moves_the_damaged_aside(
    run_dir, how):
  _damage(str(run_dir / "ckpt-15"), how)
  model, optimizer, checkpoint = _objects()
  printed = []
  restored = checkpoints.restore_newest_readable(
      checkpoint, str(run_dir), move_unreadable=True, print_fn=printed.append)
  assert restored == str(run_dir / "ckpt-10")
  assert int(optimizer.iterations.numpy()) == 10
  np.testing.assert_array_equal(model.layers[0].kernel.numpy(), 10.0)
  assert len(printed) == 1, printed
  message = printed[0]
  assert f"Checkpoint {run_dir / 'ckpt-15'} cannot be read" in message
  assert str(run_dir / "unreadable") in message
  assert f"using {run_dir / 'ckpt-10'} instead" in message
  # Kept on disk, out of the way of readers and of the next save.
  moved = sorted(os.listdir(run_dir / "unreadable"))
  assert "ckpt-15.index" in moved
  assert not glob.glob(str(run_dir / "ckpt-15.*"))
  assert tf.train.latest_checkpoint(str(run_dir)) == str(run_dir / "ckpt-10")
  manager = tf.train.CheckpointManager(checkpoint, str(run_dir),
                                       max_to_keep=5)
  assert manager.checkpoints == [str(run_dir / "ckpt-5"),
                                 str(run_dir / "ckpt-10")]
  optimizer.iterations.assign(15)
  manager.save(checkpoint_number=15)  # The step can be saved again.
  assert tf.train.latest_checkpoint(str(run_dir)) == str(run_dir / "ckpt-15")


def test_evaluation_leaves_the_directory_alone(run_dir):
  _damage(str(run_dir / "ckpt-15"), "overwritten")
  before = sorted(os.listdir(run_dir))
  state = (run_dir / "checkpoint").read_text()
  _, optimizer, checkpoint = _objects()
  printed = []
  restored = checkpoints.restore_newest_readable(
      checkpoint, str(run_dir), print_fn=printed.append)
  assert restored == str(run_dir / "ckpt-10")
  assert int(optimizer.iterations.numpy()) == 10
  assert "cannot be read" in printed[0]
  assert sorted(os.listdir(run_dir)) == before
  assert (run_dir / "checkpoint").read_text() == state


def test_every_checkpoint_unreadable_names_them_all(run_dir):
  for step in (5, 10, 15):
    _damage(str(run_dir / f"ckpt-{step}"), "truncated")
  _, _, checkpoint = _objects()
  with pytest.raises(errors.CheckpointError) as err:
    checkpoints.restore_newest_readable(checkpoint, str(run_dir),
                                        move_unreadable=True, print_fn=None)
  for step in (5, 10, 15):
    assert str(run_dir / f"ckpt-{step}") in str(err.value)
  assert "\n" not in str(err.value)
  assert not (run_dir / "unreadable").exists()  # Nothing moved.


def test_another_model_is_a_mismatch_not_damage(run_dir):
  _, _, checkpoint = _objects(width=16)
  with pytest.raises(errors.CheckpointError,
                     match=r"ckpt-15 does not match the model"):
    checkpoints.restore_newest_readable(checkpoint, str(run_dir),
                                        move_unreadable=True, print_fn=None)
  assert not (run_dir / "unreadable").exists()
  with pytest.raises(errors.CheckpointError,
                     match=r"ckpt-10 does not match the model"):
    checkpoints.restore_checkpoint(checkpoint, str(run_dir / "ckpt-10"))


def test_no_checkpoint_gives_none(tmp_path):
  _, _, checkpoint = _objects()
  assert checkpoints.restore_newest_readable(checkpoint,
                                             str(tmp_path / "none")) is None
  assert not (tmp_path / "none").exists()


def test_interrupted_saves_are_removed(run_dir):
  # What a save killed mid-way leaves: TensorFlow's staging folder and the
  # state file's temporary copy.
  staging = run_dir / "ckpt-20_temp"
  staging.mkdir()
  (staging / "part-00000-of-00001.index").write_bytes(b"partial")
  (run_dir / "checkpoint.tmp3f2a9c").write_text("partial")
  (run_dir / "notes_temp").mkdir()  # Not ours: kept.
  removed = checkpoints.remove_interrupted_saves(str(run_dir))
  assert sorted(removed) == sorted([str(staging),
                                    str(run_dir / "checkpoint.tmp3f2a9c")])
  assert sorted(os.listdir(run_dir)) == sorted(
      ["checkpoint", "notes_temp"] + [f"ckpt-{s}.{ext}" for s in (5, 10, 15)
                                      for ext in ("index",
                                                  "data-00000-of-00001")])
  assert checkpoints.remove_interrupted_saves(str(run_dir / "absent")) == []


def test_a_staging_folder_holding_anything_else_is_kept(run_dir):
  # Named like a killed save's staging folder, but holding a file that
  # TensorFlow never writes there: not ours to delete.
  lookalike = run_dir / "ckpt-25_temp"
  lookalike.mkdir()
  (lookalike / "notes.txt").write_text("the user's")
  (lookalike / "part-00000-of-00001.index").write_bytes(b"partial")
  assert checkpoints.remove_interrupted_saves(str(run_dir)) == []
  assert sorted(os.listdir(lookalike)) == ["notes.txt",
                                           "part-00000-of-00001.index"]


def test_a_step_damaged_twice_keeps_both_copies(run_dir):
  model, optimizer, checkpoint = _objects()
  _damage(str(run_dir / "ckpt-15"), "overwritten")
  first = (run_dir / "ckpt-15.data-00000-of-00001").read_bytes()
  checkpoints.restore_newest_readable(checkpoint, str(run_dir),
                                      move_unreadable=True, print_fn=None)
  manager = tf.train.CheckpointManager(checkpoint, str(run_dir),
                                       max_to_keep=5)
  optimizer.iterations.assign(15)
  manager.save(checkpoint_number=15)  # Step 15 again, damaged again.
  _damage(str(run_dir / "ckpt-15"), "truncated")
  second = (run_dir / "ckpt-15.data-00000-of-00001").read_bytes()
  printed = []
  restored = checkpoints.restore_newest_readable(
      checkpoint, str(run_dir), move_unreadable=True, print_fn=printed.append)
  assert restored == str(run_dir / "ckpt-10")
  assert printed == [
      f"Checkpoint {run_dir / 'ckpt-15'} cannot be read (IndexError: Read "
      f"less bytes than requested); moved to {run_dir / 'unreadable'} as "
      f"ckpt-15.2; using {run_dir / 'ckpt-10'} instead"]
  unreadable = run_dir / "unreadable"
  assert sorted(os.listdir(unreadable)) == [
      "ckpt-15.2.data-00000-of-00001", "ckpt-15.2.index",
      "ckpt-15.data-00000-of-00001", "ckpt-15.index"]
  assert (unreadable / "ckpt-15.data-00000-of-00001").read_bytes() == first
  assert (unreadable / "ckpt-15.2.data-00000-of-00001").read_bytes() == (
      second)


def test_silent_fallback(run_dir):
  _damage(str(run_dir / "ckpt-15"), "truncated")
  _, optimizer, checkpoint = _objects()
  assert checkpoints.restore_newest_readable(
      checkpoint, str(run_dir), print_fn=None) == str(run_dir / "ckpt-10")
  assert int(optimizer.iterations.numpy()) == 10
