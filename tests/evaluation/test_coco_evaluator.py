"""Tests of COCOEvaluator on coco_tiny160 val (real images and annotations)."""
import contextlib
import io
import json
import os
import signal
import time

import numpy as np
import pytest
from pycocotools import coco as coco_api
from pycocotools import cocoeval

from official_shapemask.evaluation import class_splits
from official_shapemask.evaluation import coco_evaluator
from official_shapemask.evaluation import COCOEvaluator
from official_shapemask.evaluation import format_metrics_table
from official_shapemask.evaluation import METRIC_NAMES

BATCH = 7  # 80 images -> the last batch has 4 padded rows (source_id -1).


@pytest.fixture(scope="module")
def image_ids(val_coco):
  return sorted(val_coco.getImgIds())


@pytest.fixture(scope="module")
def gt_batches(val_coco, image_ids, evalkit):
  detections = evalkit.gt_detections(val_coco, image_ids)
  return list(evalkit.batches(val_coco, image_ids, detections, BATCH))


@pytest.fixture(scope="module")
def fixed_batches(val_coco, image_ids, evalkit):
  detections = evalkit.fixed_detections(val_coco, image_ids)
  return list(evalkit.batches(val_coco, image_ids, detections, BATCH))


def _run(batches, **kwargs):
  evaluator = COCOEvaluator(**kwargs)
  for predictions, groundtruths in batches:
    evaluator.update(predictions, groundtruths)
  return evaluator, evaluator.evaluate()


def _direct_cocoeval(annotation_file, results, image_ids, iou_type,
                     cat_ids=None):
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = coco_api.COCO(annotation_file)
    if not isinstance(results, str):
      results = [dict(r) for r in results]  # loadRes adds keys in place.
    coco_dt = coco_gt.loadRes(results)
    e = cocoeval.COCOeval(coco_gt, coco_dt, iouType=iou_type)
    e.params.imgIds = list(image_ids)
    if cat_ids is not None:
      e.params.catIds = list(cat_ids)
    e.evaluate()
    e.accumulate()
    e.summarize()
  return e.stats


@pytest.mark.parametrize("gt_source", ["annotation_file", "eval_batches"])
def test_groundtruth_fed_back_scores_one(gt_batches, val_annotation_file,
                                         image_ids, gt_source):
  annotation_file = (val_annotation_file if gt_source == "annotation_file"
                     else None)
  evaluator = COCOEvaluator(annotation_file=annotation_file)
  for predictions, groundtruths in gt_batches:
    evaluator.update(predictions, groundtruths)
  evaluator.update(*gt_batches[0])  # Seen images are skipped.
  assert evaluator.num_images == len(image_ids) == 80
  assert evaluator.num_duplicates == BATCH
  metrics = evaluator.evaluate()
  for prefix in ("", "mask_"):
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax100"):
      assert metrics[prefix + name] == 1.0, (prefix + name, metrics)
  assert metrics["eval_seconds"] > 0


def test_metrics_equal_pycocotools_on_results_json(
    fixed_batches, val_annotation_file, image_ids, tmp_path):
  path = tmp_path / "detections.json"
  _, metrics = _run(fixed_batches, annotation_file=val_annotation_file,
                    results_json_path=str(path))
  results = json.loads(path.read_text())
  assert len({r["image_id"] for r in results}) == 80
  assert all("bbox" in r and "segmentation" in r for r in results)
  box_stats = _direct_cocoeval(val_annotation_file, str(path), image_ids,
                               "bbox")
  # Segm results without their bbox, so the mask area sizes them.
  mask_results = [{k: v for k, v in r.items() if k != "bbox"}
                  for r in results]
  mask_stats = _direct_cocoeval(val_annotation_file, mask_results, image_ids,
                                "segm")
  ours_box = [metrics[n] for n in METRIC_NAMES]
  ours_mask = [metrics["mask_" + n] for n in METRIC_NAMES]
  np.testing.assert_allclose(ours_box, box_stats, rtol=0, atol=1e-12)
  np.testing.assert_allclose(ours_mask, mask_stats, rtol=0, atol=1e-12)
  # A realistic, non-trivial operating point.
  assert 0.3 < metrics["AP"] < 0.9 and 0.3 < metrics["mask_AP"] < 0.9

  # Ground truth from the eval batches gives the same numbers.
  _, from_batches = _run(fixed_batches, annotation_file=None)
  for key in [n for n in METRIC_NAMES] + ["mask_" + n for n in METRIC_NAMES]:
    assert from_batches[key] == pytest.approx(metrics[key], abs=1e-9), key


