"""What `train.py` runs do to a model directory when things go wrong.

In-process runs of `modes.run` (what train.py calls after parsing its
flags) with tiny_cpu.gin on coco_tiny160. One module fixture trains two
steps (ckpt-1, ckpt-2) through the pattern 'train*', which also matches the
converter's train_label_map.json; each test works on its own copy of that
model directory.
"""
import glob
import os
import re
import shutil

import gin
import keras
import pytest
import tensorflow as tf

from official_shapemask.training import gin_utils
from official_shapemask.training import modes
from official_shapemask.training import settings
from official_shapemask.training import train_loop

BASE = ("STEPS_PER_LOOP=1", "CHECKPOINT_EVERY=1", "TOTAL_STEPS=2")


def _clear():
  with gin.unlock_config():
    gin.clear_config()
  keras.mixed_precision.set_global_policy("float32")


def _run(mode, model_dir, pattern, *bindings, eval_pattern=None):
  """Parses tiny_cpu.gin + bindings and runs `mode`; returns printed text.

  An exception propagates with the printed text as `.printed`.
  """
  _clear()
  extra = [f"EVAL_FILE_PATTERN='{eval_pattern}'"] if eval_pattern else []
  gin_utils.parse_config(["tiny_cpu.gin"], [
      f"TRAIN_FILE_PATTERN='{pattern}'", *BASE, *extra, *bindings])
  printed = []
  try:
    modes.run(mode=mode, model_dir=str(model_dir),
              print_fn=lambda *a, **k: printed.append(" ".join(map(str, a))))
  except BaseException as e:
    e.printed = "\n".join(printed)
    raise
  finally:
    _clear()
  return "\n".join(printed)


def _steps(model_dir):
  return sorted(int(p.rsplit("-", 1)[1].split(".")[0])
                for p in glob.glob(str(model_dir / "ckpt-*.index")))


@pytest.fixture(scope="module")
def trained(tiny_train_records, tmp_path_factory):
  pattern = tiny_train_records.replace("train-*", "train*")
  assert glob.glob(pattern.replace("train*", "train_label_map.json"))
  model_dir = tmp_path_factory.mktemp("reliability") / "run"
  printed = _run("train", model_dir, pattern)
  return {"dir": model_dir, "pattern": pattern, "printed": printed,
          "config": (model_dir / "config.gin").read_text()}


