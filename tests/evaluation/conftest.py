"""Helpers shared by the evaluation tests: eval batches built from the JSON.

The eval-batch `groundtruths` and model-like `predictions` are built here
directly from coco_tiny160's annotation JSON with pycocotools (annToMask ->
PNG), in the contract's numpy layout, so these tests do not depend on the
eval parser.
"""
import types

import cv2
import numpy as np
import pytest
from pycocotools import coco as coco_api

from official_shapemask.evaluation import coco_utils
from official_shapemask.evaluation import mask_paste

MAX_INSTANCES = 100
CANVAS = 640
MASK_SIZE = 128


def crop_to_paste_frame(full_mask, outer_box_yxyx, mask_size=MASK_SIZE):
  """Samples a full-size mask into the m x m frame `paste_instance_masks` uses.

  The paste enlarges the outer box by (m + 2) / m, truncates it to integer
  pixels and stretches the padded (m + 2)^2 map over
  (x1 - x0 + 1) x (y1 - y0 + 1) pixels. This samples the mask on exactly that
  grid (4x supersampled, area-averaged) and drops the 1-pixel border, i.e. it
  is the crop whose paste reproduces the mask best.
  """

  ref = mask_paste._reference_boxes(
      np.asarray([outer_box_yxyx], np.float64), mask_size)[0]
  x0, y0, x1, y1 = (int(v) for v in ref)
  w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
  padded, sub = mask_size + 2, 4
  n = padded * sub
  affine = np.array([[w / n, 0.0, x0 - 0.5 + 0.5 * w / n],
                     [0.0, h / n, y0 - 0.5 + 0.5 * h / n]])
  fine = cv2.warpAffine(full_mask.astype(np.float32), affine, (n, n),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
  grid = fine.reshape(padded, sub, padded, sub).mean(axis=(1, 3))
  return grid[1:-1, 1:-1]


def outer_boxes(boxes, canvas=CANVAS):
  """1.25x boxes about their centres, clipped to the canvas ([N, 4] yxyx)."""
  boxes = np.asarray(boxes, np.float32)
  cy = (boxes[:, 0] + boxes[:, 2]) / 2
  cx = (boxes[:, 1] + boxes[:, 3]) / 2
  hh = (boxes[:, 2] - boxes[:, 0]) * 0.625
  hw = (boxes[:, 3] - boxes[:, 1]) * 0.625
  out = np.stack([cy - hh, cx - hw, cy + hh, cx + hw], axis=1)
  return np.clip(out, 0, canvas).astype(np.float32)


def image_info(coco, image_ids, canvas=CANVAS, offset=(0.0, 0.0)):
  """[B, 4, 2] image_info as the eval parser makes it (long side -> canvas)."""
  infos = []
  for image_id in image_ids:
    img = coco.imgs[image_id]
    scale = canvas / max(img["height"], img["width"])
    infos.append([[img["height"], img["width"]], [canvas, canvas],
                  [scale, scale], list(offset)])
  return np.asarray(infos, np.float32)


def groundtruths(coco, image_ids, batch_size):
  """Eval-batch `groundtruths` (contract layout); rows past the ids padded."""
  out = {
      "source_id": np.full([batch_size], -1, np.int64),
      "height": np.zeros([batch_size], np.int32),
      "width": np.zeros([batch_size], np.int32),
      "num_detections": np.zeros([batch_size], np.int32),
      "boxes": np.full([batch_size, MAX_INSTANCES, 4], -1, np.float32),
      "classes": np.full([batch_size, MAX_INSTANCES], -1, np.int32),
      "areas": np.full([batch_size, MAX_INSTANCES], -1, np.float32),
      "is_crowds": np.zeros([batch_size, MAX_INSTANCES], np.int32),
      "masks_png": np.full([batch_size, MAX_INSTANCES], b"", dtype=object),
  }
  for b, image_id in enumerate(image_ids):
    img = coco.imgs[image_id]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    out["source_id"][b] = image_id
    out["height"][b], out["width"][b] = img["height"], img["width"]
    out["num_detections"][b] = len(anns)
    for i, ann in enumerate(anns):
      x, y, w, h = ann["bbox"]
      out["boxes"][b, i] = [y, x, y + h, x + w]
      out["classes"][b, i] = ann["category_id"]
      out["areas"][b, i] = ann["area"]
      out["is_crowds"][b, i] = ann["iscrowd"]
      ok, png = cv2.imencode(".png", coco.annToMask(ann))
      assert ok
      out["masks_png"][b, i] = png.tobytes()
  return out


def predictions(coco, image_ids, detections, batch_size, canvas=CANVAS,
                offset=(0.0, 0.0)):
  """Model-like inference outputs from detections in original pixels.

  Args:
    detections: dict image_id -> list of (box_yxyx_original, class, score,
      full_size_mask or None) tuples.
  """
  info = np.zeros([batch_size, 4, 2], np.float32)
  info[:len(image_ids)] = image_info(coco, image_ids, canvas, offset)
  info[len(image_ids):] = [[1, 1], [canvas, canvas], [1, 1], [0, 0]]
  out = {
      "num_detections": np.zeros([batch_size], np.int32),
      "detection_boxes": np.zeros([batch_size, MAX_INSTANCES, 4], np.float32),
      "detection_outer_boxes": np.zeros([batch_size, MAX_INSTANCES, 4],
                                        np.float32),
      "detection_classes": np.zeros([batch_size, MAX_INSTANCES], np.int32),
      "detection_scores": np.full([batch_size, MAX_INSTANCES], -1.0,
                                  np.float32),
      "detection_masks": np.zeros(
          [batch_size, MAX_INSTANCES, MASK_SIZE, MASK_SIZE], np.float32),
      "image_info": info,
  }
  for b, image_id in enumerate(image_ids):
    dets = detections.get(image_id, [])
    assert len(dets) <= MAX_INSTANCES
    if not dets:
      continue
    n = len(dets)
    scale = info[b, 2, 0]
    orig = np.asarray([d[0] for d in dets], np.float64)
    canvas_boxes = (orig * scale - np.tile(info[b, 3], 2)).astype(np.float32)
    canvas_outer = outer_boxes(canvas_boxes, canvas)
    out["num_detections"][b] = n
    out["detection_boxes"][b, :n] = canvas_boxes
    out["detection_outer_boxes"][b, :n] = canvas_outer
    out["detection_classes"][b, :n] = [d[1] for d in dets]
    out["detection_scores"][b, :n] = [d[2] for d in dets]
    # The outer boxes exactly as the evaluator maps them back.
    orig_outer = coco_utils.boxes_to_original(canvas_outer[None],
                                              info[b:b + 1])[0]
    for i, det in enumerate(dets):
      if det[3] is not None:
        out["detection_masks"][b, i] = crop_to_paste_frame(det[3],
                                                           orig_outer[i])
  return out


def gt_detections(coco, image_ids):
  """Non-crowd ground truth as detections with score 1 (crowd is not fed)."""
  detections = {}
  for image_id in image_ids:
    dets = []
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
      if ann["iscrowd"]:
        continue
      x, y, w, h = ann["bbox"]
      dets.append(([y, x, y + h, x + w], ann["category_id"], 1.0,
                   coco.annToMask(ann)))
    detections[image_id] = dets
  return detections


def fixed_detections(coco, image_ids, seed=0):
  """Jittered, partly missed / mislabelled GT plus false positives."""
  rng = np.random.default_rng(seed)
  cat_ids = sorted(coco.getCatIds())
  detections = {}
  for image_id in image_ids:
    img = coco.imgs[image_id]
    height, width = img["height"], img["width"]
    dets = []
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
      if ann["iscrowd"] or rng.uniform() < 0.15:
        continue
      x, y, w, h = ann["bbox"]
      jitter = rng.normal(0.0, 0.08, size=4) * [h, w, h, w]
      box = np.array([y, x, y + h, x + w]) + jitter
      category = (ann["category_id"] if rng.uniform() > 0.1
                  else int(rng.choice(cat_ids)))
      mask = coco.annToMask(ann)
      if rng.uniform() < 0.3:
        mask = cv2.dilate(mask, np.ones((5, 5), np.uint8))
      dets.append((box, category, float(rng.uniform(0.05, 1.0)), mask))
    for _ in range(int(rng.integers(0, 4))):
      cy, cx = rng.uniform(0, height), rng.uniform(0, width)
      hh, hw = rng.uniform(5, height / 3), rng.uniform(5, width / 3)
      mask = np.zeros([height, width], np.uint8)
      cv2.ellipse(mask, (int(cx), int(cy)), (int(hw), int(hh)), 0, 0, 360, 1,
                  -1)
      dets.append((np.array([cy - hh, cx - hw, cy + hh, cx + hw]),
                   int(rng.choice(cat_ids)), float(rng.uniform(0.05, 1.0)),
                   mask))
    detections[image_id] = dets[:100]
  return detections


def batches(coco, image_ids, detections, batch_size=8, **kwargs):
  """Yields (predictions, groundtruths) per batch of `batch_size` images."""
  for start in range(0, len(image_ids), batch_size):
    ids = image_ids[start:start + batch_size]
    yield (predictions(coco, ids, detections, batch_size, **kwargs),
           groundtruths(coco, ids, batch_size))


@pytest.fixture(scope="session")
def val_annotation_file(coco_tiny_root):
  return str(coco_tiny_root / "annotations" / "instances_val2017.json")


@pytest.fixture(scope="session")
def val_coco(val_annotation_file):
  return coco_utils.quiet_coco(annotation_file=val_annotation_file)


@pytest.fixture(scope="session")
def evalkit():
  """The helper functions above, for the test modules (importlib mode)."""
  return types.SimpleNamespace(
      crop_to_paste_frame=crop_to_paste_frame, outer_boxes=outer_boxes,
      image_info=image_info, groundtruths=groundtruths,
      predictions=predictions, gt_detections=gt_detections,
      fixed_detections=fixed_detections, batches=batches,
      CANVAS=CANVAS, MASK_SIZE=MASK_SIZE)
