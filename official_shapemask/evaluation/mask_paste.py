"""Pastes box-relative instance masks into full-size image masks.

The mask branch predicts each instance as an `m x m` probability map in the
frame of its **outer** box (the 1.25x enlarged detection box), reference
§9.6. To score it with COCO it has to become a binary mask of the original
image. We follow the reference (Detectron-style) procedure exactly, so the
numbers are comparable:

1. pad the `m x m` map with one pixel of zeros on every side,
2. enlarge the outer box by `(m + 2) / m` about its centre so that the padded
   map covers it with the same cell size, and truncate it to integer pixels,
3. `cv2.resize` (bilinear) the padded map to the box size
   `(x1 - x0 + 1) x (y1 - y0 + 1)` (the reference's inclusive-pixel
   convention),
4. threshold at > 0.5 and place it into the image, clipping at the borders.

`paste_and_encode` gives the COCO RLEs of the pasted masks directly from
each mask's window (what evaluation needs), without full-size masks.

numpy + OpenCV + pycocotools; host-side only.
"""
import cv2
import numpy as np
from pycocotools import mask as mask_api


def _check_inputs(masks, boxes, image_height, image_width):
  masks = np.asarray(masks, dtype=np.float32)
  boxes = np.asarray(boxes, dtype=np.float64)
  if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
    raise ValueError(
        f"masks must be [N, m, m] (square maps in the outer-box frame), got "
        f"shape {masks.shape}.")
  if boxes.shape != (masks.shape[0], 4):
    raise ValueError(
        f"outer_boxes_yxyx must be [N, 4] with N = {masks.shape[0]} (one box "
        f"per mask), got shape {boxes.shape}.")
  if int(image_height) <= 0 or int(image_width) <= 0:
    raise ValueError(
        f"image size must be positive, got {image_height} x {image_width}.")
  if not np.all(np.isfinite(boxes)):
    raise ValueError("outer_boxes_yxyx contains NaN or infinite values.")
  return masks, boxes, int(image_height), int(image_width)


def _reference_boxes(boxes_yxyx, mask_size):
  """Enlarges boxes by (m + 2) / m about their centres; int32 [N, 4] x0y0x1y1."""
  scale = (mask_size + 2.0) / mask_size
  y0, x0, y1, x1 = (boxes_yxyx[:, i] for i in range(4))
  half_w = 0.5 * (x1 - x0)
  half_h = 0.5 * (y1 - y0)
  cx = x0 + half_w
  cy = y0 + half_h
  half_w = half_w * scale
  half_h = half_h * scale
  enlarged = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h],
                      axis=1)
  # astype truncates toward zero, as the reference does.
  return enlarged.astype(np.int32)


def _pasted_windows(masks, boxes, image_height, image_width):
  """The part of each pasted probability map that lies inside the image.

  Yields:
    (i, y_lo, x_lo, window): mask index, top-left image pixel of the window
    and its float32 [h, w] probabilities (a view; > 0.5 is the mask), for the
    masks that overlap the image.
  """
  mask_size = masks.shape[1]
  ref_boxes = _reference_boxes(boxes, mask_size)
  padded = np.zeros((mask_size + 2, mask_size + 2), dtype=np.float32)
  for i in range(masks.shape[0]):
    rx0, ry0, rx1, ry1 = (int(v) for v in ref_boxes[i])
    w = max(rx1 - rx0 + 1, 1)
    h = max(ry1 - ry0 + 1, 1)
    x_lo, x_hi = min(max(rx0, 0), image_width), min(max(rx0 + w, 0),
                                                    image_width)
    y_lo, y_hi = min(max(ry0, 0), image_height), min(max(ry0 + h, 0),
                                                     image_height)
    if x_hi <= x_lo or y_hi <= y_lo:
      continue  # Entirely outside the image.
    padded[1:-1, 1:-1] = masks[i]
    resized = cv2.resize(padded, (w, h), interpolation=cv2.INTER_LINEAR)
    yield i, y_lo, x_lo, resized[y_lo - ry0:y_hi - ry0, x_lo - rx0:x_hi - rx0]


def _paste(masks, boxes, image_height, image_width, out, instance_axis):
  """Writes each pasted mask into `out` (zeros) along `instance_axis`."""
  for i, y_lo, x_lo, window in _pasted_windows(masks, boxes, image_height,
                                               image_width):
    y_hi, x_hi = y_lo + window.shape[0], x_lo + window.shape[1]
    if instance_axis == 0:
      out[i, y_lo:y_hi, x_lo:x_hi] = window > 0.5
    else:
      out[y_lo:y_hi, x_lo:x_hi, i] = window > 0.5
  return out


