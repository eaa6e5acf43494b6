"""BatchNorm: Keras' batch norm with a closed-form training gradient."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.modeling.layers import batch_norm

BatchNorm = batch_norm.BatchNormalization


def _data(seed=0, shape=(4, 5, 6, 7)):
  rng = np.random.default_rng(seed)
  # A large mean relative to the spread: the two-pass variance must hold.
  x = (rng.normal(size=shape) * 0.5 + 20.0).astype(np.float32)
  upstream = rng.normal(size=shape).astype(np.float32)
  return x, upstream


def _train_step(layer, x, upstream, dtype=None):
  xt = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(xt)
    y = layer(tf.cast(xt, dtype) if dtype else xt, training=True)
    loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
  grads = tape.gradient(loss, [xt, layer.gamma, layer.beta])
  return [np.asarray(y, np.float32)] + [np.asarray(g) for g in grads] + [
      np.asarray(layer.moving_mean), np.asarray(layer.moving_variance)]


def _pair(**kwargs):
  layers = []
  for cls in (keras.layers.BatchNormalization, BatchNorm):
    layer = cls(momentum=0.9, epsilon=1e-4, **kwargs)
    layer.build((4, 5, 6, 7))
    layer.gamma.assign(np.linspace(0.5, 2.0, 7))
    layer.beta.assign(np.linspace(-1.0, 1.0, 7))
    layer.moving_mean.assign(np.full(7, 19.0))
    layers.append(layer)
  return layers


def test_training_matches_keras_values_gradients_and_moving_stats():
  x, upstream = _data()
  ref, ours = (_train_step(layer, x, upstream) for layer in _pair())
  names = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]
  for name, a, b in zip(names, ours, ref):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)
  # The statistics moved (the test would pass vacuously otherwise).
  assert not np.allclose(ours[4], 19.0)


def test_inference_is_keras():
  x, _ = _data(1)
  keras_bn, ours = _pair()
  np.testing.assert_array_equal(np.asarray(ours(x, training=False)),
                                np.asarray(keras_bn(x, training=False)))


def test_mixed_bfloat16_output_dtype_and_values():
  x, upstream = _data(2)
  keras_bn, ours = _pair(dtype="mixed_bfloat16")
  y = ours(tf.cast(x, tf.bfloat16), training=True)
  assert y.dtype == tf.bfloat16
  ref = _train_step(keras_bn, x, upstream, tf.bfloat16)
  got = _train_step(ours, x, upstream, tf.bfloat16)
  np.testing.assert_allclose(got[0], ref[0], atol=0.05)
  np.testing.assert_allclose(got[2], ref[2], rtol=0.05, atol=0.5)


def test_frozen_layer_and_sync_fall_back_to_keras():
  x, _ = _data(3)
  keras_bn, ours = _pair()
  ours.trainable = False
  keras_bn.trainable = False
  np.testing.assert_array_equal(np.asarray(ours(x, training=True)),
                                np.asarray(keras_bn(x, training=True)))
  sync = BatchNorm(synchronized=True)
  sync.build(x.shape)
  assert not sync._fast_path(4, True, None)  # pylint: disable=protected-access
  assert ours._fast_path(4, True, None) is False  # frozen
  ours.trainable = True
  assert ours._fast_path(4, True, None) and not ours._fast_path(4, None, None)


def test_xla_compiled_step_matches_eager():
  x, upstream = _data(4)
  _, ours = _pair()

  @tf.function(jit_compile=True)
  def step(xt):
    with tf.GradientTape() as tape:
      tape.watch(xt)
      loss = tf.reduce_sum(ours(xt, training=True) * upstream)
    return tape.gradient(loss, [xt, ours.gamma.value])

  compiled = [np.asarray(g) for g in step(tf.constant(x))]
  _, fresh = _pair()
  eager = _train_step(fresh, x, upstream)
  np.testing.assert_allclose(compiled[0], eager[1], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(compiled[1], eager[2], rtol=2e-4, atol=2e-4)


_JAX_SCRIPT = """
import jax, numpy as np, keras
assert keras.backend.backend() == "jax"
from official_shapemask.modeling.layers import batch_norm

BatchNorm = batch_norm.BatchNormalization
rng = np.random.default_rng(0)
x = (rng.normal(size=(4, 5, 6, 7)) * 0.5 + 20).astype("float32")
w = rng.normal(size=x.shape).astype("float32")
out = []
for cls in (keras.layers.BatchNormalization, BatchNorm):
  bn = cls(momentum=0.9, epsilon=1e-4)
  bn.build(x.shape)
  def loss(x, trainable, other):
    y, new = bn.stateless_call(trainable, other, x, training=True)
    return (y * w).sum(), new
  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (value, new), (dx, dvars) = fn(
      x, [v.value for v in bn.trainable_variables],
      [v.value for v in bn.non_trainable_variables])
  out.append([np.asarray(dx)] + [np.asarray(g) for g in dvars] +
             [np.asarray(v) for v in new])
for a, b in zip(*out):
  np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4)
