"""Conversions between model outputs / eval batches and COCO structures.

Host-side helpers (numpy, OpenCV, pycocotools) used by `COCOEvaluator`:

* image ids: `parse_source_id` turns an `image/source_id` (int or decimal
  string) into the integer COCO image id, with an error naming the record
  otherwise (reference pitfall §13.14);
* boxes: canvas -> original image pixels with `image_info`, yxyx -> COCO xywh;
* detections -> COCO results (`bbox` xywh in original pixels, `segmentation`
  as compressed RLE of the pasted mask, JSON-serialisable);
* ground truth -> an in-memory `pycocotools.coco.COCO`, either from the
  annotation JSON or from the `groundtruths` of the eval batches (contract
  layout; `masks_png` decoded to RLE, crowd regions as iscrowd=1 RLE).

Box format of the inputs: [ymin, xmin, ymax, xmax] float pixels.
"""
import contextlib
import io
import os
import threading

import cv2
import numpy as np
from pycocotools import coco as coco_api
from pycocotools import mask as mask_api

# The padding marker of `source_id` for images that pad a partial batch.
PADDED_SOURCE_ID = -1


def parse_source_id(value, record):
  """Returns the integer COCO image id of one eval record.

  Args:
    value: the record's `source_id`: an integer, or a decimal string / bytes
      (as stored in `image/source_id`).
    record: str naming the record in error messages.

  Returns:
    int >= 0, or `PADDED_SOURCE_ID` (-1) for a padded batch row.

  Raises:
    ValueError: if the id is not a decimal integer, or is negative other than
      the -1 padding marker.
  """
  raw = value
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    value = value.decode("utf-8", errors="replace")
  if isinstance(value, (str, np.str_)):
    text = value.strip()
    if not text.lstrip("-").isdigit():
      raise ValueError(
          f"{record}: image/source_id {raw!r} is not a decimal integer. COCO "
          "evaluation needs integer image ids; write numeric source ids when "
          "converting the dataset (e.g. the COCO image id).")
    value = int(text)
  elif isinstance(value, (float, np.floating)):
    if not float(value).is_integer():
      raise ValueError(
          f"{record}: image/source_id {raw!r} is not an integer.")
    value = int(value)
  elif isinstance(value, (int, np.integer)):
    value = int(value)
  else:
    raise ValueError(
        f"{record}: image/source_id {raw!r} of type {type(raw).__name__} is "
        "not an integer id.")
  if value < 0 and value != PADDED_SOURCE_ID:
    raise ValueError(
        f"{record}: image/source_id {raw!r} is negative; only "
        f"{PADDED_SOURCE_ID} (padded batch row) is allowed.")
  return value


def boxes_to_original(boxes, image_info):
  """Maps canvas boxes to original-image pixels: (box + offset) / scale.

  Args:
    boxes: float [B, N, 4] yxyx in canvas pixels.
    image_info: float [B, 4, 2], rows [[orig_h, orig_w], [S, S],
      [scale_y, scale_x], [offset_y, offset_x]].

  Returns:
    float64 [B, N, 4] yxyx in original-image pixels.
  """
  boxes = np.asarray(boxes, dtype=np.float64)
  info = np.asarray(image_info, dtype=np.float64)
  if info.ndim != 3 or info.shape[1:] != (4, 2):
    raise ValueError(f"image_info must be [B, 4, 2], got {info.shape}.")
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != info.shape[0]:
    raise ValueError(
        f"boxes must be [B, N, 4] with B = {info.shape[0]}, got {boxes.shape}.")
  scale = np.tile(info[:, 2, :], 2)[:, None, :]  # [B, 1, 4] (sy, sx, sy, sx)
  offset = np.tile(info[:, 3, :], 2)[:, None, :]
  if np.any(scale <= 0):
    raise ValueError("image_info scale (row 2) must be positive.")
  return (boxes + offset) / scale


def yxyx_to_xywh(boxes):
  """[..., 4] yxyx -> COCO [..., 4] (x, y, width, height)."""
  boxes = np.asarray(boxes, dtype=np.float64)
  return np.stack([boxes[..., 1], boxes[..., 0],
                   boxes[..., 3] - boxes[..., 1],
                   boxes[..., 2] - boxes[..., 0]], axis=-1)


