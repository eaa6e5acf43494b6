"""ResNet v1.5 backbone (reference §2), Keras 3, keras.ops only.

Post-activation ResNet with the stride on the 3x3 convolution of bottleneck
blocks, a projection shortcut on the first block of every group, BatchNorm
after every convolution (momentum 0.997, epsilon 1e-4, gamma initialised to
1) and no convolution biases. Convolutions with stride > 1 use "fixed"
padding: an explicit symmetric pad of ``kernel_size - 1`` (split floor/ceil)
followed by a VALID convolution; stride-1 convolutions use SAME padding.
The 3x3 / 2 max-pool after the stem uses SAME padding as in the reference,
or, with ``stem_pool_padding="symmetric"``, one pixel on each side as in
torchvision, timm and keras-hub ResNets (see `ResNet`).
"""

import keras
from keras import ops

from official_shapemask.modeling.layers import batch_norm
from official_shapemask.modeling.layers.conv_norm import conv_norm

# depth -> (block type, blocks per group); the reference table.
RESNET_SPECS = {
    10: ("basic", (1, 1, 1, 1)),
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_GROUP_FILTERS = (64, 128, 256, 512)
_GROUP_STRIDES = (1, 2, 2, 2)
_STEM_FILTERS = 64
STEM_POOL_PADDINGS = ("same", "symmetric")


def _conv_kernel_initializer():
  # TF default `variance_scaling_initializer()`: scale 1, fan_in, truncated
  # normal.
  return keras.initializers.VarianceScaling(
      scale=1.0, mode="fan_in", distribution="truncated_normal")


def _fixed_pad(inputs, kernel_size):
  """Pads H and W by ``kernel_size - 1``, floor before / ceil after."""
  pad_total = kernel_size - 1
  if pad_total == 0:
    return inputs
  beg = pad_total // 2
  end = pad_total - beg
  return ops.pad(inputs, [[0, 0], [beg, end], [beg, end], [0, 0]])


class _ConvBN(keras.layers.Layer):
  """Conv (fixed padding when strided, no bias) + BatchNorm (+ ReLU).

  ``conv_trainable=False`` freezes the kernel; ``norm_affine_trainable=False``
  freezes the batch norm's gamma and beta (the norm still normalises with
  batch statistics in training and updates its moving averages).
  """

  def __init__(self, filters, kernel_size, strides=1, use_relu=True,
               norm_momentum=0.997, norm_epsilon=1e-4, use_sync_bn=False,
               conv_trainable=True, norm_affine_trainable=True, **kwargs):
    super().__init__(**kwargs)
    self._config = dict(
        filters=filters, kernel_size=kernel_size, strides=strides,
        use_relu=use_relu, norm_momentum=norm_momentum,
        norm_epsilon=norm_epsilon, use_sync_bn=use_sync_bn,
        conv_trainable=conv_trainable,
        norm_affine_trainable=norm_affine_trainable)
    self.conv = keras.layers.Conv2D(
        filters, kernel_size, strides=strides,
        padding="same" if strides == 1 else "valid", use_bias=False,
        kernel_initializer=_conv_kernel_initializer(),
        trainable=conv_trainable, dtype=self.dtype_policy, name="conv")
    self.bn = batch_norm.BatchNormalization(
        momentum=norm_momentum, epsilon=norm_epsilon,
        synchronized=use_sync_bn, dtype=self.dtype_policy, name="bn")

  def _padded_shape(self, input_shape):
    shape = list(input_shape)
    if self._config["strides"] > 1:
      pad = self._config["kernel_size"] - 1
      for axis in (1, 2):
        if shape[axis] is not None:
          shape[axis] += pad
    return tuple(shape)

  def build(self, input_shape):
    padded = self._padded_shape(input_shape)
    self.conv.build(padded)
    self.bn.build(self.conv.compute_output_shape(padded))
    if not self._config["norm_affine_trainable"]:
      self.bn.gamma.trainable = False
      self.bn.beta.trainable = False

  def compute_output_shape(self, input_shape):
    return self.conv.compute_output_shape(self._padded_shape(input_shape))

  def call(self, inputs, training=None):
    x = inputs
    if self._config["strides"] > 1:
      x = _fixed_pad(x, self._config["kernel_size"])
    x = conv_norm(self.conv, self.bn, x, training=training)
    if self._config["use_relu"]:
      x = ops.relu(x)
    return x

  def get_config(self):
    config = super().get_config()
    config.update(self._config)
    return config


class _ResidualBlock(keras.layers.Layer):
  """Basic block (two 3x3) or bottleneck block (1x1, 3x3 strided, 1x1 x4).

  Output channels: ``filters`` (basic) or ``4 * filters`` (bottleneck).
  """

  def __init__(self, filters, strides, use_projection, bottleneck,
               norm_momentum=0.997, norm_epsilon=1e-4, use_sync_bn=False,
               conv_trainable=True, norm_affine_trainable=True, **kwargs):
    super().__init__(**kwargs)
    self._config = dict(
        filters=filters, strides=strides, use_projection=use_projection,
        bottleneck=bottleneck, norm_momentum=norm_momentum,
        norm_epsilon=norm_epsilon, use_sync_bn=use_sync_bn,
        conv_trainable=conv_trainable,
        norm_affine_trainable=norm_affine_trainable)
    common = dict(norm_momentum=norm_momentum, norm_epsilon=norm_epsilon,
                  use_sync_bn=use_sync_bn, conv_trainable=conv_trainable,
                  norm_affine_trainable=norm_affine_trainable,
                  dtype=self.dtype_policy)
    out_filters = 4 * filters if bottleneck else filters
    self.shortcut = None
    if use_projection:
      self.shortcut = _ConvBN(out_filters, 1, strides, use_relu=False,
                              name="shortcut", **common)
    if bottleneck:
      self.convs = [
          _ConvBN(filters, 1, 1, name="conv1", **common),
          _ConvBN(filters, 3, strides, name="conv2", **common),
          _ConvBN(out_filters, 1, 1, use_relu=False, name="conv3", **common),
      ]
    else:
      self.convs = [
          _ConvBN(filters, 3, strides, name="conv1", **common),
          _ConvBN(filters, 3, 1, use_relu=False, name="conv2", **common),
      ]

  def build(self, input_shape):
    if self.shortcut is not None:
      self.shortcut.build(input_shape)
    shape = input_shape
    for conv in self.convs:
      conv.build(shape)
      shape = conv.compute_output_shape(shape)

  def compute_output_shape(self, input_shape):
    shape = input_shape
    for conv in self.convs:
      shape = conv.compute_output_shape(shape)
    return shape

  def call(self, inputs, training=None):
    shortcut = inputs
    if self.shortcut is not None:
      shortcut = self.shortcut(inputs, training=training)
    x = inputs
    for conv in self.convs:
      x = conv(x, training=training)
    return ops.relu(x + shortcut)

  def get_config(self):
    config = super().get_config()
    config.update(self._config)
    return config


@keras.saving.register_keras_serializable(package="official_shapemask")
class ResNet(keras.layers.Layer):
  """ResNet v1.5 feature extractor returning C2..C5.

  Args:
    depth: int, one of 10, 18, 34 (basic blocks) or 50, 101, 152
      (bottleneck blocks). Default 50.
    width_multiplier: float, scales every filter count (stem and groups);
      1.0 is the reference network. Default 1.0.
    freeze_early_convs: bool, makes the kernels of the stem convolution and
      of every convolution of conv2_x (block group 1) non-trainable, as the
      ShapeMask reference does (11 kernels for depth 50). Their BatchNorm
      layers stay trainable. Note that setting ``trainable = True`` on a
      parent layer afterwards re-enables them (Keras propagates the flag).
      Default True.
    freeze_early_norms: bool, also makes gamma and beta of the batch norms
      of the stem and conv2_x non-trainable (they still use batch
      statistics in training and update their moving averages). The
      ShapeMask reference keeps them trainable (False); the Model Garden
      port freezes them (its regex also matches those batch norms), and so
      does Detectron2's ``freeze_at``. With True no gradient flows below
      conv3_x, which saves the backward pass through the highest-resolution
      stage. Default False.
    norm_momentum: float, BatchNorm momentum. Default 0.997.
    norm_epsilon: float, BatchNorm epsilon. Default 1e-4.
    use_sync_bn: bool, cross-replica BatchNorm. Default False.
    stem_pool_padding: str, padding of the 3x3 / 2 max-pool after the stem.
      "same" (the reference): TensorFlow SAME, which on an even-sized stem
      output pads one row and column after only, so window ``i`` covers
      stem pixels ``2i .. 2i+2``. "symmetric": one row and column on each
      side (torchvision, timm and keras-hub ResNets), so window ``i``
      covers ``2i-1 .. 2i+1``. Both give ``ceil(n / 2)`` outputs and agree
      on odd-sized stem outputs. Use "symmetric" with ImageNet weights
      trained that way (keras-hub presets) to reproduce their features
      exactly. Default "same".

  Call args:
    images: float tensor ``[B, H, W, 3]``.
    training: bool, BatchNorm mode.

  Returns:
    dict ``{'2': C2, '3': C3, '4': C4, '5': C5}``; ``C_l`` has shape
    ``[B, ceil(H / 2**l), ceil(W / 2**l), c_l]`` with ``c_l`` =
    ``{64, 128, 256, 512}[l-2] * width_multiplier`` (times 4 for bottleneck
    depths).
  """

  def __init__(self, depth=50, width_multiplier=1.0, freeze_early_convs=True,
               norm_momentum=0.997, norm_epsilon=1e-4, use_sync_bn=False,
               freeze_early_norms=False, stem_pool_padding="same", **kwargs):
    super().__init__(**kwargs)
    if depth not in RESNET_SPECS:
      raise ValueError(
          f"ResNet: depth {depth} is not supported; choose one of "
          f"{sorted(RESNET_SPECS)}.")
    if width_multiplier <= 0:
      raise ValueError(
          f"ResNet: width_multiplier must be > 0, got {width_multiplier}.")
    if stem_pool_padding not in STEM_POOL_PADDINGS:
      raise ValueError(
          f"ResNet: stem_pool_padding must be one of {STEM_POOL_PADDINGS}, "
          f"got {stem_pool_padding!r}.")
    self._config = dict(
        depth=depth, width_multiplier=width_multiplier,
        freeze_early_convs=freeze_early_convs, norm_momentum=norm_momentum,
        norm_epsilon=norm_epsilon, use_sync_bn=use_sync_bn,
        freeze_early_norms=freeze_early_norms,
        stem_pool_padding=stem_pool_padding)
    block_type, blocks_per_group = RESNET_SPECS[depth]
    norm = dict(norm_momentum=norm_momentum, norm_epsilon=norm_epsilon,
                use_sync_bn=use_sync_bn, dtype=self.dtype_policy)

    def scaled(filters):
      return max(1, int(round(filters * width_multiplier)))

    self.stem = _ConvBN(scaled(_STEM_FILTERS), 7, 2,
                        conv_trainable=not freeze_early_convs,
                        norm_affine_trainable=not freeze_early_norms,
                        name="stem", **norm)
    self.groups = []
    for g, (filters, stride, num_blocks) in enumerate(
        zip(_GROUP_FILTERS, _GROUP_STRIDES, blocks_per_group)):
      conv_trainable = not (freeze_early_convs and g == 0)
      blocks = []
      for b in range(num_blocks):
        blocks.append(_ResidualBlock(
            scaled(filters), stride if b == 0 else 1,
            use_projection=(b == 0), bottleneck=(block_type == "bottleneck"),
            conv_trainable=conv_trainable,
            norm_affine_trainable=not (freeze_early_norms and g == 0),
            name=f"block_group{g + 1}_block{b + 1}", **norm))
      self.groups.append(blocks)

  def _output_shapes(self, input_shape, build):
    if build:
      self.stem.build(input_shape)
    shape = list(self.stem.compute_output_shape(input_shape))
    for axis in (1, 2):  # 3x3 / 2 SAME max-pool
      if shape[axis] is not None:
        shape[axis] = -(-shape[axis] // 2)
    shape = tuple(shape)
    shapes = {}
    for level, blocks in enumerate(self.groups, start=2):
      for block in blocks:
        if build:
          block.build(shape)
        shape = block.compute_output_shape(shape)
      shapes[str(level)] = shape
    return shapes

  def build(self, input_shape):
    self._output_shapes(input_shape, build=True)

  def compute_output_shape(self, input_shape):
    return self._output_shapes(input_shape, build=False)

  def call(self, images, training=None):
    x = self.stem(images, training=training)
    if self._config["stem_pool_padding"] == "symmetric":
      # The stem ends in a ReLU: zero padding never wins a max, like -inf.
      x = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
      x = ops.max_pool(x, pool_size=3, strides=2, padding="valid")
    else:
      x = ops.max_pool(x, pool_size=3, strides=2, padding="same")
    features = {}
    for level, blocks in enumerate(self.groups, start=2):
      for block in blocks:
        x = block(x, training=training)
      features[str(level)] = x
    return features

  def get_config(self):
    config = super().get_config()
    config.update(self._config)
    return config
