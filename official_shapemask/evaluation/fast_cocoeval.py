"""COCOeval of one iou type: pycocotools' numbers, bit for bit, sooner.

`evaluate(coco_gt, results, image_ids, iou_type, pool)` returns an
object with the two attributes the metric code reads from an accumulated
`pycocotools.cocoeval.COCOeval`: `params` (`catIds`, `iouThrs`, `areaRngLbl`,
`maxDets`, ...) and `eval` (`precision` [T, R, K, A, M], `recall`
[T, K, A, M], `scores`).

Three changes to stock pycocotools, none to its arithmetic (tests compare
every array byte for byte with stock COCOeval):

* `evaluate_image`: its per-image greedy matching on Python lists instead
  of element-wise numpy access, once per distinct set of ground-truth
  ignore flags rather than once per area range (pycocotools' own
  preparation, IoUs and loops around it);
* `accumulate`: its precision/recall accumulation with whole-array numpy;
* split by category: COCOeval treats every category on its own (matching
  per image and category, accumulation per category), so for large
  evaluations the categories are split into groups of similar work, each
  group is evaluated in a worker process with the ground truth and the
  detections of its categories (in their original order), and the
  per-category arrays are put back together (`WorkerPool`: one process per
  `MIN_RESULTS_PER_PROCESS` detections; smaller evaluations run on the
  calling thread). The workers are plain subprocesses
  (`cocoeval_worker`), so the caller's script is never imported again.
"""

import concurrent.futures
import contextlib
import datetime
import functools
import io
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
from pycocotools import coco as coco_api
from pycocotools import cocoeval

from official_shapemask.evaluation import coco_utils

# Below this many detections per process, starting processes costs more than
# it saves.
MIN_RESULTS_PER_PROCESS = 50_000

_LENGTH = struct.Struct(">Q")


def write_message(stream, obj):
  """Writes one length-prefixed pickle to a binary stream and flushes."""
  payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
  stream.write(_LENGTH.pack(len(payload)))
  stream.write(payload)
  stream.flush()


def read_message(stream):
  """Reads one length-prefixed pickle; None when the stream has ended."""
  header = stream.read(_LENGTH.size)
  if len(header) < _LENGTH.size:
    return None
  (size,) = _LENGTH.unpack(header)
  payload = stream.read(size)
  if len(payload) < size:
    return None
  return pickle.loads(payload)


class AccumulatedEval:
  """`params` and `eval` of an accumulated COCOeval (what the metrics read)."""

  def __init__(self, params, eval_dict):
    self.params = params
    self.eval = eval_dict


def _pycocotools(coco_gt, results, image_ids, iou_type, cat_ids=None):
  coco_dt = coco_utils.load_results(coco_gt, results)
  coco_eval = cocoeval.COCOeval(coco_gt, coco_dt, iouType=iou_type)
  coco_eval.params.imgIds = list(image_ids)
  if cat_ids is not None:
    coco_eval.params.catIds = list(cat_ids)
  # pycocotools' evaluate() (preparation, IoUs, the loop over images,
  # categories and areas) calls this instance's evaluateImg.
  coco_eval.evaluateImg = functools.partial(evaluate_image, coco_eval,
                                            cache={})
  with coco_utils.quiet():
    coco_eval.evaluate()
  accumulate(coco_eval)
  return coco_eval


def _prepared_pair(coco_eval, img_id, cat_id, gts, dts, max_det):
  """What the matching of one image and category needs, for every area."""
  # Stable sort by falling score: numpy's mergesort order.
  order = sorted(range(len(dts)), key=lambda i: -dts[i]["score"])[:max_det]
  dts = [dts[i] for i in order]
  ious = coco_eval.ious[img_id, cat_id]
  return {
      "dts": dts,
      "dt_ids": [d["id"] for d in dts],
      "dt_scores": [d["score"] for d in dts],
      # As Python floats: the same comparisons as with numpy's scalars
      # (segm areas are uint32), without their cost.
      "dt_areas": [float(d["area"]) for d in dts],
      # Rows: detections by score (as computeIoU keeps them); columns:
      # ground truths in their stored order.
      "rows": ious.tolist() if len(ious) else None,
      "gt_ids": [g["id"] for g in gts],
      "crowd": [int(g["iscrowd"]) for g in gts],
      "matches": {},
  }


