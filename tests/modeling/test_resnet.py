"""ResNet v1.5 backbone (§2): shapes, fixed padding, frozen kernels, config."""
import math

import keras
import numpy as np
import pytest

from official_shapemask.modeling.backbones.resnet import ResNet


@pytest.mark.parametrize("depth,expansion", [(10, 1), (50, 4)])
def test_output_shapes_per_level(depth, expansion):
  backbone = ResNet(depth=depth, width_multiplier=0.25)
  feats = backbone(np.zeros((2, 64, 64, 3), np.float32), training=False)
  assert sorted(feats) == ["2", "3", "4", "5"]
  for level, filters in zip((2, 3, 4, 5), (16, 32, 64, 128)):
    size = 64 // 2**level
    assert tuple(feats[str(level)].shape) == (2, size, size,
                                              filters * expansion)


def test_strided_convs_use_fixed_symmetric_padding():
  backbone = ResNet(depth=10, width_multiplier=0.25)
  images = np.random.default_rng(0).uniform(
      0.5, 1.0, (1, 64, 64, 3)).astype(np.float32)
  backbone(images)  # build
  kernel = np.zeros(backbone.stem.conv.kernel.shape, np.float32)
  kernel[3, 3, 0, :] = 1.0  # centre tap of the 7x7 reads channel 0
  backbone.stem.conv.kernel.assign(kernel)
  out = np.asarray(backbone.stem(images, training=False))
  # Fixed padding pads 3 before: output (i, j) is centred on input (2i, 2j).
  # (TF "SAME" would pad 2 before on a 64-pixel input and centre on 2i + 1.)
  expected = images[0, ::2, ::2, 0] / math.sqrt(1.0 + 1e-4)
  np.testing.assert_allclose(out[0, :, :, 0], expected, rtol=1e-5)


def test_early_conv_kernels_frozen_like_reference():
  backbone = ResNet(depth=50, width_multiplier=0.25)
  backbone(np.zeros((1, 64, 64, 3), np.float32))
  frozen = [v.path for v in backbone.non_trainable_weights
            if v.path.endswith("kernel")]
  # Stem + conv2_x: (projection + 3 convs) + 3 + 3 = 11 kernels.
  assert len(frozen) == 11
  assert all("stem" in p or "block_group1_" in p for p in frozen)
  # Their BatchNorms stay trainable; nothing else is frozen.
  trainable = {v.path for v in backbone.trainable_weights}
  assert any("stem/bn/gamma" in p for p in trainable)
  assert all(p.endswith(("moving_mean", "moving_variance", "kernel"))
             for p in (v.path for v in backbone.non_trainable_weights))

  unfrozen = ResNet(depth=18, width_multiplier=0.25,
                    freeze_early_convs=False)
  unfrozen(np.zeros((1, 64, 64, 3), np.float32))
  assert not [v for v in unfrozen.non_trainable_weights
              if v.path.endswith("kernel")]
  frozen18 = ResNet(depth=18, width_multiplier=0.25)
  frozen18(np.zeros((1, 64, 64, 3), np.float32))
  # Stem + (projection + 2) + 2 basic-block convs.
  assert len([v for v in frozen18.non_trainable_weights
              if v.path.endswith("kernel")]) == 6


def test_freeze_early_norms_like_the_port():
  """gamma/beta of stem + conv2_x frozen; batch statistics still used."""
  import tensorflow as tf
  backbone = ResNet(depth=50, width_multiplier=0.25, freeze_early_norms=True)
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(
      np.float32)
  backbone(images)
  frozen_affine = [v.path for v in backbone.non_trainable_weights
                   if v.path.endswith(("gamma", "beta"))]
  # The 11 batch norms after the 11 frozen kernels, 2 variables each.
  assert len(frozen_affine) == 22
  assert all("stem" in p or "block_group1_" in p for p in frozen_affine)
  assert not any("block_group1_" in v.path or "stem" in v.path
                 for v in backbone.trainable_weights)
  # Training mode still normalises with batch statistics and updates the
  # moving averages of the frozen stages.
  before = np.asarray(backbone.stem.bn.moving_mean).copy()
  with tf.GradientTape() as tape:
    feats = backbone(images, training=True)
    loss = tf.reduce_sum(feats["5"])
  grads = tape.gradient(loss, backbone.trainable_variables)
  assert all(g is not None for g in grads)
  assert not np.allclose(np.asarray(backbone.stem.bn.moving_mean), before)
  stem_out = np.asarray(backbone.stem(images, training=True))
  # ReLU(batch-normalised) with beta 0: about half the values are positive.
  assert 0.3 < (stem_out > 0).mean() < 0.7
  assert backbone.get_config()["freeze_early_norms"] is True


