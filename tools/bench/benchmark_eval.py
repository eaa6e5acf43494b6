r"""Seconds per stage of COCO evaluation at COCO scale (synthetic data).

Builds a synthetic COCO-like evaluation set and feeds it to
`official_shapemask.evaluation.COCOEvaluator` exactly as the training loop
does, timing each stage:

- `paste_encode`: `COCOEvaluator.update` on every batch: outer-box masks
  pasted into the image, RLE-encoded, turned into COCO result dicts (the
  synthetic batches are made before the clock starts);
- `cocoeval`: `COCOEvaluator.evaluate`: `bbox` and `segm` COCOeval
  (load results, evaluate, accumulate, the 24 numbers).

The data: `--num_images` images of `--image_height` x `--image_width`, each
with `--gt_per_image` ground-truth objects on average (COCO val2017 has
7.3; polygons, random COCO categories, box sizes log-uniform between 8 px and
the image side) and exactly `--detections_per_image` detections with
`--mask_size` squared masks (smooth blobs in the outer-box frame); about
half of the detections overlap a ground-truth object, so the metrics are
neither 0 nor 1. Everything is seeded.

`--baseline` also runs the previous path on the same data (each mask pasted
into a full-size image and RLE-encoded from there, on the calling thread;
stock pycocotools COCOeval on one process), checks that the RLEs are
identical and the metrics equal, and reports both.

Reports wall seconds and CPU seconds (this process and its worker
processes; on a busy machine the CPU seconds say more about the work than
the wall time does). Prints a table and one JSON line. Example (the
measurement of docs/benchmarks.md):

  python -m tools.bench.benchmark_eval --num_images=500 --baseline
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np

from official_shapemask.evaluation import class_splits


def _blob(size, rng):
  """A smooth [size, size] probability map: an ellipse-like blob."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
  # The tight box is the central 80% of the outer box (1.25x).
  cy, cx = rng.uniform(0.4, 0.6, 2)
  ry, rx = rng.uniform(0.2, 0.42, 2)
  angle = rng.uniform(0, np.pi)
  dy, dx = yy - cy, xx - cx
  u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
  v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
  wobble = 0.15 * np.sin(rng.integers(2, 6) * np.arctan2(v, u) +
                         rng.uniform(0, 2 * np.pi))
  radius = np.sqrt(u * u + v * v)
  return (1.0 / (1.0 + np.exp(12.0 * (radius - 1.0 - wobble)))).astype(
      np.float32)


def _random_boxes(rng, n, height, width):
  """[n, 4] yxyx boxes, sides log-uniform in [8, image side], inside the image."""
  side = np.exp(rng.uniform(np.log(8), np.log(min(height, width)), [n, 2]))
  aspect = np.exp(rng.uniform(-0.7, 0.7, n))
  h = np.minimum(side[:, 0] * aspect, height - 1)
  w = np.minimum(side[:, 1] / aspect, width - 1)
  y0 = rng.uniform(0, height - 1 - h)
  x0 = rng.uniform(0, width - 1 - w)
  return np.stack([y0, x0, y0 + h, x0 + w], axis=1)


def _ellipse_polygon(box, rng, vertices=16):
  y0, x0, y1, x1 = box
  t = np.sort(rng.uniform(0, 2 * np.pi, vertices))
  r = rng.uniform(0.8, 1.0, vertices)
  ys = (y0 + y1) / 2 + (y1 - y0) / 2 * r * np.sin(t)
  xs = (x0 + x1) / 2 + (x1 - x0) / 2 * r * np.cos(t)
  return [float(v) for pair in zip(xs, ys) for v in pair]


def _polygon_area(flat):
  xs, ys = np.asarray(flat[0::2]), np.asarray(flat[1::2])
  return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) -
                         np.dot(ys, np.roll(xs, 1))))


def synthetic_groundtruth(num_images, height, width, gt_per_image, seed):
  """A COCO instances dict of polygon annotations (see the module docstring).

  Returns:
    dict with 'images', 'annotations', 'categories'.
  """
  rng = np.random.default_rng(seed)
  categories = list(class_splits.COCO_CATEGORY_IDS)
  images, annotations = [], []
  for image_id in range(1, num_images + 1):
    images.append({"id": image_id, "height": height, "width": width,
                   "file_name": f"{image_id:012d}.jpg"})
    count = max(1, int(rng.poisson(gt_per_image)))
    for box in _random_boxes(rng, count, height, width):
      polygon = _ellipse_polygon(box, rng)
      annotations.append({
          "id": len(annotations) + 1, "image_id": image_id,
          "category_id": int(rng.choice(categories)),
          "bbox": [float(box[1]), float(box[0]), float(box[3] - box[1]),
                   float(box[2] - box[0])],
          "segmentation": [polygon], "area": _polygon_area(polygon),
          "iscrowd": 0})
  return {"images": images, "annotations": annotations,
          "categories": [{"id": c, "name": f"class_{c}"} for c in categories]}


