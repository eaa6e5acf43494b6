"""tools/demo.py (what `make demo` runs), end to end at a tiny size.

The output folder already holds a previous run's checkpoint and SavedModel,
as when `make demo` is run a second time: the demo must start training
afresh and replace its own export.
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