def encode_binary_masks(masks_hwn):
  """RLE-encodes binary masks.

  Args:
    masks_hwn: uint8 [H, W, N] in {0, 1} (Fortran order avoids a copy).

  Returns:
    list of N dicts {'size': [H, W], 'counts': str} (JSON-serialisable).
  """
  masks_hwn = np.asfortranarray(masks_hwn, dtype=np.uint8)
  if masks_hwn.shape[-1] == 0:
    return []
  rles = mask_api.encode(masks_hwn)
  for rle in rles:
    rle["counts"] = rle["counts"].decode("ascii")
  return rles


def detections_to_coco_results(image_id, boxes_xywh, classes, scores,
                                segmentations=None):
  """Builds COCO result dicts for the detections of one image.

  Args:
    image_id: int COCO image id.
    boxes_xywh: float [n, 4] boxes in original pixels, COCO xywh.
    classes: int [n] category ids.
    scores: float [n].
    segmentations: optional list of n RLE dicts (from
      `encode_binary_masks`).

  Returns:
    list of n dicts with keys image_id, category_id, bbox, score and, when
    `segmentations` is given, segmentation.
  """
  results = []
  for i in range(len(scores)):
    result = {
        "image_id": int(image_id),
        "category_id": int(classes[i]),
        "bbox": [float(v) for v in boxes_xywh[i]],
        "score": float(scores[i]),
    }
    if segmentations is not None:
      result["segmentation"] = segmentations[i]
    results.append(result)
  return results


def decode_mask_png(png, height, width, record):
  """Decodes one PNG instance mask to uint8 [height, width] in {0, 1}."""
  if isinstance(png, np.ndarray):
    png = png.item()
  if isinstance(png, str):
    png = png.encode("latin-1")
  if not png:
    raise ValueError(
        f"{record}: the instance has no mask (empty masks_png). Mask "
        "evaluation from the eval batches needs every instance's mask; give "
        "the annotation JSON (annotation_file) or set include_mask=False.")
  decoded = cv2.imdecode(np.frombuffer(png, dtype=np.uint8),
                         cv2.IMREAD_GRAYSCALE)
  if decoded is None:
    raise ValueError(f"{record}: masks_png is not a decodable PNG image.")
  if decoded.shape != (height, width):
    raise ValueError(
        f"{record}: instance mask is {decoded.shape[0]}x{decoded.shape[1]} "
        f"but the image is {height}x{width}.")
  return (decoded > 0).astype(np.uint8)


def groundtruth_to_coco_annotations(groundtruths, index, image_id, record,
                                    include_mask, first_annotation_id):
  """Converts one image of an eval batch's `groundtruths` to COCO annotations.

  PNG masks are only checked here (cheap) and kept as bytes under the key
  'mask_png' (with 'mask_record' naming the instance); `decode_annotation_masks`
  turns them into RLE later, off the training thread.

  Args:
    groundtruths: dict of numpy arrays in the contract layout (`boxes`
      [B, 100, 4] original pixels yxyx, `classes`, `areas`, `is_crowds`,
      `num_detections`, `height`, `width`, and `masks_png` when
      `include_mask`).
    index: int row of the batch.
    image_id: int COCO image id of that row.
    record: str naming the row in errors.
    include_mask: bool, keep the instances' `masks_png`.
    first_annotation_id: int >= 1, id given to the first annotation.

  Returns:
    (image dict {id, height, width}, list of annotation dicts).
  """
  height = int(groundtruths["height"][index])
  width = int(groundtruths["width"][index])
  num = int(groundtruths["num_detections"][index])
  boxes = np.asarray(groundtruths["boxes"][index], dtype=np.float64)
  if num < 0 or num > boxes.shape[0]:
    raise ValueError(
        f"{record}: groundtruths num_detections {num} outside [0, "
        f"{boxes.shape[0]}].")
  if height <= 0 or width <= 0:
    raise ValueError(f"{record}: image size {height}x{width} is not valid.")
  classes = groundtruths["classes"][index]
  areas = groundtruths["areas"][index]
  is_crowds = groundtruths.get("is_crowds")
  if include_mask and "masks_png" not in groundtruths:
    raise ValueError(
        "groundtruths have no 'masks_png'; mask evaluation without an "
        "annotation_file needs the eval parser's instance masks.")
  xywh = yxyx_to_xywh(boxes[:num])
  annotations = []
  for i in range(num):
    crowd = int(is_crowds[index][i]) if is_crowds is not None else 0
    annotation = {
        "id": first_annotation_id + i,
        "image_id": int(image_id),
        "category_id": int(classes[i]),
        "bbox": [float(v) for v in xywh[i]],
        "iscrowd": 1 if crowd else 0,
        "area": float(areas[i]),
    }
    if include_mask:
      png = groundtruths["masks_png"][index][i]
      if isinstance(png, np.ndarray):
        png = png.item()
      if not png:
        raise ValueError(
            f"{record}, instance {i}: the instance has no mask (empty "
            "masks_png). Mask evaluation from the eval batches needs every "
            "instance's mask; give the annotation JSON (annotation_file) or "
            "set include_mask=False.")
      annotation["mask_png"] = (png.encode("latin-1") if isinstance(png, str)
                                else bytes(png))
      annotation["mask_record"] = f"{record}, instance {i}"
    annotations.append(annotation)
  return {"id": int(image_id), "height": height, "width": width}, annotations