def test_voc_novel_mask_ap_is_mean_of_per_category_ap(
    fixed_batches, val_annotation_file, image_ids, tmp_path):
  path = tmp_path / "detections.json"
  _, metrics = _run(fixed_batches, annotation_file=val_annotation_file,
                    mask_eval_class="voc", results_json_path=str(path))
  mask_results = [{k: v for k, v in r.items() if k != "bbox"}
                  for r in json.loads(path.read_text())]
  per_category_ap, per_category_ap50 = [], []
  for cat_id in class_splits.VOC_CATEGORY_IDS:
    stats = _direct_cocoeval(val_annotation_file, mask_results, image_ids,
                             "segm", cat_ids=[cat_id])
    if stats[0] > -1:  # -1: no ground truth of this category in the images.
      per_category_ap.append(stats[0])
      per_category_ap50.append(stats[1])
  assert len(per_category_ap) >= 10
  assert metrics["novel_mask_AP"] == pytest.approx(np.mean(per_category_ap),
                                                   abs=1e-12)
  assert metrics["novel_mask_AP50"] == pytest.approx(
      np.mean(per_category_ap50), abs=1e-12)
  assert "mask_AP" in metrics and metrics["novel_mask_AP"] != metrics[
      "mask_AP"]


def test_per_category_metrics(fixed_batches, val_annotation_file):
  _, metrics = _run(fixed_batches, annotation_file=val_annotation_file,
                    per_category_metrics=True)
  assert "AP_/person" in metrics and "mask_AP_/person" in metrics
  assert "AP_/traffic_light" in metrics
  for prefix in ("", "mask_"):
    values = [v for k, v in metrics.items()
              if k.startswith(prefix + "AP_/") and not np.isnan(v)]
    # COCO's AP is the mean of the per-category APs that have ground truth.
    assert np.mean(values) == pytest.approx(metrics[prefix + "AP"], abs=1e-12)


def test_padded_slots_are_excluded(fixed_batches, val_annotation_file,
                                   tmp_path):
  clean_path, noisy_path = tmp_path / "clean.json", tmp_path / "noisy.json"
  _, clean = _run(fixed_batches[:3], annotation_file=val_annotation_file,
                  results_json_path=str(clean_path))
  noisy_batches = []
  for predictions, groundtruths in fixed_batches[:3]:
    predictions = {k: v.copy() for k, v in predictions.items()}
    num = predictions["num_detections"]
    for b in range(BATCH):
      # Confident garbage beyond num_detections, where scores are -1.
      predictions["detection_scores"][b, num[b]:] = 0.99
      predictions["detection_boxes"][b, num[b]:] = [10, 10, 200, 200]
      predictions["detection_outer_boxes"][b, num[b]:] = [0, 0, 250, 250]
      predictions["detection_masks"][b, num[b]:] = 1.0
      predictions["detection_classes"][b, num[b]:] = 1
      # A slot inside num_detections with score <= 0 is padding too.
      predictions["num_detections"][b] += 1
      predictions["detection_scores"][b, num[b] - 1] = -1.0
    noisy_batches.append((predictions, groundtruths))
  _, noisy = _run(noisy_batches, annotation_file=val_annotation_file,
                  results_json_path=str(noisy_path))
  assert clean_path.read_text() == noisy_path.read_text()
  for key, value in clean.items():
    if key != "eval_seconds":
      assert noisy[key] == value, key


def test_images_without_detections(fixed_batches, val_annotation_file):
  batches = []
  for predictions, groundtruths in fixed_batches[:2]:
    predictions = dict(predictions)
    predictions["num_detections"] = np.zeros_like(
        predictions["num_detections"])
    batches.append((predictions, groundtruths))
  for annotation_file in (val_annotation_file, None):
    evaluator, metrics = _run(batches, annotation_file=annotation_file)
    assert evaluator.num_images == 2 * BATCH
    assert metrics["AP"] == 0.0 and metrics["mask_AP"] == 0.0
  # Some images of a batch empty, the others not.
  predictions, groundtruths = fixed_batches[0]
  predictions = {k: v.copy() for k, v in predictions.items()}
  predictions["num_detections"][::2] = 0
  _, metrics = _run([(predictions, groundtruths)],
                    annotation_file=val_annotation_file)
  assert 0.0 < metrics["mask_AP"] < 1.0


def test_boxes_mapped_to_original_coordinates(val_coco, image_ids, evalkit,
                                              tmp_path):
  image_id = image_ids[0]
  img = val_coco.imgs[image_id]
  box = [40.0, 60.0, 200.0, 300.0]  # yxyx, original pixels
  offset = (12.0, 7.0)
  predictions = evalkit.predictions(
      val_coco, [image_id], {image_id: [(box, 1, 0.8, None)]}, 1,
      canvas=512, offset=offset)
  groundtruths = evalkit.groundtruths(val_coco, [image_id], 1)
  scale = 512 / max(img["height"], img["width"])
  np.testing.assert_allclose(predictions["detection_boxes"][0, 0],
                             np.array(box) * scale - np.tile(offset, 2),
                             rtol=1e-6)
  path = tmp_path / "one.json"
  evaluator = COCOEvaluator(include_mask=False, results_json_path=str(path))
  evaluator.update(predictions, groundtruths)
  metrics = evaluator.evaluate()
  assert "mask_AP" not in metrics and "AP" in metrics
  (result,) = json.loads(path.read_text())
  assert result["image_id"] == image_id and result["category_id"] == 1
  np.testing.assert_allclose(result["bbox"], [60.0, 40.0, 240.0, 160.0],
                             atol=1e-3)


