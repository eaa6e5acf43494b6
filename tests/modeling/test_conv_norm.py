"""conv_norm: conv + batch norm, folded into one convolution in inference."""
import keras
import numpy as np
import pytest
from keras import ops

from official_shapemask.modeling.layers.conv_norm import conv_norm
from official_shapemask.modeling.layers.conv_norm import folded_kernel_and_bias


def _pair(use_bias, strides=1, dtype=None, seed=0):
  """A conv and a batch norm with non-trivial statistics and affine."""
  keras.utils.set_random_seed(seed)
  kwargs = {"dtype": dtype} if dtype else {}
  conv = keras.layers.Conv2D(6, 3, strides=strides, use_bias=use_bias,
                             padding="same" if strides == 1 else "valid",
                             bias_initializer="random_normal", **kwargs)
  norm = keras.layers.BatchNormalization(epsilon=1e-4, **kwargs)
  conv.build((None, 9, 9, 4))
  norm.build(conv.compute_output_shape((None, 9, 9, 4)))
  rng = np.random.default_rng(seed)
  norm.gamma.assign(rng.uniform(0.5, 2.0, 6))
  norm.beta.assign(rng.normal(size=6))
  norm.moving_mean.assign(rng.normal(size=6))
  norm.moving_variance.assign(rng.uniform(0.1, 3.0, 6))
  x = rng.normal(size=(2, 9, 9, 4)).astype(np.float32)
  return conv, norm, x


@pytest.mark.parametrize("use_bias,strides", [(True, 1), (False, 1),
                                              (False, 2)])
def test_inference_equals_unfolded(use_bias, strides):
  conv, norm, x = _pair(use_bias, strides)
  expected = ops.convert_to_numpy(norm(conv(x), training=False))
  for training in (False, None):
    got = ops.convert_to_numpy(conv_norm(conv, norm, x, training=training))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_training_uses_batch_statistics_and_updates_them():
  conv, norm, x = _pair(True)
  before = ops.convert_to_numpy(norm.moving_mean).copy()
  got = ops.convert_to_numpy(conv_norm(conv, norm, x, training=True))
  # Batch statistics: every channel of the output has mean ~beta.
  np.testing.assert_allclose(got.mean(axis=(0, 1, 2)),
                             ops.convert_to_numpy(norm.beta), atol=1e-4)
  assert not np.allclose(ops.convert_to_numpy(norm.moving_mean), before)


def test_frozen_norm_folds_in_training_mode():
  conv, norm, x = _pair(True)
  norm.trainable = False
  expected = ops.convert_to_numpy(norm(conv(x), training=True))
  got = ops.convert_to_numpy(conv_norm(conv, norm, x, training=True))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_mixed_bfloat16_close_to_float32():
  conv, norm, x = _pair(True, dtype="mixed_bfloat16")
  got = conv_norm(conv, norm, x, training=False)
  assert keras.backend.standardize_dtype(got.dtype) == "bfloat16"
  kernel, bias = folded_kernel_and_bias(conv, norm)
  ref = ops.convert_to_numpy(ops.conv(x, kernel, padding="same") + bias)
  got = ops.convert_to_numpy(ops.cast(got, "float32"))
  assert np.max(np.abs(got - ref)) <= 0.05 * np.max(np.abs(ref))


def test_rejects_conv_with_activation():
  conv, norm, x = _pair(True)
  conv.activation = keras.activations.relu
  with pytest.raises(ValueError, match="has an activation"):
    conv_norm(conv, norm, x, training=False)


def test_none_norm_is_the_conv():
  conv, _, x = _pair(True)
  np.testing.assert_array_equal(
      ops.convert_to_numpy(conv_norm(conv, None, x)),
      ops.convert_to_numpy(conv(x)))