def _greedy_matches(pair, ignored, thresholds):
  """pycocotools' greedy matching for one set of ground-truth ignore flags.

  Returns:
    (gt_order, dt_matches [T][D] gt ids, dt_ignore [T][D] 0/1, gt_matches
    [T][G] dt ids in gt_order).
  """
  num_g, num_d = len(ignored), len(pair["dts"])
  # Ground truths in use first, ignored ones last (stable, like mergesort).
  gt_order = sorted(range(num_g), key=lambda i: ignored[i])
  dt_matches = [[0] * num_d for _ in thresholds]
  dt_ignore = [[0] * num_d for _ in thresholds]
  gt_matches = [[0] * num_g for _ in thresholds]
  rows, crowd, gt_ids = pair["rows"], pair["crowd"], pair["gt_ids"]
  dt_ids = pair["dt_ids"]
  if rows is not None:
    for t_index, threshold in enumerate(thresholds):
      taken = [0] * num_g  # By stored index: the id of the matched dt.
      dt_taken, dt_ig = dt_matches[t_index], dt_ignore[t_index]
      start = min([threshold, 1 - 1e-10])
      for d_index in range(num_d):
        row = rows[d_index]
        best, match = start, -1
        for g in gt_order:
          # A matched ground truth is taken, unless it is a crowd region.
          if taken[g] > 0 and not crowd[g]:
            continue
          # Matched to one in use: the ignored ones that follow do not count.
          if match > -1 and ignored[match] == 0 and ignored[g] == 1:
            break
          if row[g] < best:
            continue
          best, match = row[g], g
        if match == -1:
          continue
        dt_ig[d_index] = ignored[match]
        dt_taken[d_index] = gt_ids[match]
        taken[match] = dt_ids[d_index]
      gt_matches[t_index] = [taken[g] for g in gt_order]
  return gt_order, dt_matches, dt_ignore, gt_matches


def evaluate_image(coco_eval, img_id, cat_id, area_rng, max_det, cache=None):
  """`COCOeval.evaluateImg` on Python lists: the same matches, sooner.

  pycocotools reads and writes numpy arrays one element at a time in its
  greedy matching loop, and sorts and matches again for each of the four
  area ranges; at COCO scale that is most of COCOeval. This runs the same
  loop, visiting detections and ground truths in the same order with the
  same comparisons of the same float64 values, on lists. With a `cache`
  (a dict, shared by the calls of one evaluate()), the score order of an
  image's detections is computed once, and the matching once per distinct
  set of ground-truth ignore flags (it depends on nothing else; the 'all'
  range and the range a ground truth falls in often share it).

  Args:
    coco_eval: `COCOeval` whose `evaluate()` is running (its `_gts`, `_dts`,
      `ious` and `params` are read).
    img_id, cat_id: the image and category.
    area_rng: [min, max] object area of the range.
    max_det: the most detections kept (highest scores).
    cache: optional dict for the work shared between area ranges.

  Returns:
    pycocotools' per-image dict (dtMatches, dtIgnore, gtIgnore, dtScores,
    ...), or None when the image has neither ground truth nor detections of
    the category.
  """
  # pylint: disable=protected-access
  gts = coco_eval._gts[img_id, cat_id]
  dts = coco_eval._dts[img_id, cat_id]
  if not gts and not dts:
    return None
  key = (img_id, cat_id, max_det)
  pair = cache.get(key) if cache is not None else None
  if pair is None:
    pair = _prepared_pair(coco_eval, img_id, cat_id, gts, dts, max_det)
    if cache is not None:
      cache[key] = pair
  low, high = area_rng
  ignored = tuple(1 if (g["ignore"] or g["area"] < low or g["area"] > high)
                  else 0 for g in gts)
  thresholds = coco_eval.params.iouThrs
  matched = pair["matches"].get(ignored)
  if matched is None:
    matched = _greedy_matches(pair, ignored, thresholds)
    pair["matches"][ignored] = matched
  gt_order, dt_matches, dt_ignore, gt_matches = matched
  num_t, num_g, num_d = len(thresholds), len(gt_order), len(pair["dts"])
  dt_matches = np.array(dt_matches, dtype=float).reshape(num_t, num_d)
  dt_ignore = np.array(dt_ignore, dtype=float).reshape(num_t, num_d)
  # Unmatched detections outside the area range are ignored.
  outside = np.array([a < low or a > high for a in pair["dt_areas"]]
                    ).reshape((1, num_d))
  dt_ignore = np.logical_or(dt_ignore, np.logical_and(
      dt_matches == 0, np.repeat(outside, num_t, 0)))
  return {
      "image_id": img_id, "category_id": cat_id, "aRng": area_rng,
      "maxDet": max_det, "dtIds": list(pair["dt_ids"]),
      "gtIds": [pair["gt_ids"][g] for g in gt_order],
      "dtMatches": dt_matches,
      "gtMatches": np.array(gt_matches, dtype=float).reshape(num_t, num_g),
      "dtScores": list(pair["dt_scores"]),
      "gtIgnore": np.array([ignored[g] for g in gt_order]),
      "dtIgnore": dt_ignore,
  }