def test_kernel_init_and_batch_norm_settings():
  backbone = ResNet(depth=10)
  backbone(np.zeros((1, 64, 64, 3), np.float32))
  kernel = np.asarray(backbone.stem.conv.kernel)
  # Variance scaling, fan_in = 7 * 7 * 3, scale 1.
  np.testing.assert_allclose(kernel.std(), math.sqrt(1.0 / 147), rtol=0.1)
  assert backbone.stem.conv.bias is None
  assert backbone.stem.bn.momentum == pytest.approx(0.997)
  assert backbone.stem.bn.epsilon == pytest.approx(1e-4)
  # Gamma starts at 1 everywhere (no zero-init of the last BN).
  gammas = [np.asarray(v) for v in backbone.weights if v.path.endswith(
      "gamma")]
  assert all(np.all(g == 1.0) for g in gammas)


def test_config_round_trip_non_default():
  backbone = ResNet(depth=18, width_multiplier=0.5, freeze_early_convs=False,
                    norm_momentum=0.9, norm_epsilon=1e-3, use_sync_bn=True,
                    stem_pool_padding="symmetric", name="my_resnet")
  config = backbone.get_config()
  clone = ResNet.from_config(config)
  # Registered: revived by name, with no custom_objects.
  revived = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(backbone))
  assert type(revived) is ResNet and revived.get_config() == config
  assert clone.get_config() == config
  assert config["depth"] == 18 and config["width_multiplier"] == 0.5
  assert config["freeze_early_convs"] is False
  assert config["stem_pool_padding"] == "symmetric"
  x = np.zeros((1, 64, 64, 3), np.float32)
  backbone(x)
  clone(x)
  assert [tuple(v.shape) for v in clone.weights] == [
      tuple(v.shape) for v in backbone.weights]
  assert clone.stem.bn.momentum == pytest.approx(0.9)
  assert isinstance(clone.stem.bn, keras.layers.BatchNormalization)
  assert clone.stem.bn.synchronized


def test_rejects_unknown_depth():
  with pytest.raises(ValueError, match="depth 42"):
    ResNet(depth=42)


def _numpy_max_pool(x, before, after):
  """3x3 / 2 max-pool of [B, H, W, C] padded with -inf (before, after)."""
  x = np.pad(x, [[0, 0], [before, after], [before, after], [0, 0]],
             constant_values=-np.inf)
  out_h, out_w = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  out = np.full((x.shape[0], out_h, out_w, x.shape[3]), -np.inf, np.float32)
  for dy in range(3):
    for dx in range(3):
      out = np.maximum(out, x[:, dy:dy + 2 * out_h:2, dx:dx + 2 * out_w:2])
  return out


@pytest.mark.parametrize("size", [64, 66])
def test_stem_pool_padding(size):
  """SAME pads (0, 1) on an even stem output, symmetric (1, 1) always."""
  images = np.random.default_rng(1).normal(
      size=(1, size, size, 3)).astype(np.float32)
  same = ResNet(depth=10, width_multiplier=0.25)
  symmetric = ResNet(depth=10, width_multiplier=0.25,
                     stem_pool_padding="symmetric")
  same(images)
  symmetric(images)
  symmetric.set_weights(same.get_weights())
  stem = np.asarray(same.stem(images, training=False))
  even = stem.shape[1] % 2 == 0
  for backbone, before in ((same, 0 if even else 1), (symmetric, 1)):
    x = _numpy_max_pool(stem, before, 1)
    assert x.shape[1] == -(-stem.shape[1] // 2)
    for blocks in backbone.groups:
      for block in blocks:
        x = block(x, training=False)
    np.testing.assert_allclose(
        np.asarray(backbone(images, training=False)["5"]), np.asarray(x),
        rtol=1e-5, atol=1e-5)
  c5_same = np.asarray(same(images, training=False)["5"])
  c5_symmetric = np.asarray(symmetric(images, training=False)["5"])
  assert np.allclose(c5_same, c5_symmetric, rtol=1e-5, atol=1e-5) != even


def test_rejects_unknown_stem_pool_padding():
  with pytest.raises(ValueError, match="stem_pool_padding.*'valid'"):
    ResNet(depth=10, stem_pool_padding="valid")