@pytest.fixture
def run_copy(trained, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(trained["dir"], copy)
  # The state file names checkpoints relative to its directory.
  assert tf.train.latest_checkpoint(str(copy)) == str(copy / "ckpt-2")
  return copy


@pytest.mark.slow
def test_label_map_in_the_pattern_is_skipped_saying_so(trained):
  label_map = trained["pattern"].replace("train*", "train_label_map.json")
  assert (f"train_file_pattern='{trained['pattern']}': skipping {label_map} "
          "(not a TFRecord file)") in trained["printed"]
  assert _steps(trained["dir"]) == [1, 2]
  assert "TOTAL_STEPS = 2" in trained["config"]


@pytest.mark.slow
def test_eval_never_replaces_the_training_config(trained, run_copy,
                                                 tiny_val_records):
  # One wrong binding: the checkpoint is named, nothing is overwritten.
  with pytest.raises(settings.InvalidInputError) as err:
    _run("eval", run_copy, trained["pattern"], "RESNET_DEPTH=18",
         eval_pattern=tiny_val_records)
  message = str(err.value)
  assert f"checkpoint {run_copy / 'ckpt-2'} does not match the model" in (
      message)
  assert "\n" not in message
  assert (run_copy / "config.gin").read_text() == trained["config"]
  assert not (run_copy / "eval_config.gin").exists()
  # A good evaluation writes its own file.
  _run("eval", run_copy, trained["pattern"], "EVAL_SAMPLES=4",
       eval_pattern=tiny_val_records)
  assert (run_copy / "config.gin").read_text() == trained["config"]
  assert "EVAL_SAMPLES = 4" in (run_copy / "eval_config.gin").read_text()
  assert (run_copy / "eval_2.json").exists()


@pytest.mark.slow
def test_resume_with_nothing_to_do_keeps_the_training_config(trained,
                                                            run_copy):
  # TOTAL_STEPS below the checkpoint's step, and another learning rate.
  printed = _run("train", run_copy, trained["pattern"], "TOTAL_STEPS=1",
                 "INIT_LR=0.05")
  assert f"Resumed from {run_copy / 'ckpt-2'} at step 2" in printed
  assert (run_copy / "config.gin").read_text() == trained["config"]
  assert sorted(p.name for p in run_copy.glob("config*")) == ["config.gin"]


@pytest.mark.slow
def test_damaged_latest_checkpoint_resumes_from_the_one_before(trained,
                                                               run_copy):
  data = glob.glob(str(run_copy / "ckpt-2.data-*"))[0]
  raw = open(data, "rb").read()
  open(data, "wb").write(raw[:len(raw) // 2])  # Truncated.
  staging = run_copy / "ckpt-3_temp"  # What a save killed mid-way leaves.
  staging.mkdir()
  (staging / "part-00000-of-00001.index").write_bytes(b"partial")
  # The resumed run also changes a setting: its first save makes config.gin
  # its own and keeps the earlier one.
  printed = _run("train", run_copy, trained["pattern"], "TOTAL_STEPS=3",
                 "INIT_LR=0.03")
  assert f"Removed {staging}, left by an interrupted checkpoint save" in (
      printed)
  assert re.search(
      rf"Checkpoint {re.escape(str(run_copy / 'ckpt-2'))} cannot be read "
      r"\(IndexError: .*\); moved to "
      rf"{re.escape(str(run_copy / 'unreadable'))}; using "
      rf"{re.escape(str(run_copy / 'ckpt-1'))} instead", printed), printed
  assert f"Resumed from {run_copy / 'ckpt-1'} at step 1" in printed
  assert not staging.exists()
  assert sorted(os.listdir(run_copy / "unreadable")) == sorted(
      ["ckpt-2.index", os.path.basename(data)])
  assert _steps(run_copy) == [1, 2, 3]
  assert tf.train.latest_checkpoint(str(run_copy)) == str(run_copy / "ckpt-3")
  assert "INIT_LR = 0.03" in (run_copy / "config.gin").read_text()
  assert (run_copy / "config-1.gin").read_text() == trained["config"]
  assert f"the earlier one is kept as {run_copy / 'config-1.gin'}" in printed


@pytest.mark.slow
def test_explosion_keeps_every_checkpoint_from_before_it(trained, tmp_path):
  # The run: INIT_LR=1e4 gives huge but finite losses for a few
  # steps. A checkpoint every step, two kept: none may be from after it.
  model_dir = tmp_path / "fresh"
  with pytest.raises(train_loop.LossExplosionError) as err:
    _run("train", model_dir, trained["pattern"], "INIT_LR=1e4",
         "WARMUP_STEPS=2", "TOTAL_STEPS=10", "Experiment.max_checkpoints=2")
  message = str(err.value)
  bad_step = int(re.match(r"loss explosion at step (\d+): total loss ",
                          message).group(1))
  assert 3 <= bad_step <= 6, message
  assert _steps(model_dir) == [bad_step - 2, bad_step - 1]
  assert message.count("\n") == 0
  assert (f"the last good checkpoint is kept: "
          f"{model_dir / f'ckpt-{bad_step - 1}'}") in message


@pytest.mark.slow
def test_resumed_run_that_explodes_keeps_the_training_config(trained,
                                                             run_copy):
  with pytest.raises(train_loop.LossExplosionError) as err:
    _run("train", run_copy, trained["pattern"], "INIT_LR=1e4",
         "WARMUP_STEPS=1", "TOTAL_STEPS=12", "CHECKPOINT_EVERY=10")
  assert f"the last good checkpoint is kept: {run_copy / 'ckpt-2'}" in str(
      err.value)
  assert _steps(run_copy) == [1, 2]
  assert (run_copy / "config.gin").read_text() == trained["config"]


@pytest.mark.slow
def test_damaged_shard_is_named(trained, tiny_train_records, tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  shards = sorted(glob.glob(tiny_train_records))
  for shard in shards:
    shutil.copy(shard, data_dir)
  damaged = data_dir / os.path.basename(shards[1])
  raw = bytearray(damaged.read_bytes())
  raw[len(raw) // 3] ^= 0xFF
  damaged.write_bytes(bytes(raw))
  with pytest.raises(settings.InvalidInputError) as err:
    _run("train", tmp_path / "run", str(data_dir / "train-*"),
         "TOTAL_STEPS=4")
  message = str(err.value)
  assert message.startswith(
      f"train_file_pattern: damaged TFRecord file {damaged} (corrupted "
      "record at byte "), message
  assert "\n" not in message


def test_a_file_that_is_not_a_tfrecord_is_named_before_training(
    trained, tiny_train_records, tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  shutil.copy(sorted(glob.glob(tiny_train_records))[0], data_dir)
  notes = data_dir / "train-notes"
  notes.write_text("shards converted on Monday")
  with pytest.raises(settings.InvalidInputError) as err:
    _run("train", tmp_path / "run", str(data_dir / "train-*"))
  assert str(err.value) == (
      f"train_file_pattern: {notes} is not a TFRecord file: its first record "
      "header fails its checksum.")
  assert "step 1/" not in err.value.printed  # Stopped before training.


@pytest.mark.slow
def test_damaged_eval_shard_is_named(trained, run_copy, tiny_val_records,
                                     tmp_path):
  data_dir = tmp_path / "val"
  data_dir.mkdir()
  for shard in sorted(glob.glob(tiny_val_records)):
    shutil.copy(shard, data_dir)
  damaged = sorted(data_dir.iterdir())[0]
  raw = bytearray(damaged.read_bytes())
  raw[len(raw) // 3] ^= 0xFF
  damaged.write_bytes(bytes(raw))
  with pytest.raises(settings.InvalidInputError) as err:
    _run("eval", run_copy, trained["pattern"],
         eval_pattern=str(data_dir / "val-*"))
  assert str(err.value).startswith(
      f"eval_file_pattern: damaged TFRecord file {damaged} (corrupted "
      "record at byte "), str(err.value)
  assert (run_copy / "config.gin").read_text() == trained["config"]
