"""COCO box and mask evaluation of ShapeMask detections (reference §10).

`COCOEvaluator` accumulates batches of inference outputs (contract
"Inference" dict, with `image_info`) and eval-batch `groundtruths`, maps the
boxes back to original-image pixels, pastes the masks with the **outer**
boxes and RLE-encodes them (`mask_paste.paste_and_encode`, on worker
threads while the caller predicts the next batch) and runs pycocotools
`COCOeval` for `bbox` and `segm` (`fast_cocoeval`: pycocotools' numbers bit
for bit, with a faster matching loop and accumulation, split by category
over worker processes for large evaluations).

Metrics (dict of float): the 12 COCO numbers AP, AP50, AP75, APs, APm, APl,
ARmax1, ARmax10, ARmax100, ARs, ARm, ARl for boxes, the same prefixed
`mask_`, `eval_seconds`, and optionally

* per category: `<metric>_/<name>` and `mask_<metric>_/<name>`
  (`per_category_metrics=True`; NaN where the category has no ground truth);
* the cross-category (novel object) numbers `novel_mask_<metric>`: the
  nan-mean over the categories of one split (`mask_eval_class` 'voc' or
  'nonvoc') of the per-category mask metrics. They are computed from
  COCOeval's own `eval['precision']` / `eval['recall']` arrays, so stock
  pycocotools suffices (the reference needed a patched build). Unlike the
  reference, the full-category mask metrics are still reported as well.

Segm results are evaluated without their `bbox` field (as Detectron2 does),
so pycocotools measures a detection's size by its mask area for APs/APm/APl;
the results JSON written with `results_json_path` carries both fields, one
dict per detection.

`evaluate_async()` runs COCOeval in a background thread or a spawned
process and returns a `concurrent.futures.Future`. docs/benchmarks.md has
the evaluation's cost per stage at COCO scale (tools/bench/benchmark_eval.py).
"""
import collections
import concurrent.futures
import json
import multiprocessing
import os
import signal
import time
import warnings

import numpy as np

from official_shapemask.evaluation import class_splits
from official_shapemask.evaluation import coco_utils
from official_shapemask.evaluation import fast_cocoeval
from official_shapemask.evaluation import mask_paste

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1",
                "ARmax10", "ARmax100", "ARs", "ARm", "ARl")

# How stock `COCOeval.summarize()` derives each of the 12 numbers:
# (precision (True) or recall, IoU threshold or None for 0.5:0.95,
#  area range label, index into params.maxDets).
_STAT_SPECS = (
    (True, None, "all", 2), (True, 0.5, "all", 2), (True, 0.75, "all", 2),
    (True, None, "small", 2), (True, None, "medium", 2),
    (True, None, "large", 2),
    (False, None, "all", 0), (False, None, "all", 1), (False, None, "all", 2),
    (False, None, "small", 2), (False, None, "medium", 2),
    (False, None, "large", 2),
)

_BACKGROUND_MODES = (False, True, "thread", "process")
# Images whose masks may wait for the paste threads before `update` blocks
# (bounds the memory of queued masks), per thread.
_QUEUED_IMAGES_PER_THREAD = 4
# More paste threads than this gain little (they share the GIL between
# OpenCV / numpy calls).
_MAX_PASTE_THREADS = 8


