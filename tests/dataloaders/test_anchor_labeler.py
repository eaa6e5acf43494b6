"""Anchor labelling on hand-made boxes, checked against a numpy re-derivation."""

import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.dataloaders import anchor_labeler
from official_shapemask.ops import anchors as anchor_ops

SIZE = (128, 128)


def _anchors():
  return anchor_ops.generate_anchors(SIZE)


def _np_iou(anchors, boxes):
  """[A, n] IoU, plain (max - min) sizes."""
  a = anchors[:, None, :]
  b = boxes[None, :, :]
  ih = np.clip(np.minimum(a[..., 2], b[..., 2]) -
               np.maximum(a[..., 0], b[..., 0]), 0, None)
  iw = np.clip(np.minimum(a[..., 3], b[..., 3]) -
               np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = ih * iw
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  return inter / (area_a + area_b - inter)


def _np_decode(targets, anchors):
  ha = anchors[:, 2] - anchors[:, 0]
  wa = anchors[:, 3] - anchors[:, 1]
  yca = anchors[:, 0] + ha / 2
  xca = anchors[:, 1] + wa / 2
  yc = targets[:, 0] * ha + yca
  xc = targets[:, 1] * wa + xca
  h = np.exp(targets[:, 2]) * ha
  w = np.exp(targets[:, 3]) * wa
  return np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], -1)


def _label(boxes, classes, **kwargs):
  labeler = anchor_labeler.AnchorLabeler(_anchors(), **kwargs)
  cls, box, num = labeler.label_anchors(
      tf.reshape(tf.constant(boxes, tf.float32), [-1, 4]),
      tf.constant(classes, tf.int32))
  return cls.numpy(), box.numpy(), float(num.numpy())


def test_box_equal_to_anchor_is_positive_with_zero_targets():
  anchors = _anchors()
  k = 100  # some level-3 anchor
  cls, box, num = _label(anchors[k:k + 1], [7])
  assert cls.shape == (len(anchors),) and cls.dtype == np.int32
  assert box.shape == (len(anchors), 4) and box.dtype == np.float32
  assert cls[k] == 7
  np.testing.assert_allclose(box[k], 0.0, atol=1e-5)
  assert num == float(np.sum(cls > 0))
  # Every other anchor is either negative or a positive of the same box.
  assert set(np.unique(cls)) <= {-1, 7}


def test_tiny_box_is_force_matched_to_its_best_anchor():
  anchors = _anchors()
  tiny = np.array([[10.0, 12.0, 14.0, 15.0]], np.float32)
  iou = _np_iou(anchors, tiny)[:, 0]
  assert iou.max() < 0.5  # would get no positive without force matching
  cls, box, num = _label(tiny, [3])
  best = int(np.argmax(iou))
  assert num == 1.0
  assert np.flatnonzero(cls > 0).tolist() == [best]
  assert cls[best] == 3
  np.testing.assert_allclose(_np_decode(box[best:best + 1],
                                        anchors[best:best + 1]),
                             tiny, atol=1e-3)


def test_negatives_positives_and_targets_match_numpy():
  anchors = _anchors()
  rng = np.random.default_rng(0)
  yx = rng.uniform(0, 90, size=(6, 2))
  hw = rng.uniform(3, 60, size=(6, 2))
  boxes = np.concatenate([yx, np.minimum(yx + hw, 127)], 1).astype(np.float32)
  classes = np.arange(1, 7, dtype=np.int32)
  cls, box, num = _label(boxes, classes)

  iou = _np_iou(anchors, boxes)
  best_gt = iou.argmax(1)
  expected = np.where(iou.max(1) >= 0.5, classes[best_gt], -1)
  # Force match: each box claims its best anchor; on a shared anchor the
  # lowest box index wins (written last here).
  for j in reversed(range(len(boxes))):
    expected[int(iou[:, j].argmax())] = classes[j]
  np.testing.assert_array_equal(cls, expected)
  assert num == float(np.sum(expected > 0))
  assert np.all(box[cls < 0] == 0.0)
  positive = cls > 0
  decoded = _np_decode(box[positive], anchors[positive])
  np.testing.assert_allclose(decoded, boxes[cls[positive] - 1], atol=1e-3)


def test_ignore_band_gets_minus_two():
  anchors = _anchors()
  box = np.array([[20.0, 20.0, 70.0, 60.0]], np.float32)
  iou = _np_iou(anchors, box)[:, 0]
  cls, targets, _ = _label(box, [5], match_threshold=0.5,
                           unmatched_threshold=0.3)
  band = (iou >= 0.3) & (iou < 0.5) & (np.arange(len(iou)) != iou.argmax())
  assert band.any()
  assert np.all(cls[band] == -2)
  assert np.all(cls[iou < 0.3] == -1)
  assert np.all(targets[cls == -2] == 0.0)


def test_no_boxes_gives_all_negatives():
  cls, box, num = _label(np.zeros([0, 4], np.float32), [])
  assert np.all(cls == -1)
  assert np.all(box == 0.0)
  assert num == 0.0


def test_encode_boxes_formula():
  boxes = tf.constant([[10.0, 20.0, 50.0, 40.0]])
  anchors = tf.constant([[0.0, 0.0, 32.0, 32.0]])
  got = anchor_labeler.encode_boxes(boxes, anchors).numpy()[0]
  want = [(30 - 16) / 32, (30 - 16) / 32, np.log(40 / 32), np.log(20 / 32)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_rejects_bad_thresholds():
  with pytest.raises(ValueError, match='unmatched_threshold'):
    anchor_labeler.AnchorLabeler(_anchors(), match_threshold=0.4,
                                 unmatched_threshold=0.5)
