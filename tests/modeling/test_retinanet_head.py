"""RetinaNet head (§4): shapes, initialisers, anchor order, sharing, config."""
import math

import keras
import numpy as np
import pytest

from official_shapemask.modeling.heads.retinanet_head import RetinaNetHead
from official_shapemask.ops import anchors


def _pyramid(size=128, min_level=3, max_level=5, channels=16, batch=2):
  rng = np.random.default_rng(0)
  return {
      str(l): rng.normal(size=(batch, size // 2**l, size // 2**l,
                               channels)).astype(np.float32)
      for l in range(min_level, max_level + 1)
  }


def test_output_shapes_match_anchor_count():
  head = RetinaNetHead(min_level=3, max_level=5, num_classes=7, num_convs=2,
                       num_filters=16)
  cls, box = head(_pyramid(), training=False)
  total = anchors.num_anchors((128, 128), 3, 5)
  assert total == (16 * 16 + 8 * 8 + 4 * 4) * 9
  assert tuple(cls.shape) == (2, total, 7)
  assert tuple(box.shape) == (2, total, 4)


def test_initialisers_and_class_bias():
  head = RetinaNetHead(min_level=3, max_level=4, num_classes=91,
                       num_filters=64)
  head.build({"3": (None, 16, 16, 64), "4": (None, 8, 8, 64)})
  bias = np.asarray(head.class_predict.bias)
  assert bias.shape == (91 * 9,)
  np.testing.assert_allclose(bias, -math.log((1 - 0.01) / 0.01), rtol=1e-6)
  assert bias[0] == pytest.approx(-4.595, abs=1e-3)
  np.testing.assert_array_equal(np.asarray(head.box_predict.bias), 0.0)
  np.testing.assert_allclose(np.asarray(head.class_predict.kernel).std(),
                             1e-5, rtol=0.05)
  np.testing.assert_allclose(np.asarray(head.class_convs[0].kernel).std(),
                             0.01, rtol=0.05)
  np.testing.assert_array_equal(np.asarray(head.box_convs[3].bias), 0.0)


def test_flat_order_is_level_y_x_anchor_and_channel_is_anchor_major():
  num_classes, num_anchors = 3, 9
  head = RetinaNetHead(min_level=3, max_level=4, num_classes=num_classes,
                       num_convs=1, num_filters=8)
  feats = _pyramid(max_level=4)
  head(feats)
  # Predictor outputs only their bias: channel a * C + c -> 100 a + c.
  head.class_predict.kernel.assign(
      np.zeros(head.class_predict.kernel.shape, np.float32))
  pattern = np.array([100 * a + c for a in range(num_anchors)
                      for c in range(num_classes)], np.float32)
  head.class_predict.bias.assign(pattern)
  head.box_predict.kernel.assign(
      np.zeros(head.box_predict.kernel.shape, np.float32))
  head.box_predict.bias.assign(
      np.array([10 * a + j for a in range(num_anchors) for j in range(4)],
               np.float32))
  cls, box = head(feats)
  cls, box = np.asarray(cls), np.asarray(box)
  n3 = 16 * 16 * num_anchors
  for flat in (0, 5, 9 * 17 + 4, n3 - 1, n3 + 3, cls.shape[1] - 1):
    a = flat % num_anchors
    np.testing.assert_array_equal(cls[1, flat], 100 * a + np.arange(3))
    np.testing.assert_array_equal(box[1, flat], 10 * a + np.arange(4))


def test_level_content_lands_in_its_anchor_range():
  head = RetinaNetHead(min_level=3, max_level=5, num_classes=2, num_convs=1,
                       num_filters=8)
  feats = {k: np.zeros_like(v) for k, v in _pyramid().items()}
  zero_cls, _ = head(feats, training=False)
  rng = np.random.default_rng(1)
  for conv in (head.class_convs[0], head.class_predict):  # visible changes
    conv.kernel.assign(rng.normal(size=conv.kernel.shape).astype(np.float32))
  zero_cls, _ = head(feats, training=False)
  feats["4"][:, 3, 5, :] = 5.0  # one P4 location
  cls, _ = head(feats, training=False)
  changed = np.nonzero(np.any(np.asarray(cls) != np.asarray(zero_cls),
                              axis=(0, 2)))[0]
  n3 = 16 * 16 * 9
  # A 3x3 conv tower of depth 1 + 3x3 predictor touches a 5x5 neighbourhood.
  rows = (changed - n3) // 9 // 8
  cols = (changed - n3) // 9 % 8
  assert changed.min() >= n3 and changed.max() < n3 + 8 * 8 * 9
  assert rows.min() == 1 and rows.max() == 5
  assert cols.min() == 3 and cols.max() == 7


def test_convs_shared_across_levels_bn_per_level():
  head = RetinaNetHead(min_level=3, max_level=7, num_classes=5, num_convs=4,
                       num_filters=8)
  head.build({str(l): (None, None, None, 8) for l in range(3, 8)})
  kernels = [v for v in head.weights if v.path.endswith("kernel")]
  assert len(kernels) == 2 * 4 + 2  # one set of tower convs, not per level
  gammas = [v for v in head.weights if v.path.endswith("gamma")]
  assert len(gammas) == 2 * 4 * 5
  assert sorted(head.class_norms)[:2] == ["0-3", "0-4"]
  no_bn = RetinaNetHead(num_classes=5, num_convs=2, num_filters=8,
                        use_batch_norm=False)
  no_bn.build({str(l): (None, None, None, 8) for l in range(3, 8)})
  assert not [v for v in no_bn.weights if v.path.endswith("gamma")]


def test_config_round_trip_non_default():
  head = RetinaNetHead(min_level=3, max_level=6, num_classes=7,
                       num_anchors_per_location=6, num_convs=3,
                       num_filters=24, prior_probability=0.02,
                       use_batch_norm=False, norm_momentum=0.9,
                       norm_epsilon=1e-3, use_sync_bn=True, name="my_head")
  config = head.get_config()
  clone = RetinaNetHead.from_config(config)
  # Registered: revived by name, with no custom_objects.
  revived = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(head))
  assert type(revived) is RetinaNetHead and revived.get_config() == config
  assert clone.get_config() == config
  feats = _pyramid(max_level=6)
  cls, box = clone(feats)
  assert tuple(cls.shape) == (2, (256 + 64 + 16 + 4) * 6, 7)
  assert tuple(box.shape) == (2, (256 + 64 + 16 + 4) * 6, 4)
  np.testing.assert_allclose(np.asarray(clone.class_predict.bias),
                             -math.log(0.98 / 0.02), rtol=1e-6)