def accumulate(coco_eval):
  """`COCOeval.accumulate()` with whole-array numpy: the same `eval` arrays.

  pycocotools' accumulate walks every image in Python once per category,
  area range and detection limit, and takes the precision envelope one
  detection at a time; at COCO scale that is a third of COCOeval. Here each
  category and area range gathers its images once (the smaller detection
  limits select by rank within the image, keeping pycocotools' order), all
  IoU thresholds go through one array expression (the same float
  operations, so the same bits), and the envelope is a running maximum from
  the right, which is what the loop computes.

  Args:
    coco_eval: `pycocotools.cocoeval.COCOeval` after `evaluate()`, with
      `useCats` on and the parameters it was evaluated with.

  Sets `coco_eval.eval` (precision, recall, scores and the rest) and returns
  it.
  """
  p = coco_eval.params
  if not p.useCats:
    raise ValueError("accumulate needs params.useCats = 1.")
  t_count, r_count = len(p.iouThrs), len(p.recThrs)
  k_count, a_count = len(p.catIds), len(p.areaRng)
  m_count, i_count = len(p.maxDets), len(p.imgIds)
  precision = -np.ones((t_count, r_count, k_count, a_count, m_count))
  recall = -np.ones((t_count, k_count, a_count, m_count))
  scores = -np.ones((t_count, r_count, k_count, a_count, m_count))
  rec_thrs = np.asarray(p.recThrs)
  for k in range(k_count):
    for a in range(a_count):
      first = (k * a_count + a) * i_count
      evals = [e for e in coco_eval.evalImgs[first:first + i_count]
               if e is not None]
      if not evals:
        continue
      gt_ignore = np.concatenate([e["gtIgnore"] for e in evals])
      npig = np.count_nonzero(gt_ignore == 0)
      if npig == 0:
        continue
      dt_scores = np.concatenate([e["dtScores"] for e in evals])
      rank = np.concatenate([np.arange(len(e["dtScores"])) for e in evals])
      dt_matches = np.concatenate([e["dtMatches"] for e in evals], axis=1)
      dt_ignore = np.concatenate([e["dtIgnore"] for e in evals], axis=1)
      for m, max_det in enumerate(p.maxDets):
        within = rank < max_det
        order = np.argsort(-dt_scores[within], kind="mergesort")
        sorted_scores = dt_scores[within][order]
        dtm = dt_matches[:, within][:, order]
        dt_ig = dt_ignore[:, within][:, order]
        tps = np.logical_and(dtm, np.logical_not(dt_ig))
        fps = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig))
        tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
        fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
        num = tp_sum.shape[1]
        rc = tp_sum / npig
        pr = tp_sum / (fp_sum + tp_sum + np.spacing(1))
        recall[:, k, a, m] = rc[:, -1] if num else 0
        envelope = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
        for t in range(t_count):
          at = np.searchsorted(rc[t], rec_thrs, side="left")
          hit = at < num
          q = np.zeros(r_count)
          ss = np.zeros(r_count)
          q[hit] = envelope[t, at[hit]]
          ss[hit] = sorted_scores[at[hit]]
          precision[t, :, k, a, m] = q
          scores[t, :, k, a, m] = ss
  coco_eval.eval = {
      "params": p, "counts": [t_count, r_count, k_count, a_count, m_count],
      "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
      "precision": precision, "recall": recall, "scores": scores}
  return coco_eval.eval


def category_groups(cat_ids, weights, num_groups):
  """Splits categories into `num_groups` groups of similar total weight.

  Args:
    cat_ids: sorted list of int category ids.
    weights: dict id -> work estimate (ground truths + detections).
    num_groups: int >= 1.

  Returns:
    list of sorted id lists (none empty; at most `num_groups`).
  """
  groups = [[] for _ in range(max(1, min(num_groups, len(cat_ids))))]
  loads = [0] * len(groups)
  # Heaviest first onto the lightest group; ties by id keep it deterministic.
  for cat_id in sorted(cat_ids, key=lambda c: (-weights.get(c, 0), c)):
    g = loads.index(min(loads))
    groups[g].append(cat_id)
    loads[g] += weights.get(cat_id, 0) + 1
  return [sorted(g) for g in groups if g]


def evaluate_group(task):
  """pycocotools on the categories of one group (what a worker runs).

  Args:
    task: dict with `gt_dataset` (COCO ground-truth dict), `results`,
      `image_ids`, `iou_type` and `cat_ids` (the group).

  Returns:
    dict: `cat_ids` and the accumulated `precision`, `recall`, `scores`.
  """
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = coco_api.COCO()
    coco_gt.dataset = task["gt_dataset"]
    coco_gt.createIndex()
    coco_eval = _pycocotools(coco_gt, task["results"], task["image_ids"],
                             task["iou_type"], task["cat_ids"])
  return {"cat_ids": list(coco_eval.params.catIds),
          **{k: coco_eval.eval[k] for k in ("precision", "recall", "scores")}}


