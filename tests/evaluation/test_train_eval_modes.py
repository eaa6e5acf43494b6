"""train.py --mode=train_and_eval and --mode=eval on real data (coco_tiny160).

A tiny model barely learns in a few steps; these tests check the plumbing:
evaluation at the gin-set interval and at the end, eval_<step>.json files,
the COCO table on stdout, and evaluating the latest checkpoint.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10",
           "ARmax100", "ARs", "ARm", "ARl")


def _train_py(model_dir, mode, bindings, extra=()):
  args = [sys.executable, str(REPO / "train.py"), "--gin_file=tiny_cpu.gin",
          f"--model_dir={model_dir}", f"--mode={mode}", *extra]
  args += [f"--gin_bindings={b}" for b in bindings]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_train_and_eval_then_eval(tmp_path, tiny_train_records,
                                  tiny_val_records, coco_tiny_root):
  val_json = coco_tiny_root / "annotations" / "instances_val2017.json"
  bindings = [
      f"TRAIN_FILE_PATTERN='{tiny_train_records}'",
      f"EVAL_FILE_PATTERN='{tiny_val_records}'",
      f"VAL_JSON_FILE='{val_json}'",
      "TOTAL_STEPS=6", "STEPS_PER_LOOP=3", "CHECKPOINT_EVERY=3",
      "EVAL_EVERY=3", "LR_STEPS=[5]", "WARMUP_STEPS=2", "EVAL_BATCH_SIZE=8",
  ]
  model_dir = tmp_path / "run"
  out = _train_py(model_dir, "train_and_eval", bindings)
  # Evaluated at step 3 (interval) and at the end (step 6).
  for step in (3, 6):
    result = json.loads((model_dir / f"eval_{step}.json").read_text())
    assert result["step"] == step
    assert result["num_images"] == 80  # All val images, none dropped.
    for name in METRICS:
      assert name in result and f"mask_{name}" in result
    assert 0.0 <= result["mask_AP"] <= 1.0
  assert out.count("Evaluation at step") == 2
  assert "mask" in out and "AP50" in out
  assert "Training time (strategy start to shutdown)" in out
  assert list((model_dir / "eval").glob("events.out.tfevents*"))

  # --mode=eval: the latest checkpoint, once; the same weights give the
  # same numbers as the end-of-training evaluation.
  os.remove(model_dir / "eval_6.json")
  out = _train_py(model_dir, "eval", bindings)
  again = json.loads((model_dir / "eval_6.json").read_text())
  assert out.count("Evaluation at step 6") == 1
  for name in ("AP", "mask_AP", "ARmax100"):
    assert again[name] == pytest.approx(result[name], abs=1e-6)


def test_eval_mode_without_checkpoint_fails_clearly(tmp_path,
                                                    tiny_val_records):
  args = [sys.executable, str(REPO / "train.py"), "--gin_file=tiny_cpu.gin",
          f"--model_dir={tmp_path / 'empty'}", "--mode=eval",
          "--gin_bindings=TRAIN_FILE_PATTERN='unused'",
          f"--gin_bindings=EVAL_FILE_PATTERN='{tiny_val_records}'"]
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True,
                        timeout=300,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  # One line, and the (possibly mistyped) model_dir is not created.
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert (f"train.py: error: --mode=eval: no checkpoint in "
          f"{tmp_path / 'empty'}") in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "empty").exists()