def test_source_id_must_be_a_number(fixed_batches, val_annotation_file):
  predictions, groundtruths = fixed_batches[0]
  evaluator = COCOEvaluator(annotation_file=val_annotation_file)
  as_strings = dict(groundtruths)
  as_strings["source_id"] = np.array(
      [str(int(s)).encode() for s in groundtruths["source_id"]], dtype=object)
  evaluator.update(predictions, as_strings)  # Decimal strings are fine.
  assert evaluator.num_images == BATCH
  bad = dict(as_strings)
  bad["source_id"] = as_strings["source_id"].copy()
  bad["source_id"][2] = b"img_0042.jpg"
  with pytest.raises(ValueError, match=r"eval batch 1 row 2.*img_0042\.jpg"):
    evaluator.update(predictions, bad)
  bad["source_id"][2] = b"-7"
  with pytest.raises(ValueError, match=r"row 2.*negative"):
    COCOEvaluator(annotation_file=val_annotation_file).update(predictions, bad)


def test_bad_settings_and_unknown_images(fixed_batches, val_annotation_file):
  with pytest.raises(ValueError, match="mask_eval_class"):
    COCOEvaluator(mask_eval_class="coco")
  with pytest.raises(ValueError, match="include_mask"):
    COCOEvaluator(mask_eval_class="voc", include_mask=False)
  with pytest.raises(ValueError, match="before any update"):
    COCOEvaluator().evaluate()
  predictions, groundtruths = fixed_batches[0]
  groundtruths = dict(groundtruths)
  groundtruths["source_id"] = groundtruths["source_id"] + 10**9
  evaluator = COCOEvaluator(annotation_file=val_annotation_file)
  evaluator.update(predictions, groundtruths)
  with pytest.raises(ValueError, match="not in annotation_file"):
    evaluator.evaluate()


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_evaluate_async_matches_sync(fixed_batches, val_annotation_file,
                                     mode):
  evaluator = COCOEvaluator(annotation_file=None, mask_eval_class="nonvoc",
                            run_in_background=mode)
  try:
    for predictions, groundtruths in fixed_batches[:5]:
      evaluator.update(predictions, groundtruths)
    sync = evaluator.evaluate()
    future = evaluator.evaluate_async()
    evaluator.reset()  # The job is a snapshot; resetting must not affect it.
    background = future.result(timeout=120)
  finally:
    evaluator.close()
  sync.pop("eval_seconds")
  assert background.pop("eval_seconds") > 0
  assert background == sync
  assert "novel_mask_AP" in sync


def test_background_worker_leaves_signals_to_the_training_process(
    fixed_batches):
  """Ctrl-C reaches the whole process group: the COCOeval worker ignores
  SIGINT and SIGTERM (the training process stops after a step, saved, and
  still collects its evaluations), so the pool keeps working."""
  evaluator = COCOEvaluator(annotation_file=None, run_in_background="process")
  try:
    for predictions, groundtruths in fixed_batches[:2]:
      evaluator.update(predictions, groundtruths)
    first = evaluator.evaluate_async().result(timeout=120)
    (pid,) = evaluator._executor._processes  # pylint: disable=protected-access
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)  # A worker that took them would be gone by now.
    second = evaluator.evaluate_async().result(timeout=120)
  finally:
    evaluator.close()
  first.pop("eval_seconds")
  second.pop("eval_seconds")
  assert second == first


def test_format_metrics_table(fixed_batches, val_annotation_file):
  _, metrics = _run(fixed_batches[:2], annotation_file=val_annotation_file,
                    mask_eval_class="voc")
  table = format_metrics_table(metrics)
  lines = table.splitlines()
  assert lines[0].split() == ["metric", "box", "mask", "novel_mask"]
  assert len(lines) == 1 + len(METRIC_NAMES) + 1
  ap_row = lines[1].split()
  assert ap_row[0] == "AP"
  assert float(ap_row[1]) == pytest.approx(metrics["AP"], abs=5e-5)
  assert float(ap_row[2]) == pytest.approx(metrics["mask_AP"], abs=5e-5)
  box_only = format_metrics_table({n: 0.5 for n in METRIC_NAMES})
  assert box_only.splitlines()[0].split() == ["metric", "box"]


def test_summarize_stats_equals_stock_summarize(fixed_batches,
                                                val_annotation_file,
                                                image_ids, tmp_path):
  path = tmp_path / "d.json"
  _run(fixed_batches, annotation_file=val_annotation_file,
       results_json_path=str(path), include_mask=False)
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = coco_api.COCO(val_annotation_file)
    e = cocoeval.COCOeval(coco_gt, coco_gt.loadRes(str(path)), "bbox")
    e.params.imgIds = image_ids
    e.evaluate()
    e.accumulate()
    e.summarize()
  np.testing.assert_array_equal(coco_evaluator.summarize_stats(e), e.stats)
