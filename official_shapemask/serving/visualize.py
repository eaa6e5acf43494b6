"""Draws detections (masks, boxes, class names, scores) and contact sheets.

numpy + OpenCV, host side. Images are RGB uint8 `[H, W, 3]`; boxes
`[ymin, xmin, ymax, xmax]` in pixels of that image; masks full-image binary
`[N, H, W]` (e.g. from `official_shapemask.evaluation.paste_instance_masks`).

Small images are drawn enlarged by an integer factor (`drawing_scale`: the
short side to at least `min_short_side`, 480 px by default, but never the
long side beyond `MAX_LONG_SIDE`), so that tags stay legible: the image is
resized bilinearly, the masks by pixel replication (every pixel of a scored
mask becomes a factor x factor block; nothing is re-pasted), boxes are
scaled. Tags (`name: score`) are placed by `layout_tags` so that they do
not cover each other where the image leaves room.
"""

import colorsys
import math

import cv2
import numpy as np

from official_shapemask.serving import label_map as label_map_lib

_GOLDEN_RATIO = 0.618033988749895
MIN_SHORT_SIDE = 480
# Enlargement stops where the long side would pass this: a 3 x 2000 strip is
# drawn as it is, not as a 480 x 320,000 picture.
MAX_LONG_SIDE = 2048
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(class_id):
  """A distinct, stable RGB colour per class id (golden-ratio hues)."""
  hue = (int(class_id) * _GOLDEN_RATIO) % 1.0
  r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
  return (int(r * 255), int(g * 255), int(b * 255))


def _label_text(class_id, score, label_map):
  return f'{label_map_lib.class_name(label_map, class_id)}: {score:.2f}'


def drawing_scale(height, width, min_short_side=MIN_SHORT_SIDE):
  """The integer factor that brings the short side to >= `min_short_side`.

  Capped so that the long side stays within `MAX_LONG_SIDE` (an image whose
  long side is already longer is not enlarged). Returns 1 for images already
  that large, or when `min_short_side` is 0 or None (draw at the original
  size).
  """
  if not min_short_side:
    return 1
  wanted = math.ceil(min_short_side / max(1, min(height, width)))
  room = MAX_LONG_SIDE // max(1, max(height, width))
  return max(1, min(wanted, room))


def enlarge(image, scale):
  """`image` resized by the integer `scale` (bilinear; a copy when 1)."""
  image = np.asarray(image)
  if scale == 1:
    return image.copy()
  height, width = image.shape[:2]
  return cv2.resize(image, (width * scale, height * scale),
                    interpolation=cv2.INTER_LINEAR)


def text_style(height, width):
  """(font scale, thickness) that give legible tags on an H x W drawing."""
  short = min(height, width)
  return max(0.45, short / 720.0), 1 if short < 900 else 2


def _overlap(a, b):
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  return max(0, w) * max(0, h)


def layout_tags(boxes, tag_sizes, height, width, order=None):
  """Places one tag per box so that tags do not cover each other.

  Candidate places, in order of preference: above the box's top-left corner,
  inside it, below the bottom-left corner, inside it, then the same on the
  right edge (shifted to stay inside the image). Boxes are served in
  `order` (e.g. by falling score); each takes the first candidate that
  overlaps no tag placed before it, or, when every candidate does, the one
  with the least overlap.

  Args:
    boxes: int-like [N, 4] yxyx boxes inside the drawing.
    tag_sizes: [N, 2] (tag width, tag height) in pixels.
    height, width: the drawing's size.
    order: optional sequence of box indices (default 0..N-1).

  Returns:
    list of N (x0, y0, x1, y1) tag rectangles (exclusive ends), in box order.
  """
  placed = [None] * len(boxes)
  taken = []
  for i in (range(len(boxes)) if order is None else order):
    y0, x0, y1, x1 = (int(v) for v in boxes[i])
    tw, th = (int(v) for v in tag_sizes[i])
    candidates = []
    for left in (x0, x1 - tw):
      for top in (y0 - th, y0, y1, y1 - th):
        left_c = min(max(left, 0), max(width - tw, 0))
        top_c = min(max(top, 0), max(height - th, 0))
        rect = (left_c, top_c, left_c + tw, top_c + th)
        if rect not in candidates:
          candidates.append(rect)
    costs = [sum(_overlap(c, t) for t in taken) for c in candidates]
    best = candidates[costs.index(min(costs))]
    placed[i] = best
    taken.append(best)
  return placed


def _visible_boxes(boxes, height, width):
  """Boxes clipped to the image; None for a box entirely outside it."""
  out = []
  for box in boxes:
    y0, x0, y1, x1 = (int(round(v)) for v in box)
    y0, y1 = max(y0, 0), min(y1, height - 1)
    x0, x1 = max(x0, 0), min(x1, width - 1)
    out.append((y0, x0, y1, x1) if y1 > y0 and x1 > x0 else None)
  return out