def synthetic_batches(groundtruth, detections_per_image, mask_size,
                      batch_size, seed, num_blobs=64):
  """Evaluator inputs for every image of `groundtruth`, batch by batch.

  Yields:
    (predictions, groundtruths) dicts in the layout `COCOEvaluator.update`
    takes (canvas = the image's long side, scale 1).
  """
  rng = np.random.default_rng(seed + 1)
  blobs = np.stack([_blob(mask_size, rng) for _ in range(num_blobs)])
  by_image = {}
  for ann in groundtruth["annotations"]:
    by_image.setdefault(ann["image_id"], []).append(ann)
  categories = np.asarray(class_splits.COCO_CATEGORY_IDS)
  images = groundtruth["images"]
  d = detections_per_image
  for first in range(0, len(images), batch_size):
    chunk = images[first:first + batch_size]
    b = len(chunk)
    boxes = np.zeros([b, d, 4], np.float32)
    classes = np.zeros([b, d], np.int32)
    info = np.zeros([b, 4, 2], np.float32)
    for i, image in enumerate(chunk):
      height, width = image["height"], image["width"]
      canvas = max(height, width)
      info[i] = [[height, width], [canvas, canvas], [1, 1], [0, 0]]
      gts = by_image.get(image["id"], [])
      boxes[i] = _random_boxes(rng, d, height, width)
      # A detector repeats a few classes per image: the image's own and
      # three others.
      candidates = np.unique(np.concatenate([
          [g["category_id"] for g in gts], rng.choice(categories, 3)]))
      classes[i] = rng.choice(candidates, d)
      # About half the detections: a jittered ground-truth box, mostly of
      # the right class.
      near = np.flatnonzero(rng.uniform(size=d) < 0.5) if gts else []
      for k in near:
        gt = gts[rng.integers(len(gts))]
        x, y, w, h = gt["bbox"]
        jitter = rng.normal(0, 0.1, 4) * [h, w, h, w]
        boxes[i, k] = np.array([y, x, y + h, x + w]) + jitter
        if rng.uniform() < 0.9:
          classes[i, k] = gt["category_id"]
      boxes[i] = np.clip(boxes[i], 0, [height - 1, width - 1] * 2)
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    half = (boxes[..., 2:] - boxes[..., :2]) * 0.625
    canvas = info[:, 1, :1][:, None, :]  # [b, 1, 1]
    outer = np.clip(np.concatenate([centre - half, centre + half], -1), 0,
                    canvas)
    predictions = {
        "detection_boxes": boxes,
        "detection_outer_boxes": outer.astype(np.float32),
        "detection_classes": classes,
        "detection_scores": np.sort(rng.uniform(0.05, 1.0, [b, d]),
                                    axis=1)[:, ::-1].astype(np.float32),
        "num_detections": np.full([b], d, np.int32),
        "detection_masks": blobs[rng.integers(num_blobs, size=[b, d])],
        "image_info": info,
    }
    groundtruths = {"source_id": np.array([im["id"] for im in chunk]),
                    "height": info[:, 0, 0].astype(np.int32),
                    "width": info[:, 0, 1].astype(np.int32)}
    yield predictions, groundtruths


def _old_paste_and_encode(masks, outer_boxes_yxyx, image_height,
                          image_width):
  """The previous path: full-size [H, W, N] masks, then pycocotools' encoder."""
  # pylint: disable=g-import-not-at-top
  from official_shapemask.evaluation import coco_utils
  from official_shapemask.evaluation import mask_paste
  return coco_utils.encode_binary_masks(mask_paste.paste_instance_masks_hwn(
      masks, outer_boxes_yxyx, image_height, image_width))


def _stock_cocoeval(coco_gt, results, image_ids, iou_type, pool=None):
  """The previous COCOeval: stock pycocotools on the calling thread."""
  # pylint: disable=g-import-not-at-top
  from pycocotools import cocoeval
  from official_shapemask.evaluation import coco_utils
  del pool  # One process.
  coco_eval = cocoeval.COCOeval(
      coco_gt, coco_utils.load_results(coco_gt, results), iouType=iou_type)
  coco_eval.params.imgIds = list(image_ids)
  with coco_utils.quiet():
    coco_eval.evaluate()
    coco_eval.accumulate()
  return coco_eval