def _column_major_counts(on, y_lo, x_lo, image_height, image_width):
  """RLE counts of an image that is zero but `on` (uint8 [h, w], 0 = off)."""
  h = on.shape[0]
  total = image_height * image_width
  # Each window column (a row of the transpose) framed by a zero above and
  # below: every change of value in this column-major sequence is a run
  # boundary of the full image.
  framed = cv2.copyMakeBorder(cv2.transpose(on), 0, 0, 1, 1,
                              cv2.BORDER_CONSTANT, value=0)
  flat = framed.reshape(-1)
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  column, row = np.divmod(change, h + 2)
  position = (x_lo + column) * image_height + (y_lo + row - 1)
  # A run of ones that ends on the last image row of one column and goes on
  # from the first row of the next has its two framing changes at one
  # position: no boundary there. A change at H * W is the image's end.
  if position.size > 1:
    same = np.flatnonzero(position[1:] == position[:-1])
    if same.size:
      keep = np.ones(position.size, bool)
      keep[same] = False
      keep[same + 1] = False
      position = position[keep]
  position = position[position < total]
  return np.diff(np.concatenate([[0], position, [total]])).astype(np.uint32)


def window_rle_counts(window, y_lo, x_lo, image_height, image_width):
  """Uncompressed COCO RLE counts of an image mask that is zero but a window.

  COCO RLE runs over the image in column-major order, alternating runs of
  0 and 1 and starting with a (possibly empty) run of zeros. Only the
  window's pixels are read: O(h x w), not O(H x W).

  Args:
    window: bool [h, w], the mask on rows y_lo..y_lo+h-1 and columns
      x_lo..x_lo+w-1 (inside the image).
    y_lo, x_lo: int, the window's top-left pixel.
    image_height, image_width: int, the image size H, W.

  Returns:
    uint32 [k] run lengths summing to H * W: what `pycocotools.mask.encode`
    counts for the full-size mask.
  """
  window = np.asarray(window)
  if window.ndim != 2:
    raise ValueError(f"window must be [h, w], got shape {window.shape}.")
  if (y_lo < 0 or x_lo < 0 or y_lo + window.shape[0] > image_height
      or x_lo + window.shape[1] > image_width):
    raise ValueError(
        f"window {window.shape} at ({y_lo}, {x_lo}) is not inside the "
        f"{image_height}x{image_width} image.")
  on = np.ascontiguousarray(window != 0, dtype=np.uint8)
  return _column_major_counts(on, y_lo, x_lo, image_height, image_width)


def paste_and_encode(masks, outer_boxes_yxyx, image_height, image_width):
  """Pastes masks like `paste_instance_masks` and RLE-encodes them.

  Gives exactly `pycocotools.mask.encode` of the pasted `[H, W, N]` masks
  (counts as str), but builds only each mask's window inside the image, so
  the cost grows with the boxes' area, not with N x H x W. Runs OpenCV on
  the calling thread (its thread pool costs more than it saves on these
  small resizes), so callers may run images on threads of their own.

  Args:
    masks: float [N, m, m] probabilities, each in its outer box's frame.
    outer_boxes_yxyx: float [N, 4] outer boxes in original-image pixels.
    image_height: int, original image height H.
    image_width: int, original image width W.

  Returns:
    list of N dicts {'size': [H, W], 'counts': str}.
  """
  masks, boxes, h, w = _check_inputs(masks, outer_boxes_yxyx, image_height,
                                     image_width)
  if not masks.shape[0]:
    return []
  counts = [np.array([h * w], np.uint32)] * masks.shape[0]
  for i, y_lo, x_lo, window in _pasted_windows(masks, boxes, h, w):
    # NumPy, not cv2.compare: OpenCV's bindings read a 1x1 array as a
    # scalar and refuse the comparison (a one-pixel box at an image edge).
    on = np.greater(window, 0.5).view(np.uint8)
    counts[i] = _column_major_counts(on, y_lo, x_lo, h, w)
  rles = mask_api.frPyObjects([{"size": [h, w], "counts": c} for c in counts],
                              h, w)
  for rle in rles:
    rle["counts"] = rle["counts"].decode("ascii")
  return rles


def paste_instance_masks(masks, outer_boxes_yxyx, image_height, image_width):
  """Pastes outer-box-frame mask probabilities into image-size binary masks.

  Args:
    masks: float [N, m, m] probabilities in [0, 1], each in the frame of its
      outer box.
    outer_boxes_yxyx: float [N, 4] outer boxes [ymin, xmin, ymax, xmax] in
      pixels of the original image (already mapped back from the canvas).
    image_height: int, original image height H.
    image_width: int, original image width W.

  Returns:
    uint8 [N, H, W] in {0, 1}.
  """
  masks, boxes, h, w = _check_inputs(masks, outer_boxes_yxyx, image_height,
                                     image_width)
  out = np.zeros((masks.shape[0], h, w), dtype=np.uint8)
  return _paste(masks, boxes, h, w, out, instance_axis=0)


def paste_instance_masks_hwn(masks, outer_boxes_yxyx, image_height,
                             image_width):
  """Same as `paste_instance_masks`, laid out for `pycocotools.mask.encode`.

  Returns:
    uint8 [H, W, N] in {0, 1}, Fortran-ordered (what RLE encoding needs,
    without a transposing copy of N full-size masks).
  """
  masks, boxes, h, w = _check_inputs(masks, outer_boxes_yxyx, image_height,
                                     image_width)
  out = np.zeros((h, w, masks.shape[0]), dtype=np.uint8, order="F")
  return _paste(masks, boxes, h, w, out, instance_axis=2)