def decode_annotation_masks(images, annotations):
  """Finalises annotations from `groundtruth_to_coco_annotations`.

  Decodes each 'mask_png' into an RLE `segmentation` (iscrowd=1 RLE for
  crowd regions), fills a missing (<= 0) area from the mask (or the box when
  there is no mask), and drops the helper keys.

  Returns:
    list of new annotation dicts (the inputs are not modified).
  """
  sizes = {img["id"]: (img["height"], img["width"]) for img in images}
  out = []
  for annotation in annotations:
    annotation = dict(annotation)
    png = annotation.pop("mask_png", None)
    record = annotation.pop("mask_record", f"annotation {annotation['id']}")
    if png is not None:
      height, width = sizes[annotation["image_id"]]
      binary = decode_mask_png(png, height, width, record)
      rle = mask_api.encode(np.asfortranarray(binary))
      if annotation["area"] <= 0:
        annotation["area"] = float(mask_api.area(rle))
      rle["counts"] = rle["counts"].decode("ascii")
      annotation["segmentation"] = rle
    if annotation["area"] <= 0:
      annotation["area"] = annotation["bbox"][2] * annotation["bbox"][3]
    out.append(annotation)
  return out


def quiet():
  """Context manager silencing pycocotools' progress prints.

  `contextlib.redirect_stdout` swaps the process-wide `sys.stdout`, so it is
  applied on the main thread only; on a background thread the prints pass
  through rather than swallowing the training thread's output.
  """
  if threading.current_thread() is threading.main_thread():
    return contextlib.redirect_stdout(io.StringIO())
  return contextlib.nullcontext()


def quiet_coco(dataset=None, annotation_file=None):
  """Builds a COCO object without its progress prints."""
  with quiet():
    if annotation_file is not None:
      return coco_api.COCO(annotation_file)
    coco = coco_api.COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def build_coco_groundtruth(images, annotations, category_names=None):
  """In-memory COCO ground truth from image and annotation dicts.

  Args:
    images: list of {id, height, width}.
    annotations: list of COCO annotation dicts (ids >= 1).
    category_names: optional dict {category id: name}; missing ids are named
      by their number.

  Returns:
    `pycocotools.coco.COCO` whose categories are the ids present in
    `annotations`.
  """
  category_names = category_names or {}
  category_ids = sorted({a["category_id"] for a in annotations})
  dataset = {
      "images": list(images),
      "annotations": list(annotations),
      "categories": [{"id": c, "name": str(category_names.get(c, c))}
                     for c in category_ids],
  }
  return quiet_coco(dataset=dataset)


_GT_CACHE = {}
_GT_CACHE_LOCK = threading.Lock()


def load_coco_groundtruth(annotation_file):
  """Loads (and caches per process) a COCO annotation JSON.

  The cache key includes the file's size and mtime, so a rewritten file is
  reloaded. Loading COCO val2017 takes ~20 s, hence the cache.
  """
  path = os.path.abspath(annotation_file)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"annotation_file {annotation_file!r} not found.")
  stat = os.stat(path)
  key = (path, stat.st_size, stat.st_mtime_ns)
  with _GT_CACHE_LOCK:
    if key not in _GT_CACHE:
      _GT_CACHE.clear()
      _GT_CACHE[key] = quiet_coco(annotation_file=path)
    return _GT_CACHE[key]


def load_results(coco_gt, results):
  """`coco_gt.loadRes(results)` that also accepts an empty result list."""
  if results:
    with quiet():
      return coco_gt.loadRes(list(results))
  dataset = {
      "images": list(coco_gt.dataset["images"]),
      "categories": list(coco_gt.dataset.get("categories", [])),
      "annotations": [],
  }
  return quiet_coco(dataset=dataset)