def available_cpus():
  """The number of CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count() or 1


def summarize_stats(coco_eval, category_index=None, missing=-1.0):
  """The 12 summary numbers from an accumulated COCOeval's arrays.

  Identical to `COCOeval.summarize()` (mean over the entries > -1) for
  `category_index=None`, without its prints; with a category index, the same
  numbers restricted to that category.

  Args:
    coco_eval: `COCOeval` after `evaluate()` and `accumulate()`.
    category_index: optional int index into `coco_eval.params.catIds`.
    missing: value for a number without ground truth (COCO uses -1).

  Returns:
    float64 [12] in `METRIC_NAMES` order.
  """
  params = coco_eval.params
  precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
  recall = coco_eval.eval["recall"]  # [T, K, A, M]
  if category_index is not None:
    precision = precision[:, :, category_index:category_index + 1]
    recall = recall[:, category_index:category_index + 1]
  stats = np.full(len(_STAT_SPECS), missing, dtype=np.float64)
  for i, (is_ap, iou, area, det_index) in enumerate(_STAT_SPECS):
    a = list(params.areaRngLbl).index(area)
    values = (precision[..., a, det_index] if is_ap
              else recall[..., a, det_index])
    if iou is not None:
      values = values[np.where(np.isclose(params.iouThrs, iou))[0]]
    values = values[values > -1]
    if values.size:
      stats[i] = np.mean(values)
  return stats


def _category_names(coco_gt, cat_ids):
  names = {}
  for cat in coco_gt.loadCats(cat_ids):
    names[cat["id"]] = str(cat.get("name", cat["id"])).replace(" ", "_")
  return names


def run_coco_eval(job):
  """Runs COCOeval for one accumulated evaluation (picklable entry point).

  Args:
    job: dict with keys
      annotation_file: str or None;
      gt_dataset: dict {images, annotations, categories} when
        annotation_file is None;
      image_ids: list of int, the evaluated images;
      results: list of COCO result dicts (bbox, and segmentation when
        include_mask);
      include_mask, per_category_metrics: bool;
      mask_eval_class: 'all' | 'voc' | 'nonvoc';
      results_json_path: str or None;
      num_workers: int, optional (default 1), processes COCOeval may be
        split over (`fast_cocoeval`).

  Returns:
    dict of metric name -> float.
  """
  start = time.time()
  results = job["results"]
  if job.get("results_json_path"):
    path = job["results_json_path"]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "w") as f:
      json.dump(results, f)
    os.replace(tmp_path, path)

  if job["annotation_file"] is not None:
    coco_gt = coco_utils.load_coco_groundtruth(job["annotation_file"])
    missing = sorted(set(job["image_ids"]) - set(coco_gt.getImgIds()))
    if missing:
      raise ValueError(
          f"{len(missing)} evaluated image ids are not in annotation_file "
          f"{job['annotation_file']!r} (first: {missing[:5]}); the eval "
          "records and the annotation JSON do not match.")
  else:
    dataset = job["gt_dataset"]
    coco_gt = coco_utils.quiet_coco(dataset={
        "images": dataset["images"],
        # New dicts (COCOeval writes 'ignore' into them), masks PNG -> RLE.
        "annotations": coco_utils.decode_annotation_masks(
            dataset["images"], dataset["annotations"]),
        "categories": dataset["categories"],
    })

  metrics = {}
  # Each detection once as bbox result; COCO's loadRes adds keys in place.
  box_results = [{k: v for k, v in r.items() if k != "segmentation"}
                 for r in results]
  with fast_cocoeval.WorkerPool.for_results(
      len(results), job.get("num_workers", 1)) as pool:
    evals = {"": fast_cocoeval.evaluate(coco_gt, box_results,
                                        job["image_ids"], "bbox", pool)}
    if job["include_mask"]:
      mask_results = [{k: v for k, v in r.items() if k != "bbox"}
                      for r in results]
      evals["mask_"] = fast_cocoeval.evaluate(coco_gt, mask_results,
                                              job["image_ids"], "segm", pool)

  for prefix, coco_eval in evals.items():
    for name, value in zip(METRIC_NAMES, summarize_stats(coco_eval)):
      metrics[prefix + name] = float(value)

  if job["per_category_metrics"]:
    for prefix, coco_eval in evals.items():
      cat_ids = list(coco_eval.params.catIds)
      names = _category_names(coco_gt, cat_ids)
      for k, cat_id in enumerate(cat_ids):
        stats = summarize_stats(coco_eval, k, missing=np.nan)
        for name, value in zip(METRIC_NAMES, stats):
          metrics[f"{prefix}{name}_/{names[cat_id]}"] = float(value)

  split = job["mask_eval_class"]
  if split != "all" and job["include_mask"]:
    mask_eval = evals["mask_"]
    split_ids = set(class_splits.category_ids_for_split(split))
    per_category = np.array([
        summarize_stats(mask_eval, k, missing=np.nan)
        for k, cat_id in enumerate(mask_eval.params.catIds)
        if cat_id in split_ids
    ]).reshape(-1, len(METRIC_NAMES))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", category=RuntimeWarning)
      novel = np.nanmean(per_category, axis=0) if per_category.size else (
          np.full(len(METRIC_NAMES), np.nan))
    novel = np.where(np.isnan(novel), -1.0, novel)
    for name, value in zip(METRIC_NAMES, novel):
      metrics["novel_mask_" + name] = float(value)

  metrics["eval_seconds"] = float(time.time() - start)
  return metrics


def _image_results(record, image_id, boxes_xywh, classes, scores,
                   paste_args=None):
  """COCO result dicts of one image; pastes and encodes its masks if given."""
  segmentations = None
  if paste_args is not None:
    try:
      segmentations = mask_paste.paste_and_encode(*paste_args)
    except ValueError as e:
      raise ValueError(f"{record}: {e}") from e
  return coco_utils.detections_to_coco_results(image_id, boxes_xywh, classes,
                                               scores, segmentations)


class COCOEvaluator:
  """Accumulates ShapeMask detections and computes COCO box/mask metrics.

  Args:
    annotation_file: str or None (default). COCO instances JSON of the eval
      set. None: the ground truth is taken from the eval batches'
      `groundtruths` (boxes, classes, areas, crowd flags and `masks_png`).
    include_mask: bool, default True. Also evaluate `segm` (needs
      `detection_masks` and `detection_outer_boxes`).
    per_category_metrics: bool, default False. Add `<metric>_/<category>`
      keys for boxes and masks.
    mask_eval_class: 'all' (default), 'voc' or 'nonvoc'. With a split, also
      report `novel_mask_<metric>`: the mask metrics averaged over the
      split's categories only.
    results_json_path: str or None. Where `evaluate` writes the detections as
      a COCO results JSON (bbox and segmentation per detection).
    run_in_background: how `evaluate_async` runs COCOeval: False (default;
      on the calling thread, returning a finished Future), 'thread', or
      'process' / True (a spawned worker process: no GIL contention with the
      training thread).
    category_names: optional dict {category id: name} used for per-category
      keys when the ground truth comes from the eval batches (the JSON's
      names are used otherwise).
    num_workers: int or None (default: every available core). Threads that
      paste and encode masks while `update`'s caller goes on (at most 8),
      and processes that COCOeval is split over (by category, one per
      50,000 detections at most). 1: everything on the calling thread.
      Any value gives the same results.
  """

  def __init__(self,
               annotation_file=None,
               include_mask=True,
               per_category_metrics=False,
               mask_eval_class="all",
               results_json_path=None,
               run_in_background=False,
               category_names=None,
               num_workers=None):
    if mask_eval_class not in class_splits.SPLITS:
      raise ValueError(
          f"mask_eval_class {mask_eval_class!r} is not one of "
          f"{class_splits.SPLITS}.")
    if mask_eval_class != "all" and not include_mask:
      raise ValueError(
          f"mask_eval_class={mask_eval_class!r} reports mask metrics; it "
          "needs include_mask=True.")
    if run_in_background not in _BACKGROUND_MODES:
      raise ValueError(
          f"run_in_background {run_in_background!r} is not one of "
          f"{_BACKGROUND_MODES}.")
    if num_workers is not None and int(num_workers) < 1:
      raise ValueError(f"num_workers must be >= 1 or None, got {num_workers}.")
    if annotation_file is not None and not os.path.isfile(annotation_file):
      raise FileNotFoundError(
          f"annotation_file {annotation_file!r} does not exist.")
    self._annotation_file = annotation_file
    self._include_mask = bool(include_mask)
    self._per_category_metrics = bool(per_category_metrics)
    self._mask_eval_class = mask_eval_class
    self._results_json_path = results_json_path
    self._background = ("process" if run_in_background is True
                        else run_in_background)
    self._category_names = dict(category_names or {})
    self._num_workers = (available_cpus() if num_workers is None
                         else int(num_workers))
    self._paste_threads = min(self._num_workers, _MAX_PASTE_THREADS)
    self._executor = None
    self._paste_pool = None
    self.reset()

  @property
  def num_images(self):
    """Number of distinct images accumulated so far."""
    return len(self._image_ids)

  @property
  def num_duplicates(self):
    """Number of batch rows skipped because their image id was seen."""
    return self._num_duplicates

  def reset(self):
    """Forgets every accumulated image."""
    self._image_ids = []
    self._seen_ids = set()
    self._results = []
    # Per image, in update order: its result dicts, or a Future of them.
    self._pending = []
    self._in_flight = collections.deque()
    self._gt_images = []
    self._gt_annotations = []
    self._num_batches = 0
    self._num_duplicates = 0

  def update(self, predictions, groundtruths=None):
    """Accumulates one batch.

    Args:
      predictions: dict of arrays (numpy, or tensors convertible with
        `np.asarray`): `detection_boxes` [B, D, 4] and, with include_mask,
        `detection_outer_boxes` [B, D, 4] (canvas pixels, yxyx),
        `detection_classes` [B, D], `detection_scores` [B, D] (<= 0 marks a
        padded slot), `num_detections` [B] (optional),
        `detection_masks` [B, D, M, M] (outer-box frame probabilities) and
        `image_info` [B, 4, 2].
      groundtruths: dict of arrays in the eval-batch contract layout. Needs
        `source_id` (unless predictions carry it); with
        annotation_file=None also the boxes, classes, areas, is_crowds,
        num_detections, height, width and `masks_png`.
    """
    record = f"eval batch {self._num_batches}"
    self._num_batches += 1
    preds = {k: np.asarray(v) for k, v in predictions.items()}
    gts = ({k: np.asarray(v) for k, v in groundtruths.items()}
           if groundtruths is not None else {})
    required = ["detection_boxes", "detection_classes", "detection_scores",
                "image_info"]
    if self._include_mask:
      required += ["detection_masks", "detection_outer_boxes"]
    missing = [k for k in required if k not in preds]
    if missing:
      raise KeyError(
          f"{record}: predictions lack {missing} (image_info comes from the "
          "eval batch's labels['image_info']).")
    if "source_id" in gts:
      source_ids = gts["source_id"]
    elif "source_id" in preds:
      source_ids = preds["source_id"]
    else:
      raise KeyError(f"{record}: neither groundtruths nor predictions have "
                     "'source_id'.")
    if self._annotation_file is None:
      gt_missing = [k for k in ("boxes", "classes", "areas", "num_detections",
                                "height", "width") if k not in gts]
      if gt_missing:
        raise KeyError(
            f"{record}: groundtruths lack {gt_missing}, needed when no "
            "annotation_file is given.")

    image_info = preds["image_info"].astype(np.float64)
    boxes = coco_utils.boxes_to_original(preds["detection_boxes"], image_info)
    xywh = coco_utils.yxyx_to_xywh(boxes)
    if self._include_mask:
      outer = coco_utils.boxes_to_original(preds["detection_outer_boxes"],
                                           image_info)
    scores = preds["detection_scores"].astype(np.float64)
    classes = preds["detection_classes"]
    num_slots = scores.shape[1]
    num_dets = (preds["num_detections"].astype(np.int64)
                if "num_detections" in preds else
                np.full([scores.shape[0]], num_slots, np.int64))
    if "height" in gts and "width" in gts:
      heights = gts["height"].astype(np.int64)
      widths = gts["width"].astype(np.int64)
    else:
      heights = np.round(image_info[:, 0, 0]).astype(np.int64)
      widths = np.round(image_info[:, 0, 1]).astype(np.int64)

    for b in range(scores.shape[0]):
      row = f"{record} row {b}"
      image_id = coco_utils.parse_source_id(source_ids[b], row)
      if image_id == coco_utils.PADDED_SOURCE_ID:
        continue
      if image_id in self._seen_ids:
        self._num_duplicates += 1
        continue
      self._seen_ids.add(image_id)
      self._image_ids.append(image_id)

      keep = (np.arange(num_slots) < num_dets[b]) & (scores[b] > 0)
      # Boolean indexing copies: the caller may reuse its arrays.
      task = (row, image_id, xywh[b][keep], classes[b][keep],
              scores[b][keep],
              (preds["detection_masks"][b][keep], outer[b][keep],
               int(heights[b]), int(widths[b])) if self._include_mask
              else None)
      if self._include_mask and self._num_workers > 1:
        self._submit_paste(task)
      else:
        self._pending.append(_image_results(*task))

      if self._annotation_file is None:
        image, annotations = coco_utils.groundtruth_to_coco_annotations(
            gts, b, image_id, f"{row} (source_id {image_id})",
            self._include_mask, len(self._gt_annotations) + 1)
        self._gt_images.append(image)
        self._gt_annotations.extend(annotations)

  def _submit_paste(self, task):
    if self._paste_pool is None:
      self._paste_pool = concurrent.futures.ThreadPoolExecutor(
          max_workers=self._paste_threads, thread_name_prefix="coco_paste")
    future = self._paste_pool.submit(_image_results, *task)
    self._pending.append(future)
    self._in_flight.append(future)
    # Back-pressure: at most a few images per thread wait with their masks.
    while len(self._in_flight) > (self._paste_threads *
                                  _QUEUED_IMAGES_PER_THREAD):
      self._in_flight.popleft().result()

  def finish_updates(self):
    """Waits until every image given to `update` is pasted and encoded.

    Raises:
      ValueError: naming the eval batch row, for masks or boxes that cannot
        be pasted.
    """
    pending, self._pending = self._pending, []
    self._in_flight.clear()
    for item in pending:
      self._results.extend(item.result() if isinstance(
          item, concurrent.futures.Future) else item)

  def coco_results(self):
    """The COCO result dicts of every image so far (bbox, score, RLE)."""
    self.finish_updates()
    return list(self._results)

  def _make_job(self):
    self.finish_updates()
    if not self._image_ids:
      raise ValueError("COCOEvaluator.evaluate called before any update().")
    job = {
        "annotation_file": self._annotation_file,
        "gt_dataset": None,
        "image_ids": list(self._image_ids),
        "results": list(self._results),
        "include_mask": self._include_mask,
        "per_category_metrics": self._per_category_metrics,
        "mask_eval_class": self._mask_eval_class,
        "results_json_path": self._results_json_path,
        "num_workers": self._num_workers,
    }
    if self._annotation_file is None:
      category_ids = sorted({a["category_id"] for a in self._gt_annotations})
      job["gt_dataset"] = {
          "images": list(self._gt_images),
          "annotations": list(self._gt_annotations),
          "categories": [
              {"id": c, "name": str(self._category_names.get(c, c))}
              for c in category_ids],
      }
    return job

  def evaluate(self):
    """Runs COCOeval on everything accumulated; returns the metrics dict."""
    return run_coco_eval(self._make_job())

  def evaluate_async(self):
    """Starts `evaluate` off the calling thread.

    The accumulated state is snapshotted first, so `reset()` / `update()` may
    be called right away for the next evaluation.

    Returns:
      `concurrent.futures.Future` whose result is the metrics dict.
    """
    job = self._make_job()
    if not self._background:
      future = concurrent.futures.Future()
      try:
        future.set_result(run_coco_eval(job))
      except Exception as e:  # pylint: disable=broad-except
        future.set_exception(e)
      return future
    if self._executor is None:
      if self._background == "thread":
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="coco_eval")
      else:
        # spawn, not fork: forking a process that runs TensorFlow threads
        # can deadlock.
        self._executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_leave_signals_to_the_parent)
    return self._executor.submit(run_coco_eval, job)

  def close(self):
    """Shuts the background workers down (waits for running work)."""
    if self._executor is not None:
      self._executor.shutdown(wait=True)
      self._executor = None
    if self._paste_pool is not None:
      self._paste_pool.shutdown(wait=True)
      self._paste_pool = None


def _leave_signals_to_the_parent():
  """The COCOeval worker ignores SIGINT and SIGTERM.

  Ctrl-C (and a shutdown that signals the whole process group) reaches the
  worker too; the training process decides what a signal means (it stops
  after a step, saved, and still collects the evaluations under way), and
  shuts the worker down itself.
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def format_metrics_table(metrics):
  """The box / mask (/ novel mask) COCO numbers as a small text table.

  Args:
    metrics: dict from `COCOEvaluator.evaluate`.

  Returns:
    str, one row per metric name, one column per metric family present.
  """
  families = [(title, prefix) for title, prefix in
              (("box", ""), ("mask", "mask_"), ("novel_mask", "novel_mask_"))
              if any(prefix + n in metrics for n in METRIC_NAMES)]
  if not families:
    raise ValueError("metrics hold none of the COCO metric names.")
  width = max(10, *(len(t) + 2 for t, _ in families))
  lines = ["metric".ljust(10) + "".join(t.rjust(width) for t, _ in families)]
  for name in METRIC_NAMES:
    cells = []
    for _, prefix in families:
      value = metrics.get(prefix + name)
      cells.append(("-" if value is None else f"{value:.4f}").rjust(width))
    lines.append(name.ljust(10) + "".join(cells))
  if "eval_seconds" in metrics:
    lines.append(f"(COCOeval {metrics['eval_seconds']:.1f} s)")
  return "\n".join(lines)
