"""Detection generator (§9.1-9.3) against planted detections and a numpy
re-implementation of the reference's per-class loop."""
import keras
import numpy as np
import pytest

from official_shapemask.modeling.layers.detection_generator import (
    DetectionGenerator)
from official_shapemask.ops import anchors
from official_shapemask.ops import box_ops

SIZE = 128
LEVELS = (3, 5)


def _anchor_boxes():
  return anchors.generate_anchors((SIZE, SIZE), *LEVELS)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _iou(box, boxes):
  ih = np.clip(np.minimum(box[2], boxes[:, 2]) -
               np.maximum(box[0], boxes[:, 0]), 0, None)
  iw = np.clip(np.minimum(box[3], boxes[:, 3]) -
               np.maximum(box[1], boxes[:, 1]), 0, None)
  inter = ih * iw
  union = ((box[2] - box[0]) * (box[3] - box[1]) +
           (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter)
  return inter / (union + 1e-8)


def _reference_generate(cls_logits, box_outputs, pre_nms, max_det, iou_thr,
                        score_thr):
  """The reference per image, per class loop (§9.3), in numpy."""
  boxes = np.asarray(box_ops.clip_boxes(
      box_ops.decode_boxes(box_outputs, _anchor_boxes()), SIZE, SIZE))
  scores = _sigmoid(cls_logits.astype(np.float64)).astype(np.float32)[:, 1:]
  out = []
  for c in range(scores.shape[1]):
    order = np.argsort(-scores[:, c], kind="stable")[:pre_nms]
    keep = []
    for i in order:
      if scores[i, c] <= score_thr:
        break
      if keep and np.any(_iou(boxes[i], boxes[keep]) > iou_thr):
        continue
      keep.append(i)
      if len(keep) == max_det:
        break
    out += [(-scores[i, c], c + 1, i) for i in keep]
  out = sorted(out, key=lambda t: (t[0], t[1]))[:max_det]
  return ([-s for s, _, _ in out], [c for _, c, _ in out],
          [boxes[i] for _, _, i in out])


def _generator(**kwargs):
  return DetectionGenerator((SIZE, SIZE), min_level=LEVELS[0],
                            max_level=LEVELS[1], **kwargs)


def test_finds_planted_detections_and_suppresses_duplicates():
  boxes = _anchor_boxes()
  total, num_classes = len(boxes), 7
  cls = np.full((2, total, num_classes), -8.0, np.float32)
  box = np.zeros((2, total, 4), np.float32)
  # P3 location (y=5, x=6), anchor 0 (scale 0, ratio 1: a 32-pixel square).
  anchor = (5 * 16 + 6) * 9
  neighbour = (5 * 16 + 7) * 9  # one stride to the right: IoU 0.6
  cls[0, anchor, 3] = 4.0
  cls[0, neighbour, 3] = 3.0  # same class, suppressed
  cls[0, neighbour, 5] = 2.0  # another class, kept
  cls[0, anchor, 0] = 9.0  # background channel never reported
  out = _generator()(cls, box)
  assert out["num_detections"].dtype == "int32"
  assert out["detection_classes"].dtype == "int32"
  num = np.asarray(out["num_detections"])
  assert num.tolist() == [2, 0]
  classes = np.asarray(out["detection_classes"])
  scores = np.asarray(out["detection_scores"])
  det_boxes = np.asarray(out["detection_boxes"])
  assert classes[0, :2].tolist() == [3, 5]
  np.testing.assert_allclose(scores[0, :2], _sigmoid(np.array([4.0, 2.0])),
                             rtol=1e-6)
  np.testing.assert_allclose(det_boxes[0, 0], boxes[anchor], atol=1e-4)
  np.testing.assert_allclose(det_boxes[0, 1], boxes[neighbour], atol=1e-4)
  # Padded slots: score -1, class 0, zero box.
  assert (scores[0, 2:] == -1).all() and (scores[1] == -1).all()
  assert (classes[0, 2:] == 0).all() and (det_boxes[1] == 0).all()
  assert det_boxes.shape == (2, 100, 4)


def test_boxes_are_clipped_to_canvas():
  total = len(_anchor_boxes())
  cls = np.full((1, total, 2), -8.0, np.float32)
  cls[0, 0, 1] = 5.0  # first P3 anchor: [-12, -12, 20, 20]
  out = _generator()(cls, np.zeros((1, total, 4), np.float32))
  np.testing.assert_allclose(np.asarray(out["detection_boxes"])[0, 0],
                             [0.0, 0.0, 20.0, 20.0], atol=1e-4)


def test_matches_reference_per_class_loop_on_random_outputs():
  rng = np.random.default_rng(0)
  total, num_classes = len(_anchor_boxes()), 7
  cls = rng.normal(-3.0, 1.5, (2, total, num_classes)).astype(np.float32)
  box = rng.normal(0.0, 0.3, (2, total, 4)).astype(np.float32)
  gen = _generator(pre_nms_num_boxes=300, max_num_detections=40,
                   nms_iou_threshold=0.5, score_threshold=0.05)
  out = {k: np.asarray(v) for k, v in gen(cls, box).items()}
  for b in range(2):
    scores, classes, boxes = _reference_generate(cls[b], box[b], 300, 40,
                                                 0.5, 0.05)
    assert out["num_detections"][b] == len(scores) == 40
    np.testing.assert_allclose(out["detection_scores"][b], scores, rtol=1e-5)
    assert out["detection_classes"][b].tolist() == classes
    np.testing.assert_allclose(out["detection_boxes"][b], np.stack(boxes),
                               atol=1e-3)


def test_config_round_trip_and_anchor_mismatch():
  gen = DetectionGenerator(image_size=(96, 128), min_level=3, max_level=6,
                           num_scales=2, aspect_ratios=(1.0, 3.0),
                           anchor_size=3.0, pre_nms_num_boxes=77,
                           nms_iou_threshold=0.6, score_threshold=0.1,
                           max_num_detections=13, name="my_gen")
  config = gen.get_config()
  clone = DetectionGenerator.from_config(config)
  # Registered: revived by name, with no custom_objects.
  revived = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(gen))
  assert type(revived) is DetectionGenerator and revived.get_config() == config
  assert clone.get_config() == config
  total = anchors.num_anchors((96, 128), 3, 6, 2, (1.0, 3.0))
  out = clone(np.zeros((1, total, 4), np.float32),
              np.zeros((1, total, 4), np.float32))
  assert out["detection_boxes"].shape == (1, 13, 4)
  with pytest.raises(ValueError, match="expected .* anchors"):
    clone(np.zeros((1, total + 9, 4), np.float32),
          np.zeros((1, total + 9, 4), np.float32))