class WorkerPool:
  """Worker processes for `evaluate`, shared by its calls.

  Use as a context manager; the processes start on the first evaluation
  that needs them and stop on exit. They are plain subprocesses running
  `cocoeval_worker` (not multiprocessing's spawn, which would import the
  caller's `__main__` again, nor fork, which is unsafe beside TensorFlow's
  threads). `size` 1 is no pool at all.
  """

  def __init__(self, size):
    self.size = max(1, int(size))
    self._procs = []

  @classmethod
  def for_results(cls, num_results, num_workers):
    """A pool of one process per `MIN_RESULTS_PER_PROCESS` detections, at
    most `num_workers` (starting a process costs about a second of CPU)."""
    return cls(workers_for(num_results, num_workers))

  def _start(self):
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    path = [package_parent] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    self._procs = [
        subprocess.Popen(
            [sys.executable, "-m", "official_shapemask.evaluation."
             "cocoeval_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env)
        for _ in range(self.size)]

  def run(self, tasks):
    """`evaluate_group` of each task, over the workers; results in order.

    Raises:
      RuntimeError: a task failed (with the worker's traceback) or a worker
        process ended.
    """
    if not self._procs:
      self._start()
    results = [None] * len(tasks)

    def serve(w):
      proc = self._procs[w]
      for i in range(w, len(tasks), len(self._procs)):
        write_message(proc.stdin, tasks[i])
        answer = read_message(proc.stdout)
        if answer is None:
          raise RuntimeError(f"a COCOeval worker process ended (exit status "
                             f"{proc.wait()})")
        status, value = answer
        if status != "ok":
          raise RuntimeError(f"a COCOeval worker failed:\n{value}")
        results[i] = value

    with concurrent.futures.ThreadPoolExecutor(len(self._procs)) as threads:
      for future in [threads.submit(serve, w)
                     for w in range(len(self._procs))]:
        future.result()
    return results

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    for proc in self._procs:
      try:
        proc.stdin.close()
      except OSError:
        pass
    for proc in self._procs:
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      proc.stdout.close()
    self._procs = []


def _by_category(coco_gt, results, image_ids, iou_type, pool):
  """pycocotools split by category over the processes of `pool`."""
  all_cats = sorted(coco_gt.getCatIds())
  gt_anns = coco_gt.dataset["annotations"]
  weights = {}
  for item in list(gt_anns) + list(results):
    weights[item["category_id"]] = weights.get(item["category_id"], 0) + 1
  groups = category_groups(all_cats, weights, pool.size)
  tasks = []
  for group in groups:
    members = set(group)
    tasks.append({
        "gt_dataset": {
            "images": coco_gt.dataset["images"],
            "categories": coco_gt.dataset["categories"],
            "annotations": [a for a in gt_anns
                            if a["category_id"] in members]},
        "results": [r for r in results if r["category_id"] in members],
        "image_ids": list(image_ids), "iou_type": iou_type, "cat_ids": group,
    })
  parts = pool.run(tasks)

  params = cocoeval.Params(iouType=iou_type)
  params.imgIds = sorted(set(image_ids))
  params.catIds = all_cats
  t, r = len(params.iouThrs), len(params.recThrs)
  a, m = len(params.areaRng), len(params.maxDets)
  merged = {"precision": -np.ones([t, r, len(all_cats), a, m]),
            "recall": -np.ones([t, len(all_cats), a, m]),
            "scores": -np.ones([t, r, len(all_cats), a, m])}
  column = {c: k for k, c in enumerate(all_cats)}
  for part in parts:
    ks = [column[c] for c in part["cat_ids"]]
    merged["precision"][:, :, ks] = part["precision"]
    merged["recall"][:, ks] = part["recall"]
    merged["scores"][:, :, ks] = part["scores"]
  return AccumulatedEval(params, merged)


def workers_for(num_results, num_workers):
  """How many processes a COCOeval of `num_results` detections uses."""
  if not num_workers or num_workers <= 1:
    return 1
  return int(max(1, min(num_workers, num_results // MIN_RESULTS_PER_PROCESS)))


def evaluate(coco_gt, results, image_ids, iou_type, pool=None):
  """Evaluates and accumulates one iou type (see the module docstring).

  Args:
    coco_gt: `pycocotools.coco.COCO` ground truth.
    results: list of COCO result dicts; loading them adds keys (area, id)
      to the dicts, so pass dicts of your own.
    image_ids: list of int, the evaluated images.
    iou_type: 'bbox' or 'segm'.
    pool: optional `WorkerPool`; with more than one process, the
      categories are split over them.

  Returns:
    an accumulated evaluation with `params` and `eval`.
  """
  if pool is not None and pool.size > 1 and len(coco_gt.getCatIds()) > 1:
    return _by_category(coco_gt, results, image_ids, iou_type, pool)
  return _pycocotools(coco_gt, results, image_ids, iou_type)
