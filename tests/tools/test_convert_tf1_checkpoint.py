"""tools/convert_tf1_checkpoint.py on files written by the seed's TF1 code.

The whole-model TF1 checkpoint of the session's oracle run (conftest
`tf1_oracle`) is converted with the gin config of its model; the converted
model gives the reference's mask outputs, and the written checkpoint loads
the way `tools/export_saved_model.py` and `train.py` load ours.
"""
import os
import pathlib
import subprocess
import sys

import gin
import numpy as np
import pytest
from keras import ops

from official_shapemask.modeling import factory
from official_shapemask.serving import export
from official_shapemask.weights import checkpoints
from official_shapemask.cli import convert_tf1_checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  with gin.unlock_config():
    gin.clear_config()


def _bindings(oracle):
  return ["TRAIN_FILE_PATTERN='unused'", "IMAGE_SIZE=128",
          f"SHAPE_PRIOR_PATH='{oracle / 'priors.npy'}'"]


def _relative_error(ours, theirs):
  a = np.asarray(ops.convert_to_numpy(ours), np.float64)
  return float(np.linalg.norm(a - theirs) / np.linalg.norm(theirs))


@pytest.mark.slow
def test_converts_a_tf1_checkpoint_into_ours(tf1_oracle, tmp_path):
  lines = []
  output = str(tmp_path / "ours" / "ckpt")
  model, report, written = convert_tf1_checkpoint.convert(
      str(tf1_oracle / "whole"), output, ["shapemask_r50.gin"],
      _bindings(tf1_oracle), print_fn=lines.append)
  assert "Restored from TF1 checkpoint" in lines[0]
  assert f"{len(report.restored)} restored, 1 skipped" in lines[0]
  assert written and all(os.path.exists(p) for p in written)
  assert lines[-1].startswith("Wrote ")

  ref = np.load(tf1_oracle / "outputs.npz")
  out = model({"images": ref["images"], "mask_boxes": ref["boxes"],
               "mask_outer_boxes": ref["outer_boxes"],
               "mask_classes": ref["classes"]}, training=False)
  for key in ("prior_masks", "coarse_mask_logits"):
    assert _relative_error(out[key], ref[key]) < 2e-5, key

  # The written checkpoint is ours: export and fine-tuning read it.
  fresh = factory.build_shapemask_model()  # gin as parsed by convert().
  assert export.restore_model(fresh, output) == output
  again = fresh({"images": ref["images"], "mask_boxes": ref["boxes"],
                 "mask_outer_boxes": ref["outer_boxes"],
                 "mask_classes": ref["classes"]}, training=False)
  np.testing.assert_array_equal(ops.convert_to_numpy(again["fine_mask_logits"]),
                                ops.convert_to_numpy(out["fine_mask_logits"]))
  partial = checkpoints.restore_partial(factory.build_shapemask_model(),
                                        output, "all", print_fn=None)
  assert not partial.skipped


def test_cli_fails_in_one_line_naming_the_file(tmp_path):
  missing = tmp_path / "nothing" / "model.ckpt-1"
  # tools/ runs the checkout's package (PYTHONPATH), not an installed one.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "tools" / "convert_tf1_checkpoint.py"),
       f"--checkpoint={missing}", "--gin_file=tiny_cpu.gin",
       "--gin_bindings=TRAIN_FILE_PATTERN='unused'",
       f"--output={tmp_path / 'out' / 'ckpt'}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  assert f"error: checkpoint not found: {missing}" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "out").exists()


def test_cli_refuses_an_output_inside_a_training_run(tmp_path):
  run_dir = tmp_path / "run"  # A training run's files, ckpt-5 among them.
  run_dir.mkdir()
  files = {"checkpoint": "model_checkpoint_path: \"ckpt-5\"\n",
           "ckpt-5.index": "index", "ckpt-5.data-00000-of-00001": "data",
           "config.gin": "TOTAL_STEPS = 5\n"}
  for name, text in files.items():
    (run_dir / name).write_text(text)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "tools" / "convert_tf1_checkpoint.py"),
       f"--checkpoint={tmp_path / 'tf1' / 'model.ckpt-1'}",
       "--gin_file=tiny_cpu.gin",
       "--gin_bindings=TRAIN_FILE_PATTERN='unused'",
       f"--output={run_dir / 'ckpt-5'}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip() == (
      f"error: --output={run_dir / 'ckpt-5'} would write into {run_dir}, a "
      "training run's model directory (it holds checkpoint, config.gin), "
      "and could replace its checkpoints; give a path in another directory")
  assert {p.name: p.read_text() for p in run_dir.iterdir()} == files
