"""ShapeMask coarse mask head (reference spec section 5.5)."""

import math

import keras
from keras import ops

from official_shapemask.modeling.layers import batch_norm
from official_shapemask.modeling.layers.conv_norm import conv_norm

# Bias of the mask class predictors: foreground probability 0.01.
MASK_PRIOR_BIAS = -math.log((1.0 - 0.01) / 0.01)


def mask_class_rows(classes, num_mask_classes, use_category_for_mask):
  """Class channel of every instance, flattened to ``[B * N]`` int32.

  Class-agnostic heads have one channel (index 0). Ids outside
  ``[0, num_mask_classes)`` are clamped (a gather cannot raise under XLA).
  """
  classes = ops.reshape(ops.cast(classes, "int32"), (-1,))
  if not use_category_for_mask:
    return ops.zeros_like(classes)
  return ops.clip(classes, 0, num_mask_classes - 1)


def class_selected_weights(conv, rows, dtype):
  """Per-instance columns of a 1x1 class-prediction conv.

  Args:
    conv: built ``keras.layers.Conv2D`` with a ``[1, 1, F, C]`` kernel and a
      ``[C]`` bias.
    rows: int32 ``[n]`` class channel per instance.
    dtype: compute dtype of the result.

  Returns:
    ``(kernel [n, F], bias [n])``: the weights of each instance's class.
  """
  kernel = ops.cast(conv.kernel, dtype)
  kernel = ops.transpose(ops.reshape(kernel, kernel.shape[2:]))  # [C, F]
  return (ops.take(kernel, rows, axis=0),
          ops.take(ops.cast(conv.bias, dtype), rows, axis=0))


def mask_conv_stack(prefix, num_convs, num_filters, norm_momentum,
                    norm_epsilon, use_sync_bn, dtype_policy):
  """``num_convs`` x {3x3 conv (N(0, 0.01), bias 0), batch norm} layers."""
  convs, norms = [], []
  bn_kwargs = {"synchronized": True} if use_sync_bn else {}
  for i in range(num_convs):
    convs.append(keras.layers.Conv2D(
        num_filters, 3, padding="same",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        bias_initializer="zeros",
        name=f"{prefix}_conv_{i}",
        dtype=dtype_policy))
    norms.append(batch_norm.BatchNormalization(
        momentum=norm_momentum, epsilon=norm_epsilon,
        name=f"{prefix}_conv_{i}_bn", dtype=dtype_policy, **bn_kwargs))
  return convs, norms


def class_predictor(name, num_mask_classes, dtype_policy):
  """1x1 conv to the mask classes (kernel N(0, 0.01), bias -ln(99))."""
  return keras.layers.Conv2D(
      num_mask_classes, 1,
      kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
      bias_initializer=keras.initializers.Constant(MASK_PRIOR_BIAS),
      name=name,
      dtype=dtype_policy)


