"""tools/bench/benchmark_eval.py at a tiny size: stages, checks, JSON line."""
import json
import pathlib
import subprocess
import sys

import numpy as np

from official_shapemask.evaluation import class_splits
from tools.bench import benchmark_eval

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_synthetic_data_is_coco_like_and_seeded():
  groundtruth = benchmark_eval.synthetic_groundtruth(5, 120, 160, 6.0, 3)
  assert [im["id"] for im in groundtruth["images"]] == [1, 2, 3, 4, 5]
  anns = groundtruth["annotations"]
  assert len(anns) >= 5 and len({a["id"] for a in anns}) == len(anns)
  for ann in anns:
    x, y, w, h = ann["bbox"]
    assert 0 <= x and x + w <= 160 and 0 <= y and y + h <= 120
    assert ann["category_id"] in class_splits.COCO_CATEGORY_IDS
    assert ann["area"] > 0 and len(ann["segmentation"][0]) == 32
  assert groundtruth == benchmark_eval.synthetic_groundtruth(5, 120, 160, 6.0,
                                                             3)
  batches = list(benchmark_eval.synthetic_batches(groundtruth, 30, 32, 2, 3))
  assert [len(g["source_id"]) for _, g in batches] == [2, 2, 1]
  predictions = batches[0][0]
  assert predictions["detection_masks"].shape == (2, 30, 32, 32)
  boxes, outer = (predictions["detection_boxes"],
                  predictions["detection_outer_boxes"])
  assert (outer[..., :2] <= boxes[..., :2]).all()
  assert (outer[..., 2:] >= boxes[..., 2:]).all()
  assert (np.diff(predictions["detection_scores"], axis=1) <= 0).all()


def test_cli_reports_stages_and_identical_baseline():
  proc = subprocess.run(
      [sys.executable, "-m", "tools.bench.benchmark_eval", "--num_images=6",
       "--detections_per_image=20", "--mask_size=32", "--image_height=120",
       "--image_width=160", "--num_workers=2", "--baseline"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["num_images"] == 6 and summary["detections_per_image"] == 20
  assert summary["identical_rles"] and summary["identical_metrics"]
  for key in ("seconds", "baseline_seconds"):
    stages = summary[key]
    assert stages["paste_encode"] >= 0 and stages["cocoeval"] > 0
    # Rounded to 0.01 s each.
    assert abs(stages["total"] - stages["paste_encode"] -
               stages["cocoeval"]) <= 0.011
  assert summary["cpu_seconds"]["cocoeval"] > 0
  assert 0.0 < summary["mask_AP"] < 1.0 and 0.0 < summary["box_AP"] < 1.0
  assert "this code" in proc.stdout and "previous" in proc.stdout
  bad = subprocess.run(
      [sys.executable, "-m", "tools.bench.benchmark_eval", "--num_images=0"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
      check=False)
  assert bad.returncode == 2 and "--num_images must be >= 1" in bad.stderr
