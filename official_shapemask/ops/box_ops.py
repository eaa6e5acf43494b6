"""Box arithmetic in keras.ops (backend-agnostic, XLA-friendly).

Boxes are ``[ymin, xmin, ymax, xmax]`` float32 in pixels of the padded
canvas. Encoded boxes are ``(ty, tx, th, tw)`` as produced by the anchor
labeller of the input pipeline (reference §4).
"""

import math

from keras import ops

# Largest log-scale change accepted when decoding (reference §9.2):
# ln(1000 / 16) ~= 4.135.
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)


def decode_boxes(encoded, anchors):
  """Decodes ``(ty, tx, th, tw)`` offsets against anchors.

  Reproduces the reference decoder (TPU ``box_utils.decode_boxes`` without
  weights), including its legacy "+1" size convention: the anchor height is
  ``ymax - ymin + 1``, its centre ``ymin + 0.5 * h``, and the decoded
  ``ymax = ymin' + h' - 1``. This is deliberately *not* the exact inverse of
  the encoder, which uses plain ``ymax - ymin`` sizes (reference §13.10, a
  ~1 pixel effect). ``th``/``tw`` are clipped from above at
  ``ln(1000 / 16)``.

  Args:
    encoded: float tensor ``[..., 4]`` of ``(ty, tx, th, tw)``.
    anchors: float tensor ``[..., 4]`` broadcastable to ``encoded``,
      ``[ymin, xmin, ymax, xmax]``.

  Returns:
    float32 tensor of the broadcast shape ``[..., 4]``, decoded boxes
    ``[ymin, xmin, ymax, xmax]``.
  """
  if encoded.shape[-1] != 4:
    raise ValueError(
        f"decode_boxes: encoded boxes need a last dimension of 4, got shape "
        f"{encoded.shape}")
  encoded = ops.cast(encoded, "float32")
  anchors = ops.cast(anchors, "float32")
  dy, dx, dh, dw = ops.unstack(encoded, num=4, axis=-1)
  dh = ops.minimum(dh, BBOX_XFORM_CLIP)
  dw = ops.minimum(dw, BBOX_XFORM_CLIP)

  a_ymin, a_xmin, a_ymax, a_xmax = ops.unstack(anchors, num=4, axis=-1)
  a_h = a_ymax - a_ymin + 1.0
  a_w = a_xmax - a_xmin + 1.0
  a_yc = a_ymin + 0.5 * a_h
  a_xc = a_xmin + 0.5 * a_w

  yc = dy * a_h + a_yc
  xc = dx * a_w + a_xc
  h = ops.exp(dh) * a_h
  w = ops.exp(dw) * a_w
  ymin = yc - 0.5 * h
  xmin = xc - 0.5 * w
  return ops.stack([ymin, xmin, ymin + h - 1.0, xmin + w - 1.0], axis=-1)


def clip_boxes(boxes, height, width):
  """Clips boxes to the canvas, i.e. y to ``[0, height - 1]``, x to
  ``[0, width - 1]`` (reference ``clip_boxes``).

  Args:
    boxes: float tensor ``[..., 4]``, ``[ymin, xmin, ymax, xmax]``.
    height: python number or scalar tensor, canvas height in pixels.
    width: python number or scalar tensor, canvas width in pixels.

  Returns:
    tensor like ``boxes``.
  """
  ymin, xmin, ymax, xmax = ops.unstack(boxes, num=4, axis=-1)
  max_y = ops.cast(height, boxes.dtype) - 1.0
  max_x = ops.cast(width, boxes.dtype) - 1.0

  def _clip(v, hi):
    return ops.maximum(ops.minimum(v, hi), 0.0)

  return ops.stack(
      [_clip(ymin, max_y), _clip(xmin, max_x), _clip(ymax, max_y),
       _clip(xmax, max_x)], axis=-1)


def compute_outer_boxes(boxes, image_height, image_width, scale=1.25):
  """Scales boxes about their centre and clips them to the canvas.

  The ShapeMask mask branch works in the frame of these outer boxes
  (``outer_box_scale`` = 1.25, reference §1).

  Args:
    boxes: float tensor ``[..., 4]``, ``[ymin, xmin, ymax, xmax]``.
    image_height: python number or scalar tensor, canvas height.
    image_width: python number or scalar tensor, canvas width.
    scale: float >= 1, side scale factor.

  Returns:
    tensor like ``boxes``: the outer boxes, clipped to
    ``[0, image_height - 1] x [0, image_width - 1]``.
  """
  if scale < 1.0:
    raise ValueError(
        f"compute_outer_boxes: scale must be >= 1.0, got {scale}")
  ymin, xmin, ymax, xmax = ops.unstack(boxes, num=4, axis=-1)
  yc = (ymin + ymax) / 2.0
  xc = (xmin + xmax) / 2.0
  half_h = (ymax - ymin) * scale / 2.0
  half_w = (xmax - xmin) * scale / 2.0
  outer = ops.stack([yc - half_h, xc - half_w, yc + half_h, xc + half_w],
                    axis=-1)
  return clip_boxes(outer, image_height, image_width)


def box_iou(boxes1, boxes2):
  """Pairwise intersection-over-union.

  Areas use plain ``ymax - ymin`` sizes and the union gets ``1e-8`` added
  (reference ``bbox_overlap``), so a zero-area box has IoU 0 with anything.

  Args:
    boxes1: float tensor ``[..., N, 4]``.
    boxes2: float tensor ``[..., M, 4]`` with batch dims broadcastable to
      those of ``boxes1``.

  Returns:
    float tensor ``[..., N, M]``.
  """
  y1a, x1a, y2a, x2a = [b[..., :, None] for b in ops.unstack(boxes1, 4, -1)]
  y1b, x1b, y2b, x2b = [b[..., None, :] for b in ops.unstack(boxes2, 4, -1)]
  inter_h = ops.maximum(ops.minimum(y2a, y2b) - ops.maximum(y1a, y1b), 0.0)
  inter_w = ops.maximum(ops.minimum(x2a, x2b) - ops.maximum(x1a, x1b), 0.0)
  inter = inter_h * inter_w
  area_a = (y2a - y1a) * (x2a - x1a)
  area_b = (y2b - y1b) * (x2b - x1b)
  return inter / (area_a + area_b - inter + 1e-8)