@keras.saving.register_keras_serializable(package="official_shapemask")
class CoarseMaskHead(keras.layers.Layer):
  """Coarse instance-mask logits from instance features and shape priors.

  1. ``F = instance_features + 1x1conv(prior)`` (1 -> D channels, bias).
  2. On ``[B * N, m, m, D]``: `num_convs` x {3x3 conv `num_filters` -> BN
     (statistics over the B * N instances) -> ReLU}.
  3. The 1x1 class predictor (``C_mask`` channels, kernel N(0, 0.01), bias
     -ln(99)) evaluated only for each instance's class: its kernel column
     and bias are gathered per instance and applied as a dot product, which
     equals predicting all ``C_mask`` channels and selecting one without
     materialising ``[B * N, m, m, C_mask]``.

  Args:
    num_classes: int, class slots including background (COCO: 91).
    mask_crop_size: int, mask side ``m``.
    num_convs: int, 3x3 conv-BN-ReLU blocks.
    num_filters: int, channels of those convs.
    use_category_for_mask: bool; False predicts one class-agnostic channel.
    norm_momentum: float, batch-norm moving-average momentum.
    norm_epsilon: float, batch-norm epsilon.
    use_sync_bn: bool, cross-replica batch norm (TensorFlow backend only).
    **kwargs: keras.layers.Layer arguments.
  """

  def __init__(self,
               num_classes,
               mask_crop_size=32,
               num_convs=4,
               num_filters=128,
               use_category_for_mask=True,
               norm_momentum=0.997,
               norm_epsilon=1e-4,
               use_sync_bn=False,
               **kwargs):
    super().__init__(**kwargs)
    self.num_classes = int(num_classes)
    self.mask_crop_size = int(mask_crop_size)
    self.num_convs = int(num_convs)
    self.num_filters = int(num_filters)
    self.use_category_for_mask = bool(use_category_for_mask)
    self.norm_momentum = float(norm_momentum)
    self.norm_epsilon = float(norm_epsilon)
    self.use_sync_bn = bool(use_sync_bn)
    self.mask_num_classes = (self.num_classes
                             if self.use_category_for_mask else 1)
    self.convs, self.norms = mask_conv_stack(
        "coarse_mask", self.num_convs, self.num_filters, self.norm_momentum,
        self.norm_epsilon, self.use_sync_bn, self.dtype_policy)
    self.class_predict = class_predictor(
        "coarse_mask_class_predict", self.mask_num_classes, self.dtype_policy)
    self.prior_fc = None

  def build(self, instance_features_shape):
    channels = instance_features_shape[-1]
    m = self.mask_crop_size
    self.prior_fc = keras.layers.Conv2D(
        channels, 1, name="coarse_mask_prior_fc", dtype=self.dtype_policy)
    self.prior_fc.build((None, m, m, 1))
    in_channels = channels
    for conv, norm in zip(self.convs, self.norms):
      conv.build((None, m, m, in_channels))
      norm.build((None, m, m, self.num_filters))
      in_channels = self.num_filters
    self.class_predict.build((None, m, m, in_channels))
    self.built = True

  def decoder_features(self, instance_features, prior_masks, training=None):
    """Features before the class predictor, ``[B * N, m, m, F]``."""
    m = self.mask_crop_size
    channels = instance_features.shape[-1]
    features = ops.reshape(instance_features, (-1, m, m, channels))
    priors = ops.reshape(ops.cast(prior_masks, self.compute_dtype),
                         (-1, m, m, 1))
    features = features + self.prior_fc(priors)
    for conv, norm in zip(self.convs, self.norms):
      features = ops.relu(conv_norm(conv, norm, features, training=training))
    return features

  def call(self, instance_features, prior_masks, classes, training=None):
    """Coarse mask logits of each instance's class.

    Args:
      instance_features: ``[B, N, m, m, D]`` from the shape-prior head.
      prior_masks: ``[B, N, m, m]`` priors in the outer-box frame.
      classes: int ``[B, N]`` class slot ids.
      training: bool, batch-norm mode.

    Returns:
      ``[B, N, m, m]`` logits (compute dtype) in the outer-box frame.
    """
    m = self.mask_crop_size
    batch, num_instances = instance_features.shape[:2]
    if batch is None:
      batch = ops.shape(instance_features)[0]
    features = self.decoder_features(instance_features, prior_masks,
                                     training=training)
    rows = mask_class_rows(classes, self.mask_num_classes,
                           self.use_category_for_mask)
    kernel, bias = class_selected_weights(self.class_predict, rows,
                                          features.dtype)
    logits = ops.einsum("nhwf,nf->nhw", features, kernel)
    logits = logits + bias[:, None, None]
    return ops.reshape(logits, (batch, num_instances, m, m))

  def get_config(self):
    config = super().get_config()
    config.update({
        "num_classes": self.num_classes,
        "mask_crop_size": self.mask_crop_size,
        "num_convs": self.num_convs,
        "num_filters": self.num_filters,
        "use_category_for_mask": self.use_category_for_mask,
        "norm_momentum": self.norm_momentum,
        "norm_epsilon": self.norm_epsilon,
        "use_sync_bn": self.use_sync_bn,
    })
    return config
