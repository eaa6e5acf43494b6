"""Sizes and step counts that are not positive whole numbers: one line.

`Settings` (gin name `Experiment`) checks them where gin hands them over, naming the gin setting
(its macro when bound through one) before anything is built or created.
"""
import os
import pathlib
import subprocess
import sys

import gin
import pytest

from official_shapemask.training import gin_utils
from official_shapemask.training import settings

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_gin():
  yield
  with gin.unlock_config():
    gin.clear_config()


def _experiment(*bindings):
  gin_utils.parse_config(["tiny_cpu.gin"],
                         ["TRAIN_FILE_PATTERN='unused'", *bindings])
  return settings.create("/nonexistent/run")


@pytest.mark.parametrize("binding,message", [
    ("TRAIN_BATCH_SIZE=0", "TRAIN_BATCH_SIZE=0 (Experiment.train_batch_size)"
     ": must be a positive whole number"),
    ("EVAL_BATCH_SIZE=-8", "EVAL_BATCH_SIZE=-8 (Experiment.eval_batch_size): "
     "must be a positive whole number"),
    ("TOTAL_STEPS=0", "TOTAL_STEPS=0 (Experiment.total_steps): must be a "
     "positive whole number"),
    ("STEPS_PER_LOOP=0", "STEPS_PER_LOOP=0 (Experiment.steps_per_loop): must "
     "be a positive whole number"),
    ("CHECKPOINT_EVERY=0", "CHECKPOINT_EVERY=0 (Experiment.checkpoint_every):"
     " must be a positive whole number (or None)"),
    ("EVAL_EVERY=-100", "EVAL_EVERY=-100 (Experiment.eval_every): must be a "
     "positive whole number (or None)"),
    ("TRAIN_BATCH_SIZE=2.5", "TRAIN_BATCH_SIZE=2.5 (Experiment.train_batch_"
     "size): must be a positive whole number"),
    ("TOTAL_STEPS='100'", "TOTAL_STEPS='100' (Experiment.total_steps): must "
     "be a positive whole number"),
    ("EVAL_SAMPLES=0", "EVAL_SAMPLES=0 (Experiment.eval_samples): must be a "
     "positive whole number (or None)"),
    ("Experiment.max_checkpoints=0", "Experiment.max_checkpoints=0: must be a "
     "positive whole number"),
])
def test_non_positive_settings_are_named(clean_gin, binding, message):
  with pytest.raises(settings.InvalidInputError) as err:
    _experiment(binding)
  assert str(err.value) == message


def test_whole_numbers_and_none_are_taken(clean_gin):
  exp = _experiment("TOTAL_STEPS=1e4", "CHECKPOINT_EVERY=None",
                    "EVAL_EVERY=None", "STEPS_PER_LOOP=25")
  assert exp.total_steps == 10000 and isinstance(exp.total_steps, int)
  assert exp.checkpoint_every == 25 == exp.eval_every
  assert exp.eval_samples is None


def test_train_py_says_it_in_one_line(tmp_path):
  model_dir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, str(REPO_ROOT / "train.py"), "--gin_file=tiny_cpu.gin",
       "--gin_bindings=TRAIN_FILE_PATTERN='unused'",
       "--gin_bindings=TRAIN_BATCH_SIZE=0", f"--model_dir={model_dir}"],
      cwd=REPO_ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                              CUDA_VISIBLE_DEVICES=""),
      capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "train.py: error: TRAIN_BATCH_SIZE=0 (Experiment.train_batch_size): "
      "must be a positive whole number")
  assert "Traceback" not in proc.stderr
  assert not model_dir.exists()