def _cpu_seconds():
  """CPU time of this process and its finished child processes."""
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return (own.ru_utime + own.ru_stime + children.ru_utime +
          children.ru_stime)


def run_evaluation(groundtruth, annotation_file, args, num_workers,
                   previous=False):
  """Feeds the synthetic batches to a COCOEvaluator; times each stage.

  Returns:
    (stage seconds dict, stage CPU seconds dict, metrics dict, list of COCO
    results).
  """
  # pylint: disable=g-import-not-at-top
  from unittest import mock
  from official_shapemask.evaluation import coco_evaluator
  from official_shapemask.evaluation import fast_cocoeval
  from official_shapemask.evaluation import mask_paste
  evaluator = coco_evaluator.COCOEvaluator(annotation_file=annotation_file,
                                           num_workers=num_workers)
  patch = contextlib.ExitStack()
  if previous:  # The code this benchmark replaced, on the same data.
    patch.enter_context(mock.patch.object(mask_paste, "paste_and_encode",
                                          _old_paste_and_encode))
    patch.enter_context(mock.patch.object(fast_cocoeval, "evaluate",
                                          _stock_cocoeval))
  paste_seconds = paste_cpu = 0.0
  with patch:
    for predictions, groundtruths in synthetic_batches(
        groundtruth, args.detections_per_image, args.mask_size,
        args.batch_size, args.seed):
      start, cpu = time.perf_counter(), _cpu_seconds()
      evaluator.update(predictions, groundtruths)
      paste_seconds += time.perf_counter() - start
      paste_cpu += _cpu_seconds() - cpu
    start, cpu = time.perf_counter(), _cpu_seconds()
    evaluator.finish_updates()
    paste_seconds += time.perf_counter() - start
    paste_cpu += _cpu_seconds() - cpu
    results = evaluator.coco_results()
    start, cpu = time.perf_counter(), _cpu_seconds()
    metrics = evaluator.evaluate()
    cocoeval_seconds = time.perf_counter() - start
    cocoeval_cpu = _cpu_seconds() - cpu
  evaluator.close()
  return ({"paste_encode": paste_seconds, "cocoeval": cocoeval_seconds,
           "total": paste_seconds + cocoeval_seconds},
          {"paste_encode": paste_cpu, "cocoeval": cocoeval_cpu,
           "total": paste_cpu + cocoeval_cpu}, metrics, results)


def time_faster_coco_eval(annotation_file, results, image_ids):
  """faster-coco-eval (if installed) on the same results: seconds, 24 numbers."""
  # pylint: disable=g-import-not-at-top
  from faster_coco_eval import COCO as FasterCOCO
  from faster_coco_eval import COCOeval_faster
  from official_shapemask.evaluation import coco_evaluator
  start = time.perf_counter()
  numbers = {}
  gt = FasterCOCO(annotation_file)
  for prefix, iou_type, drop in (("", "bbox", "segmentation"),
                                 ("mask_", "segm", "bbox")):
    dt = gt.loadRes([{k: v for k, v in r.items() if k != drop}
                     for r in results])
    evaluation = COCOeval_faster(gt, dt, iouType=iou_type,
                                 print_function=lambda *a, **k: None)
    evaluation.params.imgIds = list(image_ids)
    evaluation.evaluate()
    evaluation.accumulate()
    for name, value in zip(coco_evaluator.METRIC_NAMES,
                           coco_evaluator.summarize_stats(evaluation)):
      numbers[prefix + name] = float(value)
  return time.perf_counter() - start, numbers


def _parse_args(argv):
  # pylint: disable=g-import-not-at-top
  from official_shapemask.evaluation import coco_evaluator
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=500)
  parser.add_argument("--detections_per_image", type=int, default=100)
  parser.add_argument("--image_height", type=int, default=480)
  parser.add_argument("--image_width", type=int, default=640)
  parser.add_argument("--mask_size", type=int, default=128)
  parser.add_argument("--gt_per_image", type=float, default=7.3,
                      help="mean ground-truth objects per image")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
      "--num_workers", type=int, default=None,
      help="COCOEvaluator num_workers (default: every available core)")
  parser.add_argument(
      "--baseline", action="store_true",
      help="also run the previous path (full-size paste, one process) and "
      "check that RLEs and metrics are identical")
  parser.add_argument(
      "--faster_coco_eval", action="store_true",
      help="also time the faster-coco-eval package's COCOeval on the same "
      "results and compare its 24 numbers (needs the package)")
  args = parser.parse_args(argv)
  for name in ("num_images", "detections_per_image", "image_height",
               "image_width", "mask_size", "batch_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be >= 1")
  if args.num_workers is None:
    args.num_workers = coco_evaluator.available_cpus()
  elif args.num_workers < 1:
    parser.error("--num_workers must be >= 1")
  return args


