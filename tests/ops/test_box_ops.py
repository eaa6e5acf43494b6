"""Box ops against hand-computed values and the reference conventions
(§4, §9)."""
import math

import numpy as np
import pytest

from official_shapemask.ops import anchors
from official_shapemask.ops import box_ops


def _encode_reference(boxes, anchor_boxes):
  """The input pipeline's encoder (§4): plain sizes, eps 1e-8, no weights."""
  eps = 1e-8
  h = boxes[..., 2] - boxes[..., 0]
  w = boxes[..., 3] - boxes[..., 1]
  yc = boxes[..., 0] + 0.5 * h
  xc = boxes[..., 1] + 0.5 * w
  ha = anchor_boxes[..., 2] - anchor_boxes[..., 0]
  wa = anchor_boxes[..., 3] - anchor_boxes[..., 1]
  yca = anchor_boxes[..., 0] + 0.5 * ha
  xca = anchor_boxes[..., 1] + 0.5 * wa
  ha, wa, h, w = ha + eps, wa + eps, h + eps, w + eps
  return np.stack([(yc - yca) / ha, (xc - xca) / wa, np.log(h / ha),
                   np.log(w / wa)], axis=-1).astype(np.float32)


def test_decode_hand_computed_legacy_plus_one():
  anchor = np.array([[0.0, 0.0, 9.0, 9.0]], np.float32)  # "+1" size 10
  encoded = np.array([[0.1, -0.2, math.log(2.0), 0.0]], np.float32)
  # yc = 0.1 * 10 + 5 = 6, h = 20 -> [-4, 15]; xc = -2 + 5 = 3, w = 10.
  np.testing.assert_allclose(
      np.asarray(box_ops.decode_boxes(encoded, anchor)),
      [[-4.0, -2.0, 15.0, 7.0]], atol=1e-5)


def test_decode_zero_offsets_returns_anchor_and_clips_scale():
  boxes = anchors.generate_anchors((128, 128), 3, 5)
  zeros = np.zeros_like(boxes)
  np.testing.assert_allclose(np.asarray(box_ops.decode_boxes(zeros, boxes)),
                             boxes, atol=1e-4)
  huge = np.array([[0.0, 0.0, 10.0, 10.0]], np.float32)
  anchor = np.array([[0.0, 0.0, 9.0, 9.0]], np.float32)
  out = np.asarray(box_ops.decode_boxes(huge, anchor))[0]
  # Sizes clipped at exp(ln(1000/16)) * 10 = 625.
  np.testing.assert_allclose(out[2] - out[0] + 1.0, 625.0, rtol=1e-5)
  np.testing.assert_allclose(out[3] - out[1] + 1.0, 625.0, rtol=1e-5)


def test_encode_decode_round_trip_with_reference_conventions():
  rng = np.random.default_rng(0)
  anchor_boxes = anchors.generate_anchors((256, 256), 3, 7)
  pick = rng.choice(len(anchor_boxes), 500, replace=False)
  anchor_boxes = anchor_boxes[pick]
  ha = anchor_boxes[:, 2] - anchor_boxes[:, 0]
  wa = anchor_boxes[:, 3] - anchor_boxes[:, 1]
  # Boxes a matched anchor could have: shifted and rescaled by < 2x.
  scale_h = np.exp(rng.uniform(-0.6, 0.6, 500))
  scale_w = np.exp(rng.uniform(-0.6, 0.6, 500))
  yc = (anchor_boxes[:, 0] + anchor_boxes[:, 2]) / 2 + rng.uniform(-.2, .2,
                                                                  500) * ha
  xc = (anchor_boxes[:, 1] + anchor_boxes[:, 3]) / 2 + rng.uniform(-.2, .2,
                                                                  500) * wa
  h, w = ha * scale_h, wa * scale_w
  boxes = np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2],
                   -1).astype(np.float32)
  decoded = np.asarray(
      box_ops.decode_boxes(_encode_reference(boxes, anchor_boxes),
                           anchor_boxes))
  # The "+1" decoder is not the exact inverse of the plain encoder: each
  # side moves by at most 0.5 * (1 + size / anchor_size) pixels.
  bound_y = 0.5 * (1 + h / ha) + 1e-3
  bound_x = 0.5 * (1 + w / wa) + 1e-3
  err = np.abs(decoded - boxes)
  assert np.all(err[:, [0, 2]] <= bound_y[:, None] + 1e-3 * h[:, None])
  assert np.all(err[:, [1, 3]] <= bound_x[:, None] + 1e-3 * w[:, None])
  # ... and it is not exact either: the convention is really the legacy one.
  assert err.max() > 0.4
  iou = np.diagonal(np.asarray(box_ops.box_iou(decoded, boxes)))
  assert iou.min() > 0.9


def test_clip_and_outer_boxes():
  boxes = np.array([[10.0, 20.0, 30.0, 60.0], [-5.0, 90.0, 50.0, 140.0]],
                   np.float32)
  clipped = np.asarray(box_ops.clip_boxes(boxes, 100, 128))
  np.testing.assert_allclose(clipped[1], [0.0, 90.0, 50.0, 127.0])
  outer = np.asarray(box_ops.compute_outer_boxes(boxes, 100, 128, 1.25))
  np.testing.assert_allclose(outer[0], [7.5, 15.0, 32.5, 65.0])
  # Centre (22.5, 115), size 68.75 x 62.5, clipped to the canvas.
  np.testing.assert_allclose(outer[1], [0.0, 83.75, 56.875, 127.0])
  with pytest.raises(ValueError, match="scale"):
    box_ops.compute_outer_boxes(boxes, 100, 128, 0.5)


def test_box_iou_values_and_batch_broadcast():
  a = np.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  b = np.array([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 15.0, 15.0],
                [20.0, 20.0, 30.0, 30.0]], np.float32)
  iou = np.asarray(box_ops.box_iou(a, b))
  np.testing.assert_allclose(iou[0], [0.5, 25.0 / 175.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(iou[1], [0.0, 0.0, 0.0])
  batched = np.asarray(box_ops.box_iou(np.stack([a, a]), b[None]))
  assert batched.shape == (2, 2, 3)
  np.testing.assert_allclose(batched[1], iou)
