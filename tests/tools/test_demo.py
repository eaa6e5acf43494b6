"""tools/demo.py (what `make demo` runs), end to end at a tiny size.

The output folder already holds a previous run's checkpoint and SavedModel,
as when `make demo` is run a second time: the demo must start training
afresh and replace its own export. A folder the demo did not write (a
training run of the user's) is refused before anything is touched.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import cv2
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~2 min: data, conversion, priors, train, eval, export.
def test_demo_end_to_end_into_the_folder_of_a_previous_run(tmp_path):
  out = tmp_path / "demo_out"
  stale_export = out / "saved_model"
  stale_export.mkdir(parents=True)
  (stale_export / "saved_model.pb").write_bytes(b"stale")
  stale_run = out / "run"
  stale_run.mkdir()
  (stale_run / "checkpoint").write_text("stale")
  (out / ".shapemask_demo").write_text("an earlier demo wrote this folder")

  proc = subprocess.run(
      [sys.executable, "tools/demo.py", f"--output_dir={out}",
       "--num_train=16", "--num_val=6", "--steps=6", "--num_predict=2"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
      env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), check=False)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  # Our own progress only: no TensorFlow ERROR/WARNING lines (cuInit on a
  # CPU machine, oneDNN int64, map_fn deprecation; official_shapemask.
  # quiet_logs), in the demo's output or its tools'.
  tf_lines = re.findall(r"^(?:\d{4}-\d\d-\d\d [\d:.]+: [EWF] |[EWF]\d{4} "
                        r"[\d:.]+ +\d+ \S+\] ).*$",
                        proc.stdout + proc.stderr, re.MULTILINE)
  assert not tf_lines, tf_lines

  last = proc.stdout.strip().splitlines()[-1]
  match = re.fullmatch(
      r"mask_AP=(-?[\d.]+) box_AP=(-?[\d.]+) minutes=([\d.]+)", last)
  assert match, last
  evals = sorted((out / "run").glob("eval_*.json"))
  assert [p.name for p in evals] == ["eval_6.json"]
  metrics = json.loads(evals[0].read_text())
  assert float(match.group(1)) == pytest.approx(metrics["mask_AP"], abs=5e-4)
  assert float(match.group(2)) == pytest.approx(metrics["AP"], abs=5e-4)
  # The stale export was replaced by a loadable SavedModel.
  assert (stale_export / "saved_model.pb").read_bytes() != b"stale"
  assert (stale_export / "variables").is_dir()
  overlays = sorted((out / "predictions").glob("*.png"))
  assert len(overlays) == 2
  sheet = cv2.imread(str(out / "contact_sheet.png"))
  overlay = cv2.imread(str(overlays[0]))
  # Drawn enlarged (160 px images -> 480 px), tiled side by side.
  assert overlay.shape[:2] == (480, 480)
  assert sheet.shape[1] > 2 * 300 and sheet.shape[0] > 300
  assert (out / "data" / "shape_priors.npy").is_file()
  assert (out / ".shapemask_demo").is_file()


def _tree(path):
  return {str(p.relative_to(path)): p.read_bytes()
          for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_folder_the_demo_did_not_write_is_refused(tmp_path):
  out = tmp_path / "work"
  run = out / "run"  # A training run of the user's, where the demo's goes.
  run.mkdir(parents=True)
  for name in ("checkpoint", "ckpt-4.index", "config.gin"):
    (run / name).write_text("the user's")
  (out / "predict_inputs").mkdir()
  (out / "predict_inputs" / "photo.jpg").write_bytes(b"the user's")
  before = _tree(out)
  proc = subprocess.run(
      [sys.executable, "tools/demo.py", f"--output_dir={out}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert proc.stderr.strip() == (
      f"demo: --output_dir {out} holds files the demo did not write "
      "(predict_inputs, run; no .shapemask_demo), and the demo replaces its "
      "run/ and predict_inputs/ there: give a new or empty directory")
  assert _tree(out) == before and sorted(os.listdir(out)) == [
      "predict_inputs", "run"]


def test_an_earlier_demo_folder_is_recognised(tmp_path):
  """New, empty and marked folders, and one from before the marker."""
  legacy = tmp_path / "legacy"
  (legacy / "run").mkdir(parents=True)
  (legacy / "run" / "config.gin").write_text(
      f"TRAIN_FILE_PATTERN = '{legacy}/data/records/train-*'\n")
  marked = tmp_path / "marked"
  marked.mkdir()
  (marked / ".shapemask_demo").write_text("")
  (marked / "run").mkdir()
  other = tmp_path / "other"
  (other / "run").mkdir(parents=True)
  (other / "run" / "config.gin").write_text(
      "TRAIN_FILE_PATTERN = '/data/coco/train-*'\n")
  script = (
      "import sys\nfrom official_shapemask.cli import demo\n"
      "for out in sys.argv[1:]:\n"
      "  try:\n"
      "    demo.check_output_dir(out, out + '/data/records')\n"
      "    print('ok', out)\n"
      "  except SystemExit as e:\n"
      "    print('refused', out)\n")
  (tmp_path / "empty").mkdir()
  folders = [tmp_path / "new", tmp_path / "empty", legacy, marked, other]
  proc = subprocess.run(
      [sys.executable, "-c", script, *map(str, folders)], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split("\n")[:-1] == [
      f"ok {folders[0]}", f"ok {folders[1]}", f"ok {legacy}", f"ok {marked}",
      f"refused {other}"]
