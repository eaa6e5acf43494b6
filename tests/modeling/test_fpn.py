"""FPN (§3): shapes per level, P6 from P5's output, P7 from ReLU(P6), BN."""
import keras
import numpy as np
import pytest
from keras import ops

from official_shapemask.modeling.decoders.fpn import FPN


def _backbone_features(size=128, batch=2, channels=(8, 16, 32, 64)):
  rng = np.random.default_rng(0)
  return {
      str(level): rng.normal(size=(batch, size // 2**level,
                                   size // 2**level, c)).astype(np.float32)
      for level, c in zip((2, 3, 4, 5), channels)
  }


@pytest.mark.parametrize("max_level", [5, 6, 7])
def test_output_shapes_per_level(max_level):
  fpn = FPN(min_level=3, max_level=max_level, num_filters=16)
  out = fpn(_backbone_features(), training=False)
  assert sorted(out, key=int) == [str(l) for l in range(3, max_level + 1)]
  for level in range(3, max_level + 1):
    size = max(128 // 2**level, 1)
    assert tuple(out[str(level)].shape) == (2, size, size, 16)


def test_top_down_and_extra_levels_follow_reference():
  feats = _backbone_features()
  fpn = FPN(min_level=3, max_level=7, num_filters=8, use_batch_norm=False)
  out = {k: np.asarray(v) for k, v in fpn(feats).items()}

  def up(x):
    return ops.repeat(ops.repeat(x, 2, axis=1), 2, axis=2)

  lat5 = fpn.lateral["5"](feats["5"])
  p5 = fpn.post_hoc["5"](lat5)
  p4 = fpn.post_hoc["4"](up(lat5) + fpn.lateral["4"](feats["4"]))
  np.testing.assert_allclose(out["5"], np.asarray(p5), atol=1e-5)
  np.testing.assert_allclose(out["4"], np.asarray(p4), atol=1e-5)
  # P6 from the P5 *output* (not C5), P7 from ReLU(P6).
  p6 = fpn.coarse["6"](out["5"])
  np.testing.assert_allclose(out["6"], np.asarray(p6), atol=1e-5)
  p7 = fpn.coarse["7"](ops.relu(out["6"]))
  np.testing.assert_allclose(out["7"], np.asarray(p7), atol=1e-5)
  assert (out["6"] < 0).any()  # no activation on the outputs themselves


def test_batch_norm_per_level_without_relu():
  fpn = FPN(num_filters=8, norm_momentum=0.9, norm_epsilon=1e-3)
  out = fpn(_backbone_features(), training=True)
  assert sorted(fpn.norms, key=int) == ["3", "4", "5", "6", "7"]
  assert fpn.norms["3"].momentum == pytest.approx(0.9)
  for level in range(3, 8):
    p = np.asarray(out[str(level)])
    assert (p < 0).any()  # BN output, no ReLU after it
  # Laterals have biases and Glorot init; 3 laterals, 3 post-hoc, 2 extra.
  assert fpn.lateral["3"].use_bias
  assert len(fpn.lateral) == 3 and len(fpn.post_hoc) == 3
  assert len(fpn.coarse) == 2


def test_config_round_trip_non_default():
  fpn = FPN(min_level=3, max_level=6, num_filters=24, use_batch_norm=False,
            norm_momentum=0.95, norm_epsilon=1e-2, use_sync_bn=True,
            backbone_max_level=5, name="my_fpn")
  config = fpn.get_config()
  clone = FPN.from_config(config)
  # Registered: revived by name, with no custom_objects.
  revived = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(fpn))
  assert type(revived) is FPN and revived.get_config() == config
  assert clone.get_config() == config
  feats = _backbone_features()
  a, b = fpn(feats), clone(feats)
  assert {k: tuple(v.shape) for k, v in a.items()} == {
      k: tuple(v.shape) for k, v in b.items()}
  assert not clone.norms


def test_missing_backbone_level_is_named():
  feats = _backbone_features()
  del feats["4"]
  with pytest.raises(ValueError, match="'4'"):
    FPN(num_filters=8)(feats)
