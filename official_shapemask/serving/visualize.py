"""Draws detections (masks, boxes, class names, scores) on an image.

numpy + OpenCV, host side. Images are RGB uint8 `[H, W, 3]`; boxes
`[ymin, xmin, ymax, xmax]` in pixels of that image; masks full-image binary
`[N, H, W]` (e.g. from `official_shapemask.evaluation.paste_instance_masks`).
"""

import colorsys

import cv2
import numpy as np

from official_shapemask.serving import label_map as label_map_lib

_GOLDEN_RATIO = 0.618033988749895


def class_color(class_id):
  """A distinct, stable RGB colour per class id (golden-ratio hues)."""
  hue = (int(class_id) * _GOLDEN_RATIO) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
  return (int(r * 255), int(g * 255), int(b * 255))


def _label_text(class_id, score, label_map):
  return f'{label_map_lib.class_name(label_map, class_id)}: {score:.2f}'


def draw_detections(image, boxes, classes, scores, masks=None,
                    label_map=None, mask_alpha=0.5, line_width=None):
  """Returns a copy of `image` with the detections drawn.

  Masks are blended with the class colour (`mask_alpha`) and outlined;
  boxes are clipped to the image and drawn as rectangles with a
  `name: score` tag above the box (inside it when there is no room above);
  a box entirely outside the image (the model can detect in the padding of
  its canvas) is not drawn.

  Args:
    image: uint8 `[H, W, 3]` RGB.
    boxes: float `[N, 4]` yxyx, image pixels.
    classes: int `[N]` category ids.
    scores: float `[N]`.
    masks: optional uint8/bool `[N, H, W]` binary masks.
    label_map: optional dict id -> name (`class <id>` otherwise).
    mask_alpha: float in [0, 1], mask colour opacity.
    line_width: box line width in pixels (default: from the image size).

  Returns:
    uint8 `[H, W, 3]` RGB.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f'image must be uint8 [H, W, 3], got {image.dtype} '
                     f'{image.shape}.')
  height, width = image.shape[:2]
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  classes = np.asarray(classes).reshape(-1)
  scores = np.asarray(scores).reshape(-1)
  if not len(boxes) == len(classes) == len(scores):
    raise ValueError(f'boxes, classes and scores must have the same length, '
                     f'got {len(boxes)}, {len(classes)}, {len(scores)}.')
  if masks is not None:
    masks = np.asarray(masks)
    if masks.shape != (len(boxes), height, width):
      raise ValueError(f'masks must be [N, H, W] = {(len(boxes), height, width)}'
                       f', got {masks.shape}.')
  out = image.copy()
  if line_width is None:
    line_width = max(1, int(round(max(height, width) / 320)))

  if masks is not None:
    overlay = out.astype(np.float32)
    for mask, class_id in zip(masks, classes):
      on = mask.astype(bool)
      color = np.array(class_color(class_id), np.float32)
      overlay[on] = overlay[on] * (1.0 - mask_alpha) + color * mask_alpha
    out = np.clip(np.round(overlay), 0, 255).astype(np.uint8)
    for mask, class_id in zip(masks, classes):
      contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                     cv2.CHAIN_APPROX_SIMPLE)
      cv2.drawContours(out, contours, -1, class_color(class_id), 1)

  font = cv2.FONT_HERSHEY_SIMPLEX
  font_scale = max(0.35, min(height, width) / 900.0)
  for box, class_id, score in zip(boxes, classes, scores):
    color = class_color(class_id)
    y0, x0, y1, x1 = (int(round(v)) for v in box)
    y0, y1 = max(y0, 0), min(y1, height - 1)
    x0, x1 = max(x0, 0), min(x1, width - 1)
    if y1 <= y0 or x1 <= x0:
      continue
    cv2.rectangle(out, (x0, y0), (x1, y1), color, line_width)
    text = _label_text(class_id, float(score), label_map)
    (text_w, text_h), baseline = cv2.getTextSize(text, font, font_scale, 1)
    top = y0 - text_h - baseline - 2
    if top < 0:
      top = y0
    cv2.rectangle(out, (x0, top), (x0 + text_w + 2, top + text_h + baseline +
                                   2), color, cv2.FILLED)
    cv2.putText(out, text, (x0 + 1, top + text_h + 1), font, font_scale,
                (0, 0, 0), 1, cv2.LINE_AA)
  return out
