"""Batch normalisation with a hand-written training gradient.

`BatchNormalization` here is `keras.layers.BatchNormalization` (same variables, names,
defaults, moving-average update and inference path) with one change: in
training mode over the last axis, the normalisation and its gradient are one
`keras.ops.custom_gradient` function, and the per-channel sums are matrix
products with a ones vector.

Why: Keras 3 has no fused batch norm. Its training path is `moments` plus
`batch_normalization`, differentiated op by op: about ten passes over the
activation, plus reductions over three axes and their `Tile` gradients. On
this project's CPU benchmark that made our training step slower than the
Model Garden port's (whose `tf_keras` layers use oneDNN's fused kernel)
although the convolution work is the same. The closed-form backward pass
is five elementwise operations and two channel sums, and the sums run as
oneDNN matmuls. Forward + backward of a ``[2, 160, 160, 256]`` activation
on the 2-core CPU: 26 ms, against 41 ms for Keras' layer and 13 ms for
TensorFlow's fused kernel. Under XLA (TPU, the JAX GPU path) both forms
compile to fused kernels; the numbers are the same up to float rounding.

Statistics are two-pass (mean, then the mean of squared deviations), as in
Keras: no ``E[x^2] - E[x]^2`` cancellation.

Ghost batches (``num_groups = G > 1``): the batch ``[B, ...]`` is split into
G consecutive groups of ``B / G`` images, each normalised with its own
statistics (the view ``[G, B/G * H * W, C]``), as G replicas of a
`tf.distribute` strategy each normalise their own batch. The moving averages
take the mean over the groups of the group means and of the group (biased)
variances: what G replicas with MEAN-aggregated moving statistics
(`training/strategies.replica_consistent_state`) write. The engines set G
from `Experiment.per_replica_batch_size` (`ShapeMaskModel.set_batch_groups`).

Dtypes: under mixed precision the activation comes in and goes out in the
compute dtype (bfloat16); the statistics and the normalisation math run in
float32 on values cast where they are used, and the backward pass keeps
the bfloat16 input (not a float32 copy) and recomputes ``x - mean`` from
it. So no full-size float32 tensor has to be written to memory between
the forward and the backward pass, or between the ops of either. In
float32 every cast is the identity and the values are the same.

Channel sums: under the TensorFlow backend they are matmuls with a ones
row (oneDNN's fast path on the CPU, where TensorFlow does not fuse). Under
JAX the step is one XLA program, and a reduction fuses with the elementwise
op that feeds it while a matmul's operand has to be written out whole
first, so there they are reductions (`channel_sum="reduce"`).
"""

import operator

import keras
from keras import ops


def _default_channel_sum():
  return "matmul" if keras.backend.backend() == "tensorflow" else "reduce"


def batch_norm_train(x, gamma, beta, epsilon, *, num_groups=1,
                     channel_sum=None):
  """Training-mode batch norm over the last axis, closed-form gradient.

  Args:
    x: ``[B, ..., C]`` activation, float32 or the layer's compute dtype
      (bfloat16 / float16 under mixed precision).
    gamma: float32 ``[C]`` scale.
    beta: float32 ``[C]`` offset.
    epsilon: float, added to the variance.
    num_groups: int G, ghost batches: each of G consecutive groups of
      ``B / G`` rows of `x` is normalised with its own statistics (B must be
      a multiple of G). 1 = the whole batch.
    channel_sum: "matmul" (``ones [1, N] @ t``) or "reduce" (a sum over
      the rows); None: "matmul" under the TensorFlow backend, else "reduce"
      (see the module docstring). Same values up to summation order.

  Returns:
    ``(y, mean, variance)``: ``y = gamma * (x - mean) / sqrt(variance +
    epsilon) + beta`` in `x`'s dtype and shape (computed in float32; mean
    and variance of the row's group), and the biased float32 batch
    statistics ``[C]``, with G > 1 the mean over the groups of the group
    means and of the group variances (no gradient flows through them;
    Keras' moving averages take none either). The gradient with respect to
    `x` comes back in `x`'s dtype.
  """
  # Everything runs on the [N, C] view (G > 1: [G, N / G, C]); a channel
  # sum is [C] (G > 1: per group, [G, 1, C]).
  channels = x.shape[-1]
  grouped = num_groups > 1
  if grouped:
    flat = ops.reshape(x, (num_groups, -1, channels))
    num = ops.shape(flat)[1]
  else:
    flat = ops.reshape(x, (-1, channels))
    num = ops.shape(flat)[0]
  count = ops.cast(num, "float32")
  if channel_sum is None:
    channel_sum = _default_channel_sum()
  if channel_sum == "matmul":
    ones = ops.ones((num_groups, 1, num) if grouped else (1, num),
                    dtype="float32")

    def channel_total(t):
      sums = ops.matmul(ones, t)
      return sums if grouped else sums[0]
  elif channel_sum == "reduce":

    def channel_total(t):
      return ops.sum(t, axis=1, keepdims=True) if grouped else ops.sum(
          t, axis=0)
  else:
    raise ValueError(f"batch_norm_train: channel_sum must be 'matmul' or "
                     f"'reduce', got {channel_sum!r}")

  def over_groups(t, reduce):
    """A per-group ``[G, 1, C]`` -> ``[C]`` (G = 1: as it is)."""
    return reduce(t, axis=(0, 1)) if grouped else t

  def as_float32(t):
    return ops.cast(t, "float32")

  @ops.custom_gradient
  def normalize(x, gamma, beta):
    dtype = x.dtype
    mean = channel_total(as_float32(x)) / count
    centered = as_float32(x) - mean
    variance = channel_total(ops.square(centered)) / count
    inv = ops.rsqrt(variance + epsilon)
    scale = gamma * inv
    y = ops.cast(centered * scale + beta, dtype)

    def grad(*args, upstream=None):
      # TensorFlow passes one upstream gradient per output as positional
      # arguments, JAX one tuple; only y's is used (the statistics are
      # outputs without gradient).
      if upstream is None:
        upstream = args[0] if len(args) == 1 else args
      if isinstance(upstream, (tuple, list)):
        upstream = upstream[0]
      upstream = as_float32(upstream)
      # x - mean again, from the saved input in its own dtype: the float32
      # `centered` of the forward pass is not kept for the backward.
      recentered = as_float32(x) - mean
      d_beta = channel_total(upstream)
      dot = channel_total(upstream * recentered)  # sum(dy * (x - mean))
      d_gamma = dot * inv
      # dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), per group.
      k = scale * inv * inv * dot / count
      d_x = (upstream * scale - recentered * k) - scale * d_beta / count
      return (ops.cast(d_x, dtype), over_groups(d_gamma, ops.sum),
              over_groups(d_beta, ops.sum))

    return (y, ops.stop_gradient(over_groups(mean, ops.mean)),
            ops.stop_gradient(over_groups(variance, ops.mean))), grad

  y, mean, variance = normalize(flat, gamma, beta)
  return ops.reshape(y, ops.shape(x)), mean, variance


