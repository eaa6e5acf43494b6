"""Tests of official_shapemask.evaluation.fast_cocoeval.

The matching loop, the accumulation and the category split are checked
against stock pycocotools COCOeval over the same detections (coco_tiny160
val, and synthetic data with many detections per image), bit for bit.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pycocotools import cocoeval

from official_shapemask.evaluation import coco_utils
from official_shapemask.evaluation import fast_cocoeval
from official_shapemask.evaluation import COCOEvaluator
from tools.bench import benchmark_eval

BATCH = 8


@pytest.fixture(scope="module")
def batches(val_coco, evalkit):
  image_ids = sorted(val_coco.getImgIds())
  detections = evalkit.fixed_detections(val_coco, image_ids, seed=1)
  return list(evalkit.batches(val_coco, image_ids, detections, BATCH))


@pytest.fixture(scope="module")
def job(batches, val_annotation_file):
  evaluator = COCOEvaluator(annotation_file=val_annotation_file,
                            num_workers=1)
  for predictions, groundtruths in batches:
    evaluator.update(predictions, groundtruths)
  return evaluator._make_job()  # pylint: disable=protected-access


def _results(job, iou_type):
  drop = "segmentation" if iou_type == "bbox" else "bbox"
  return [{k: v for k, v in r.items() if k != drop} for r in job["results"]]


def _evaluate(job, iou_type, **kwargs):
  coco_gt = coco_utils.quiet_coco(annotation_file=job["annotation_file"])
  return fast_cocoeval.evaluate(coco_gt, _results(job, iou_type),
                                job["image_ids"], iou_type, **kwargs)


def test_category_groups_are_balanced_complete_and_deterministic():
  cat_ids = list(range(1, 11))
  weights = {1: 100, 2: 90, 3: 10, 4: 10, 5: 10, 6: 5, 7: 5, 8: 0}
  groups = fast_cocoeval.category_groups(cat_ids, weights, 3)
  assert sorted(c for g in groups for c in g) == cat_ids
  assert all(g == sorted(g) for g in groups) and len(groups) == 3
  # The two heavy categories alone, the light ones together.
  assert groups == [[1], [2], [3, 4, 5, 6, 7, 8, 9, 10]]
  assert groups == fast_cocoeval.category_groups(cat_ids, weights, 3)
  assert fast_cocoeval.category_groups([4, 2], {}, 8) == [[2], [4]]
  per_process = fast_cocoeval.MIN_RESULTS_PER_PROCESS
  assert fast_cocoeval.workers_for(10**7, 1) == 1
  assert fast_cocoeval.workers_for(3 * per_process, 8) == 3
  assert fast_cocoeval.workers_for(per_process - 1, 8) == 1
  assert fast_cocoeval.WorkerPool.for_results(10**7, 2).size == 2


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_split_by_category_is_bit_identical(job, iou_type):
  serial = _evaluate(job, iou_type)
  with fast_cocoeval.WorkerPool(3) as pool:
    split = _evaluate(job, iou_type, pool=pool)
  assert isinstance(split, fast_cocoeval.AccumulatedEval)
  assert list(split.params.catIds) == list(serial.params.catIds)
  for key in ("precision", "recall", "scores"):
    np.testing.assert_array_equal(split.eval[key], serial.eval[key])
  assert (serial.eval["precision"] > 0).any()


def _evaluated(coco_gt, results, image_ids, iou_type):
  coco_eval = cocoeval.COCOeval(coco_gt, coco_utils.load_results(
      coco_gt, results), iouType=iou_type)
  coco_eval.params.imgIds = list(image_ids)
  with coco_utils.quiet():
    coco_eval.evaluate()
  return coco_eval


def _synthetic_job(tmp_path):
  """Many detections per image and category (the 1/10/100 limits bite)."""
  groundtruth = benchmark_eval.synthetic_groundtruth(6, 120, 160, 7.0, 5)
  path = tmp_path / "synthetic.json"
  path.write_text(json.dumps(groundtruth))
  evaluator = COCOEvaluator(annotation_file=str(path), num_workers=1)
  for predictions, groundtruths in benchmark_eval.synthetic_batches(
      groundtruth, 100, 32, 4, 5):
    evaluator.update(predictions, groundtruths)
  return evaluator._make_job()  # pylint: disable=protected-access


def _with_crowd_hits(job, coco_gt):
  """The job's results plus detections on coco_tiny160's crowd regions."""
  results = list(job["results"])
  crowds = [a for a in coco_gt.dataset["annotations"] if a["iscrowd"]
            and a["image_id"] in set(job["image_ids"])]
  assert crowds
  for k, ann in enumerate(crowds):
    rle = coco_gt.annToRLE(ann)
    results.append({"image_id": ann["image_id"],
                    "category_id": ann["category_id"],
                    "bbox": list(ann["bbox"]), "score": 0.5 + k / 100,
                    "segmentation": {"size": rle["size"],
                                     "counts": rle["counts"].decode()}})
  return results


@pytest.mark.parametrize("data", ["coco_tiny160", "synthetic"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_evaluate_image_is_pycocotools_evaluate_img(job, tmp_path, data,
                                                    iou_type):
  if data == "synthetic":
    job = _synthetic_job(tmp_path)
  coco_gt = coco_utils.quiet_coco(annotation_file=job["annotation_file"])
  results = job["results"]
  if data == "coco_tiny160":
    results = _with_crowd_hits(job, coco_gt)
  job = dict(job, results=results)
  stock = _evaluated(coco_gt, _results(job, iou_type), job["image_ids"],
                     iou_type)
  ours = fast_cocoeval.evaluate(coco_gt, _results(job, iou_type),
                                job["image_ids"], iou_type)
  assert len(ours.evalImgs) == len(stock.evalImgs)
  crowd_matches = 0
  crowd_ids = {a["id"] for a in coco_gt.dataset["annotations"]
               if a["iscrowd"]}
  for mine, theirs in zip(ours.evalImgs, stock.evalImgs):
    assert (mine is None) == (theirs is None)
    if theirs is None:
      continue
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
      if isinstance(value, np.ndarray):
        assert mine[key].dtype == value.dtype, key
        assert mine[key].shape == value.shape, key
        assert mine[key].tobytes() == value.tobytes(), key
      else:
        assert mine[key] == value, key
    crowd_matches += int(np.isin(theirs["dtMatches"], list(crowd_ids)).sum())
  if data == "coco_tiny160":
    assert crowd_matches > 0  # The crowd rule was exercised.


@pytest.mark.parametrize("data", ["coco_tiny160", "synthetic"])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_accumulate_is_bit_identical_to_pycocotools(job, tmp_path, data,
                                                    iou_type):
  if data == "synthetic":
    job = _synthetic_job(tmp_path)
  coco_gt = coco_utils.quiet_coco(annotation_file=job["annotation_file"])
  coco_eval = _evaluated(coco_gt, _results(job, iou_type), job["image_ids"],
                         iou_type)
  with coco_utils.quiet():
    coco_eval.accumulate()
  reference = coco_eval.eval
  ours = fast_cocoeval.accumulate(coco_eval)
  for key in ("precision", "recall", "scores"):
    assert ours[key].dtype == reference[key].dtype
    assert ours[key].tobytes() == reference[key].tobytes(), key
  assert (reference["precision"] > 0).any()
  if data == "synthetic":  # More than 10 detections per image and class.
    assert not np.array_equal(reference["recall"][..., 1],
                              reference["recall"][..., 2])


def test_evaluator_metrics_identical_for_any_num_workers(
    batches, val_annotation_file, monkeypatch):
  monkeypatch.setattr(fast_cocoeval, "MIN_RESULTS_PER_PROCESS", 1)
  outputs = []
  for num_workers in (1, 3):
    evaluator = COCOEvaluator(annotation_file=val_annotation_file,
                              per_category_metrics=True,
                              mask_eval_class="voc", num_workers=num_workers)
    for predictions, groundtruths in batches[:6]:
      evaluator.update(predictions, groundtruths)
    job = evaluator._make_job()  # pylint: disable=protected-access
    metrics = evaluator.evaluate()
    evaluator.close()
    metrics.pop("eval_seconds")
    outputs.append((job["results"], metrics))
  (serial_results, serial), (threaded_results, parallel) = outputs
  assert threaded_results == serial_results  # Same RLEs, same order.
  assert parallel.keys() == serial.keys()
  for key, value in serial.items():
    assert parallel[key] == value or (np.isnan(value) and
                                      np.isnan(parallel[key])), key
  assert 0.2 < serial["mask_AP"] < 0.95 and "novel_mask_AP" in serial


def test_paste_error_names_the_row(batches, val_annotation_file):
  predictions, groundtruths = batches[0]
  predictions = {k: v.copy() for k, v in predictions.items()}
  predictions["detection_outer_boxes"][3, 0] = np.nan
  evaluator = COCOEvaluator(annotation_file=val_annotation_file,
                            num_workers=2)
  evaluator.update(predictions, groundtruths)
  with pytest.raises(ValueError, match=r"eval batch 0 row 3: .*NaN"):
    evaluator.evaluate()
  evaluator.close()


def test_bad_num_workers():
  with pytest.raises(ValueError, match="num_workers"):
    COCOEvaluator(num_workers=0)


_NO_MAIN_GUARD = textwrap.dedent("""
    # A user's script without an `if __name__ == "__main__":` guard.
    print("script body ran", flush=True)
    import numpy as np
    from official_shapemask.evaluation import coco_utils
    from official_shapemask.evaluation import fast_cocoeval

    rng = np.random.default_rng(0)
    images = [{"id": i, "height": 100, "width": 100} for i in range(1, 5)]
    cats = [{"id": c, "name": str(c)} for c in (1, 2, 3)]
    anns, results = [], []
    for n in range(24):
      x, y = rng.uniform(0, 60, 2)
      box = [float(x), float(y), 30.0, 30.0]
      anns.append({"id": n + 1, "image_id": n % 4 + 1, "category_id": n % 3
                   + 1, "bbox": box, "area": 900.0, "iscrowd": 0})
      results.append({"image_id": n % 4 + 1, "category_id": n % 3 + 1,
                      "bbox": [box[0] + 2, box[1], 30.0, 30.0],
                      "score": float(rng.uniform())})
    gt = coco_utils.quiet_coco(dataset={"images": images, "categories": cats,
                                        "annotations": anns})
    serial = fast_cocoeval.evaluate(gt, [dict(r) for r in results],
                                    [1, 2, 3, 4], "bbox")
    with fast_cocoeval.WorkerPool(2) as pool:
      split = fast_cocoeval.evaluate(gt, [dict(r) for r in results],
                                     [1, 2, 3, 4], "bbox", pool)
    assert np.array_equal(split.eval["precision"], serial.eval["precision"])
    print("evaluated", flush=True)
""")


def test_worker_processes_do_not_rerun_the_callers_script(tmp_path):
  """A plain script (no __main__ guard) using the pool runs exactly once."""
  script = tmp_path / "user_script.py"
  script.write_text(_NO_MAIN_GUARD)
  repo = str(pathlib.Path(__file__).resolve().parents[2])
  env = dict(os.environ, PYTHONPATH=repo)
  result = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("script body ran") == 1, result.stdout
  assert "evaluated" in result.stdout


def test_a_failing_worker_task_names_the_error():
  with fast_cocoeval.WorkerPool(2) as pool:
    with pytest.raises(RuntimeError, match="COCOeval worker failed"):
      pool.run([{"gt_dataset": None}])