def main(argv=None):
  args = _parse_args(argv)
  groundtruth = synthetic_groundtruth(args.num_images, args.image_height,
                                      args.image_width, args.gt_per_image,
                                      args.seed)
  summary = {
      "benchmark": "coco_eval", "num_images": args.num_images,
      "detections_per_image": args.detections_per_image,
      "image_size": [args.image_height, args.image_width],
      "mask_size": args.mask_size,
      "gt_per_image": round(len(groundtruth["annotations"]) /
                            args.num_images, 2),
      "num_workers": args.num_workers,
  }
  with tempfile.TemporaryDirectory() as tmp:
    annotation_file = os.path.join(tmp, "instances_synthetic.json")
    with open(annotation_file, "w") as f:
      json.dump(groundtruth, f)
    seconds, cpu, metrics, results = run_evaluation(
        groundtruth, annotation_file, args, args.num_workers)
    summary["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    summary["cpu_seconds"] = {k: round(v, 2) for k, v in cpu.items()}
    summary["mask_AP"], summary["box_AP"] = metrics["mask_AP"], metrics["AP"]
    rows = [("this code", seconds, cpu)]
    if args.baseline:
      old_seconds, old_cpu, old_metrics, old_results = run_evaluation(
          groundtruth, annotation_file, args, 1, previous=True)
      summary["baseline_seconds"] = {k: round(v, 2)
                                     for k, v in old_seconds.items()}
      summary["baseline_cpu_seconds"] = {k: round(v, 2)
                                         for k, v in old_cpu.items()}
      summary["identical_rles"] = old_results == results
      summary["identical_metrics"] = all(
          old_metrics[k] == metrics[k] for k in metrics
          if k != "eval_seconds")
      rows.append(("previous", old_seconds, old_cpu))
    if args.faster_coco_eval:
      faster_seconds, numbers = time_faster_coco_eval(
          annotation_file, results, [im["id"] for im in groundtruth["images"]])
      summary["faster_coco_eval_cocoeval_seconds"] = round(faster_seconds, 2)
      summary["faster_coco_eval_max_abs_difference"] = max(
          abs(numbers[k] - metrics[k]) for k in numbers)
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  summary.update({
      "load_average_1min": round(load[0], 2) if load else None,
      "machine_cores": os.cpu_count(), "processor": platform.processor(),
      "python": platform.python_version(),
      "date": datetime.date.today().isoformat()})

  per_image = 1000.0 / args.num_images
  print(f"{args.num_images} images of {args.image_height}x{args.image_width}, "
        f"{args.detections_per_image} detections each ({args.mask_size}x"
        f"{args.mask_size} masks), {summary['gt_per_image']} ground truths "
        f"per image; mask AP {metrics['mask_AP']:.3f}, box AP "
        f"{metrics['AP']:.3f}")
  print("seconds (wall), with CPU seconds (all processes) in brackets; the "
        "last column scales the total to 5,000 images")
  print(f"{'path':<22}{'paste+encode':>18}{'ms/image':>10}"
        f"{'COCOeval':>18}{'total':>18}{'5,000 images':>14}")
  for name, stage, used in rows:
    print(f"{name:<22}"
          f"{stage['paste_encode']:>9.2f} ({used['paste_encode']:>6.2f})"
          f"{stage['paste_encode'] * per_image:>10.1f}"
          f"{stage['cocoeval']:>9.2f} ({used['cocoeval']:>6.2f})"
          f"{stage['total']:>9.2f} ({used['total']:>6.2f})"
          f"{stage['total'] * 5000 / args.num_images / 60:>10.1f} min")
  if args.baseline:
    print(f"identical RLEs: {summary['identical_rles']}, identical metrics: "
          f"{summary['identical_metrics']}")
  if args.faster_coco_eval:
    print(f"faster-coco-eval COCOeval: "
          f"{summary['faster_coco_eval_cocoeval_seconds']:.2f} s, largest "
          f"difference in the 24 numbers "
          f"{summary['faster_coco_eval_max_abs_difference']:.3g}")
  print(json.dumps(summary))
  if args.baseline and not (summary["identical_rles"] and
                            summary["identical_metrics"]):
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