@keras.saving.register_keras_serializable(package="official_shapemask")
class BatchNormalization(keras.layers.BatchNormalization):
  """`keras.layers.BatchNormalization` with a closed-form training gradient.

  Takes Keras' arguments and one more, `num_groups` (int, default 1): in
  training, ghost batches of ``B / num_groups`` consecutive images, each
  normalised with its own statistics (see the module docstring; the batch
  must be a multiple of it). The custom path is used in training mode for a
  trainable, non-synchronized, unmasked, non-renormalised batch norm over
  the last axis; every other case is Keras' own code (with `num_groups` > 1
  such a case is an error, except where the moving statistics are used).
  Variables and their names are Keras', so checkpoints and weight files are
  interchangeable. The class keeps Keras' class name on purpose:
  `.weights.h5` files name layers held in lists and dicts after their class,
  so a different name would break weight files saved with Keras' layer.
  """

  def __init__(self, *args, num_groups=1, **kwargs):
    super().__init__(*args, **kwargs)
    self.num_groups = check_num_groups(num_groups)

  def set_num_groups(self, num_groups):
    """Sets the ghost-batch count of the next traced training call."""
    self.num_groups = check_num_groups(num_groups)

  def uses_fast_path(self, ndim, training, mask):
    """Whether a call takes the closed-form path (else Keras' own)."""
    return bool(training and self.trainable and mask is None and
                not self.synchronized and not self.renorm and self.scale and
                self.center and self.axis in (-1, ndim - 1))

  def call(self, inputs, training=None, mask=None):
    num_groups = self.num_groups
    if not self.uses_fast_path(len(inputs.shape), training, mask):
      if num_groups > 1 and training and self.trainable:
        raise ValueError(
            f"BatchNormalization '{self.name}': num_groups={num_groups} "
            "(ghost batches) needs a non-synchronized, unmasked, "
            "non-renormalised norm over the last axis with scale and center")
      return super().call(inputs, training=training, mask=mask)
    batch = inputs.shape[0]
    if num_groups > 1 and batch is not None and batch % num_groups:
      raise ValueError(
          f"BatchNormalization '{self.name}': the batch of {batch} rows is "
          f"not a multiple of num_groups={num_groups}")
    # The input stays in the compute dtype (see the module docstring).
    x = ops.cast(inputs, self.compute_dtype)
    y, mean, variance = batch_norm_train(
        x, ops.cast(self.gamma, "float32"), ops.cast(self.beta, "float32"),
        self.epsilon, num_groups=num_groups)
    momentum = self.momentum
    self.moving_mean.assign(
        ops.cast(self.moving_mean, "float32") * momentum +
        mean * (1.0 - momentum))
    self.moving_variance.assign(
        ops.cast(self.moving_variance, "float32") * momentum +
        variance * (1.0 - momentum))
    return ops.cast(y, self.compute_dtype)

  def get_config(self):
    config = super().get_config()
    config["num_groups"] = self.num_groups
    return config


def check_num_groups(num_groups):
  """`num_groups` as an int >= 1, or a ValueError naming it."""
  try:
    value = operator.index(num_groups)
  except TypeError:
    value = 0
  if isinstance(num_groups, bool) or value < 1:
    raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
  return value