def draw_detections(image, boxes, classes, scores, masks=None,
                    label_map=None, mask_alpha=0.5, line_width=None,
                    min_short_side=MIN_SHORT_SIDE):
  """Returns a drawing of `image` with the detections.

  Masks are blended with the class colour (`mask_alpha`) and outlined;
  boxes are clipped to the image and drawn as rectangles, each with a
  `name: score` tag placed by `layout_tags` (highest scores first); a box
  entirely outside the image (the model can detect in the padding of its
  canvas) is not drawn.

  Args:
    image: uint8 `[H, W, 3]` RGB.
    boxes: float `[N, 4]` yxyx, image pixels.
    classes: int `[N]` category ids.
    scores: float `[N]`.
    masks: optional uint8/bool `[N, H, W]` binary masks.
    label_map: optional dict id -> name (`class <id>` otherwise).
    mask_alpha: float in [0, 1], mask colour opacity.
    line_width: box line width in pixels of the drawing (default: from its
      size).
    min_short_side: int, draw enlarged by `drawing_scale(H, W,
      min_short_side)` (default 480); 0 draws at the original size.

  Returns:
    uint8 `[s * H, s * W, 3]` RGB, s = `drawing_scale(H, W, min_short_side)`.
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
  scale = drawing_scale(height, width, min_short_side)
  out = enlarge(image, scale)
  big_h, big_w = out.shape[:2]
  if line_width is None:
    line_width = max(1, int(round(max(big_h, big_w) / 320)))

  if masks is not None and len(masks):
    overlay = out.astype(np.float32)
    big_masks = []
    for mask, class_id in zip(masks, classes):
      on = mask.astype(bool)
      if scale > 1:
        on = np.repeat(np.repeat(on, scale, axis=0), scale, axis=1)
      big_masks.append(on)
      color = np.array(class_color(class_id), np.float32)
      overlay[on] = overlay[on] * (1.0 - mask_alpha) + color * mask_alpha
    out = np.clip(np.round(overlay), 0, 255).astype(np.uint8)
    for on, class_id in zip(big_masks, classes):
      contours, _ = cv2.findContours(on.astype(np.uint8), cv2.RETR_EXTERNAL,
                                     cv2.CHAIN_APPROX_SIMPLE)
      cv2.drawContours(out, contours, -1, class_color(class_id),
                       max(1, line_width // 2))

  visible = _visible_boxes(boxes * scale, big_h, big_w)
  shown = [i for i, box in enumerate(visible) if box is not None]
  font_scale, thickness = text_style(big_h, big_w)
  texts, sizes = {}, {}
  for i in shown:
    y0, x0, y1, x1 = visible[i]
    cv2.rectangle(out, (x0, y0), (x1, y1), class_color(classes[i]),
                  line_width)
    texts[i] = _label_text(classes[i], float(scores[i]), label_map)
    (text_w, text_h), baseline = cv2.getTextSize(texts[i], _FONT, font_scale,
                                                 thickness)
    sizes[i] = (text_w + 6, text_h + baseline + 6)
  by_score = sorted(range(len(shown)), key=lambda k: -float(scores[shown[k]]))
  rects = layout_tags([visible[i] for i in shown], [sizes[i] for i in shown],
                      big_h, big_w, order=by_score)
  for i, (x0, y0, x1, y1) in zip(shown, rects):
    color = class_color(classes[i])
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), color, cv2.FILLED)
    # Dark text on light colours, white on dark ones.
    luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luma > 110 else (255, 255, 255)
    baseline = cv2.getTextSize(texts[i], _FONT, font_scale, thickness)[1]
    cv2.putText(out, texts[i], (x0 + 3, y1 - 3 - baseline), _FONT,
                font_scale, ink, thickness, cv2.LINE_AA)
  return out


def contact_sheet(images, columns=3, cell_size=360, gap=8, titles=None,
                  background=(255, 255, 255)):
  """Tiles images into one picture, row by row.

  Each image is scaled to fit a `cell_size` x `cell_size` cell (aspect ratio
  kept, bilinear) and centred in it; cells are `gap` pixels apart and from
  the border. With `titles`, a line of text sits under each cell.

  Args:
    images: list of uint8 `[H, W, 3]` RGB images (any sizes).
    columns: int >= 1, cells per row.
    cell_size: int, the side of a cell in pixels.
    gap: int >= 0, pixels between cells and around them.
    titles: optional list of str, one per image.
    background: RGB of the space between cells.

  Returns:
    uint8 `[rows * (cell + title + gap) + gap, columns * (cell + gap) + gap,
    3]` RGB, rows = ceil(len(images) / columns) (title 0 without titles).
  """
  if not images:
    raise ValueError('contact_sheet needs at least one image.')
  if columns < 1 or cell_size < 1 or gap < 0:
    raise ValueError(f'contact_sheet: columns {columns} and cell_size '
                     f'{cell_size} must be >= 1, gap {gap} >= 0.')
  if titles is not None and len(titles) != len(images):
    raise ValueError(f'contact_sheet: {len(titles)} titles for '
                     f'{len(images)} images.')
  font_scale, thickness = 0.5, 1
  title_h = 0
  if titles is not None:
    title_h = cv2.getTextSize('Ag', _FONT, font_scale, thickness)[0][1] + 10
  columns = min(columns, len(images))
  rows = math.ceil(len(images) / columns)
  step_y, step_x = cell_size + title_h + gap, cell_size + gap
  sheet = np.empty([rows * step_y + gap, columns * step_x + gap, 3], np.uint8)
  sheet[:] = background
  for k, image in enumerate(images):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f'contact_sheet: image {k} must be uint8 [H, W, 3], '
                       f'got {image.dtype} {image.shape}.')
    h, w = image.shape[:2]
    factor = cell_size / max(h, w)
    new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
    tile = cv2.resize(image, (new_w, new_h), interpolation=(
        cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR))
    top = gap + (k // columns) * step_y + (cell_size - new_h) // 2
    left = gap + (k % columns) * step_x + (cell_size - new_w) // 2
    sheet[top:top + new_h, left:left + new_w] = tile
    if titles is not None:
      cv2.putText(sheet, str(titles[k]),
                  (gap + (k % columns) * step_x,
                   gap + (k // columns) * step_y + cell_size + title_h - 5),
                  _FONT, font_scale, (0, 0, 0), thickness, cv2.LINE_AA)
  return sheet
