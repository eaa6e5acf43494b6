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
  assert not sync.uses_fast_path(4, True, None)
  assert ours.uses_fast_path(4, True, None) is False  # frozen
  ours.trainable = True
  assert ours.uses_fast_path(4, True, None) and not ours.uses_fast_path(
      4, None, None)


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
  # One JAX process for both checks: Keras' layer, and the ghost batches
  # against JAX's autodiff (`_JAX_GHOST_SCRIPT`, below).
  result = run_under_jax(_JAX_SCRIPT + _JAX_GHOST_SCRIPT, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "JAX_OK" in result.stdout
  assert "JAX_GHOST_OK" in result.stdout


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


# ------------------------------------------------------------ ghost batches
def _ghost_data(groups, seed=6):
  """4 images whose groups differ in mean and spread (other statistics)."""
  x, upstream = _data(seed)
  scale = np.repeat(np.linspace(1.0, 3.0, groups), 4 // groups)
  x = (x - 20.0) * scale[:, None, None, None] + 20.0 + scale[:, None, None,
                                                            None]
  return x.astype(np.float32), upstream


def _replica_emulation(x, upstream, groups):
  """G Keras batch norms, one per slice (what G replicas compute): y, dx,
  dgamma and dbeta summed (SUM all-reduce), moving statistics averaged
  (MEAN-aggregated variables, `strategies.replica_consistent_state`)."""
  per = x.shape[0] // groups
  results = []
  for g in range(groups):
    layer, _ = _pair()
    rows = slice(g * per, (g + 1) * per)
    results.append(_train_step(layer, x[rows], upstream[rows]))
  y = np.concatenate([r[0] for r in results])
  dx = np.concatenate([r[1] for r in results])
  summed = [np.sum([r[i] for r in results], axis=0) for i in (2, 3)]
  averaged = [np.mean([r[i] for r in results], axis=0) for i in (4, 5)]
  return [y, dx] + summed + averaged


@pytest.mark.parametrize("groups", [2, 4])
def test_ghost_batches_equal_one_keras_norm_per_group(groups):
  x, upstream = _ghost_data(groups)
  ours = BatchNorm(momentum=0.9, epsilon=1e-4, num_groups=groups)
  ours.build(x.shape)
  _, template = _pair()
  for mine, theirs in zip(ours.weights, template.weights):
    mine.assign(theirs)
  got = _train_step(ours, x, upstream)
  want = _replica_emulation(x, upstream, groups)
  names = ["y", "dx", "dgamma", "dbeta", "moving_mean", "moving_variance"]
  for name, a, b in zip(names, got, want):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)
  # Not the whole-batch result: the groups have other statistics.
  _, whole = _pair()
  plain = _train_step(whole, x, upstream)
  assert np.max(np.abs(got[0] - plain[0])) > 0.1
  assert np.max(np.abs(got[5] - plain[5])) > 0.01


def test_ghost_batches_under_xla_match_eager():
  x, upstream = _ghost_data(2)

  def fresh():
    layer = BatchNorm(momentum=0.9, epsilon=1e-4, num_groups=2)
    layer.build(x.shape)
    return layer

  compiled_layer = fresh()

  @tf.function(jit_compile=True)
  def step(xt):
    with tf.GradientTape() as tape:
      tape.watch(xt)
      loss = tf.reduce_sum(compiled_layer(xt, training=True) * upstream)
    return tape.gradient(loss, [xt, compiled_layer.gamma.value])

  compiled = [np.asarray(g) for g in step(tf.constant(x))]
  eager = _train_step(fresh(), x, upstream)
  np.testing.assert_allclose(compiled[0], eager[1], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(compiled[1], eager[2], rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(compiled_layer.moving_variance),
                             eager[5], rtol=1e-5)


def test_ghost_batch_setting_config_errors_and_inference():
  x, _ = _data(7)
  layer = BatchNorm(num_groups=2, momentum=0.9)
  layer.build(x.shape)
  config = layer.get_config()
  assert config["num_groups"] == 2
  assert BatchNorm.from_config(config).num_groups == 2
  assert BatchNorm().get_config()["num_groups"] == 1
  # Inference uses the moving statistics: the groups do not matter.
  plain = BatchNorm(momentum=0.9)
  plain.build(x.shape)
  plain.moving_mean.assign(np.full(7, 19.0))
  layer.moving_mean.assign(np.full(7, 19.0))
  np.testing.assert_array_equal(np.asarray(layer(x, training=False)),
                                np.asarray(plain(x, training=False)))
  for bad in (0, -1, 1.5, True, "2"):
    with pytest.raises(ValueError, match="num_groups must be an integer"):
      BatchNorm(num_groups=bad)
  three = BatchNorm(num_groups=3)
  three.build(x.shape)
  with pytest.raises(ValueError, match="batch of 4 rows is not a multiple "
                     "of num_groups=3"):
    three(x, training=True)
  sync = BatchNorm(num_groups=2, synchronized=True)
  sync.build(x.shape)
  with pytest.raises(ValueError, match="num_groups=2"):
    sync(x, training=True)


# Run after `_JAX_SCRIPT`, in the same process (test_jax_backend_matches_keras).
_JAX_GHOST_SCRIPT = """
from keras import ops

rng = np.random.default_rng(1)
x = (rng.normal(size=(4, 5, 6, 7)) * 0.5 + 20).astype("float32")
x[2:] = x[2:] * 3.0 - 4.0
w = rng.normal(size=x.shape).astype("float32")
gamma = np.linspace(0.5, 2.0, 7).astype("float32")
beta = np.linspace(-1.0, 1.0, 7).astype("float32")


def reference(x, gamma, beta):
  # Ghost batch norm written out, differentiated by JAX.
  g = ops.reshape(x, (2, -1, 7))
  mean = ops.mean(g, axis=1, keepdims=True)
  var = ops.mean(ops.square(g - mean), axis=1, keepdims=True)
  y = (g - mean) / ops.sqrt(var + 1e-4) * gamma + beta
  return ops.reshape(y, x.shape), ops.mean(mean, axis=(0, 1)), ops.mean(
      var, axis=(0, 1))


def ours(x, gamma, beta):
  return batch_norm.batch_norm_train(x, gamma, beta, 1e-4, num_groups=2)


out = []
for fn in (reference, ours):
  def loss(x, gamma, beta, fn=fn):
    y, mean, var = fn(x, gamma, beta)
    return (y * w).sum(), (y, mean, var)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, aux), grads = grad(x, gamma, beta)
  out.append([np.asarray(a) for a in aux] + [np.asarray(g) for g in grads])
for name, a, b in zip(["y", "mean", "var", "dx", "dgamma", "dbeta"], *out):
  np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)
# The layer's moving statistics under stateless_call (the JAX engine's way).
bn = batch_norm.BatchNormalization(momentum=0.9, epsilon=1e-4, num_groups=2)
bn.build(x.shape)
_, new = bn.stateless_call([gamma * 0 + 1, beta * 0],
                           [v.value for v in bn.non_trainable_variables], x,
                           training=True)
np.testing.assert_allclose(np.asarray(new[0]), 0.1 * out[0][1], rtol=1e-5)
np.testing.assert_allclose(np.asarray(new[1]), 0.9 + 0.1 * out[0][2],
                           rtol=1e-5)
print("JAX_GHOST_OK")
"""

def test_channel_sum_forms_agree_and_a_bad_one_is_named():
  x, upstream = _data(6)
  gamma = tf.constant(np.linspace(0.5, 2.0, 7), tf.float32)
  beta = tf.constant(np.linspace(-1.0, 1.0, 7), tf.float32)
  out = {}
  for groups in (1, 2):  # Whole batch, and ghost batches of 2 images.
    for form in ("matmul", "reduce"):
      xt = tf.constant(x)
      with tf.GradientTape() as tape:
        tape.watch([xt, gamma, beta])
        y, mean, variance = batch_norm.batch_norm_train(
            xt, gamma, beta, 1e-4, num_groups=groups, channel_sum=form)
        loss = tf.reduce_sum(y * upstream)
      grads = tape.gradient(loss, [xt, gamma, beta])
      out[groups, form] = [np.asarray(t) for t in [y, mean, variance] + grads]
    for a, b in zip(out[groups, "matmul"], out[groups, "reduce"]):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # The groups have their own statistics: another normalisation.
  assert not np.allclose(out[1, "matmul"][0], out[2, "matmul"][0], atol=1e-3)
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
    return batch_norm.batch_norm_train(x, gamma, beta, 1e-4, channel_sum=form)

  def float32_path(x, gamma, beta):  # the layer's former dtype handling
    y, m, v = batch_norm.batch_norm_train(x.astype(jnp.float32), gamma, beta,
                                          1e-4, channel_sum=form)
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