print("JAX_OK")
"""


def test_jax_backend_matches_keras(run_under_jax):
  result = run_under_jax(_JAX_SCRIPT, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "JAX_OK" in result.stdout


class _Holder(keras.Model):
  """Holds batch norms in a list, as the heads do (`.weights.h5` names
  list-held layers after their class)."""

  def __init__(self, cls, **kwargs):
    super().__init__(**kwargs)
    self.norms = [cls(), cls()]

  def build(self, input_shape):
    for norm in self.norms:
      norm.build(input_shape)

  def call(self, x, training=None):
    for norm in self.norms:
      x = norm(x, training=training)
    return x


def test_weight_files_interchangeable_with_keras_layer(tmp_path):
  x, _ = _data(5)
  keras_holder = _Holder(keras.layers.BatchNormalization)
  keras_holder.build(x.shape)
  keras_holder(x, training=True)  # non-default moving statistics
  path = str(tmp_path / "bn.weights.h5")
  keras_holder.save_weights(path)
  ours = _Holder(BatchNorm)
  ours.build(x.shape)
  ours.load_weights(path)
  for a, b in zip(keras_holder.weights, ours.weights):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(keras_holder(x)))


def test_channel_sum_forms_agree_and_a_bad_one_is_named():
  x, upstream = _data(6)
  gamma = tf.constant(np.linspace(0.5, 2.0, 7), tf.float32)
  beta = tf.constant(np.linspace(-1.0, 1.0, 7), tf.float32)
  out = {}
  for form in ("matmul", "reduce"):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
      tape.watch([xt, gamma, beta])
      y, mean, variance = batch_norm.batch_norm_train(xt, gamma, beta, 1e-4,
                                                      channel_sum=form)
      loss = tf.reduce_sum(y * upstream)
    grads = tape.gradient(loss, [xt, gamma, beta])
    out[form] = [np.asarray(t) for t in [y, mean, variance] + grads]
  for a, b in zip(out["matmul"], out["reduce"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="channel_sum.*'rows'"):
    batch_norm.batch_norm_train(tf.constant(x), gamma, beta, 1e-4,
                                channel_sum="rows")


# bfloat16 in, bfloat16 out: the float32 computation on the upcast input,
# rounded once, and the backward pass saves no float32 [N, C] tensor.
_JAX_BF16_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, keras
from official_shapemask.modeling.layers import batch_norm

rng = np.random.default_rng(0)
shape = (4, 6, 6, 16)
x = jnp.asarray((rng.normal(size=shape) * 0.5 + 3).astype("float32"),
                jnp.bfloat16)
w = jnp.asarray(rng.normal(size=shape).astype("float32"), jnp.bfloat16)
gamma = jnp.linspace(0.5, 2.0, 16, dtype=jnp.float32)
beta = jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32)
for form in ("reduce", "matmul"):
  def bf16_path(x, gamma, beta):
    return batch_norm.batch_norm_train(x, gamma, beta, 1e-4, form)

  def float32_path(x, gamma, beta):  # the layer's former dtype handling
    y, m, v = batch_norm.batch_norm_train(x.astype(jnp.float32), gamma, beta,
                                          1e-4, form)
    return y.astype(jnp.bfloat16), m, v

  results = []
  for fn in (bf16_path, float32_path):
    (y, mean, var), vjp = jax.vjp(fn, x, gamma, beta)
    assert y.dtype == jnp.bfloat16 and mean.dtype == jnp.float32
    dx, dgamma, dbeta = vjp((w, jnp.zeros_like(mean), jnp.zeros_like(var)))
    assert dx.dtype == jnp.bfloat16 and dgamma.dtype == jnp.float32
    big_f32 = [r.shape for r in jax.tree_util.tree_leaves(vjp)
               if r.dtype == jnp.float32 and r.size >= x.size]
    results.append(([np.asarray(t, np.float32)
                     for t in (y, mean, var, dx, dgamma, dbeta)], big_f32))
  (ours, ours_f32), (former, former_f32) = results
  for a, b in zip(ours, former):
    np.testing.assert_array_equal(a, b)
  assert ours_f32 == [], ours_f32  # saved for the backward pass: bf16 only
  assert former_f32, "the float32 path should keep float32 residuals"
print("BF16_OK")
"""


def test_bfloat16_io_equals_the_float32_path_and_keeps_no_float32(
    run_under_jax):
  result = run_under_jax(_JAX_BF16_SCRIPT, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "BF16_OK" in result.stdout


def test_layer_under_jax_reduces_channels_and_keeps_bfloat16(run_under_jax):
  script = """
import jax, jax.numpy as jnp, numpy as np, keras
from official_shapemask.modeling.layers import batch_norm
bn = batch_norm.BatchNormalization(dtype="mixed_bfloat16")
bn.build((2, 8, 8, 32))
x = jnp.ones((2, 8, 8, 32), jnp.bfloat16)
def loss(x, trainable, other):
  y, _ = bn.stateless_call(trainable, other, x, training=True)
  assert y.dtype == jnp.bfloat16
  return y.astype(jnp.float32).sum()
text = jax.jit(jax.grad(loss)).lower(
    x, [v.value for v in bn.trainable_variables],
    [v.value for v in bn.non_trainable_variables]).as_text()
assert "dot_general" not in text, "channel sums should be reductions"
assert "reduce" in text
print("LAYER_OK")
"""
  result = run_under_jax(script, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "LAYER_OK" in result.stdout
