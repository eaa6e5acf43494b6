"""ShapeMask fine mask head (reference spec section 5.6)."""

import keras
from keras import ops

from official_shapemask.modeling.heads import coarse_mask_head
from official_shapemask.modeling.layers.conv_norm import conv_norm

# Keeps the foreground mean finite for instances with an empty coarse mask.
_EMBEDDING_EPSILON = 1e-20


@keras.saving.register_keras_serializable(package="official_shapemask")
class FineMaskHead(keras.layers.Layer):
  """Fine, upsampled instance-mask logits refined from the coarse mask.

  1. ``p = sigmoid(coarse_logits)``; hard mask ``M = [p > 0.5]`` (no
     gradient through the threshold).
  2. Instance embedding ``e = sum(F * M) / (sum(M) + 1e-20)`` over the
     ``m x m`` grid, where ``F`` are the original instance features.
  3. ``F' = F - e + 1x1conv(p)`` (1 -> D channels, bias).
  4. `num_convs` x {3x3 conv `num_filters` (N(0, 0.01), bias 0) -> BN ->
     ReLU}, separate weights from the coarse head.
  5. If ``upsample_factor`` u > 1: transposed conv, `num_filters` filters,
     kernel u x u, stride u, VALID, with bias, no BN / activation.
  6. The 1x1 class predictor (kernel N(0, 0.01), bias -ln(99)) for each
     instance's class only.

  Steps 5 and 6 are linear with nothing in between, and a u x u / stride-u
  transposed conv writes disjoint u x u output blocks, so they are applied
  as one per-instance transposed conv whose kernel is the transposed-conv
  kernel contracted with the instance's class column. The result equals
  transposed conv -> all ``C_mask`` channels -> select class, without
  materialising the ``[B * N, m*u, m*u, F]`` features or the
  ``[B * N, m*u, m*u, C_mask]`` logits (the reference's main inference
  memory cost).

  Args:
    num_classes: int, class slots including background (COCO: 91).
    mask_crop_size: int, input mask side ``m``.
    num_convs: int, 3x3 conv-BN-ReLU blocks.
    num_filters: int, channels of those convs and of the transposed conv.
    upsample_factor: int, output side is ``m * upsample_factor``.
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
               upsample_factor=4,
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
    self.upsample_factor = int(upsample_factor)
    self.use_category_for_mask = bool(use_category_for_mask)
    self.norm_momentum = float(norm_momentum)
    self.norm_epsilon = float(norm_epsilon)
    self.use_sync_bn = bool(use_sync_bn)
    if self.upsample_factor < 1:
      raise ValueError(
          f"FineMaskHead: upsample_factor must be >= 1, got {upsample_factor}.")
    self.mask_num_classes = (self.num_classes
                             if self.use_category_for_mask else 1)
    self.convs, self.norms = coarse_mask_head.mask_conv_stack(
        "fine_mask", self.num_convs, self.num_filters, self.norm_momentum,
        self.norm_epsilon, self.use_sync_bn, self.dtype_policy)
    self.upsample = None
    if self.upsample_factor > 1:
      self.upsample = keras.layers.Conv2DTranspose(
          self.num_filters, self.upsample_factor,
          strides=self.upsample_factor, padding="valid",
          name="fine_mask_upsample", dtype=self.dtype_policy)
    self.class_predict = coarse_mask_head.class_predictor(
        "fine_mask_class_predict", self.mask_num_classes, self.dtype_policy)
    self.prob_fc = None

  @property
  def output_size(self):
    """Side of the fine logits, ``m * upsample_factor``."""
    return self.mask_crop_size * self.upsample_factor

  def build(self, instance_features_shape):
    channels = instance_features_shape[-1]
    m = self.mask_crop_size
    self.prob_fc = keras.layers.Conv2D(
        channels, 1, name="fine_mask_prob_fc", dtype=self.dtype_policy)
    self.prob_fc.build((None, m, m, 1))
    in_channels = channels
    for conv, norm in zip(self.convs, self.norms):
      conv.build((None, m, m, in_channels))
      norm.build((None, m, m, self.num_filters))
      in_channels = self.num_filters
    if self.upsample is not None:
      self.upsample.build((None, m, m, in_channels))
      in_channels = self.num_filters
    self.class_predict.build((None, self.output_size, self.output_size,
                              in_channels))
    self.built = True

  def decoder_features(self, instance_features, coarse_logits, training=None):
    """Features before the upsampling, ``[B * N, m, m, F]``."""
    m = self.mask_crop_size
    channels = instance_features.shape[-1]
    features = ops.reshape(instance_features, (-1, m, m, channels))
    probs = ops.sigmoid(
        ops.reshape(ops.cast(coarse_logits, "float32"), (-1, m, m)))
    hard = ops.stop_gradient(ops.cast(probs > 0.5, "float32"))
    summed = ops.sum(ops.cast(features, "float32") * hard[..., None],
                     axis=(1, 2))
    embedding = summed / (ops.sum(hard, axis=(1, 2))[:, None] +
                          _EMBEDDING_EPSILON)
    features = features - ops.cast(embedding, features.dtype)[:, None, None]
    features = features + self.prob_fc(
        ops.cast(probs, self.compute_dtype)[..., None])
    for conv, norm in zip(self.convs, self.norms):
      features = ops.relu(conv_norm(conv, norm, features, training=training))
    return features

  def call(self, instance_features, coarse_logits, classes, training=None):
    """Fine mask logits of each instance's class.

    Args:
      instance_features: ``[B, N, m, m, D]`` from the shape-prior head (not
        the coarse head's prior-augmented features).
      coarse_logits: ``[B, N, m, m]`` from the coarse head.
      classes: int ``[B, N]`` class slot ids.
      training: bool, batch-norm mode.

    Returns:
      ``[B, N, m*u, m*u]`` logits (compute dtype) in the outer-box frame.
    """
    m, u = self.mask_crop_size, self.upsample_factor
    batch, num_instances = instance_features.shape[:2]
    if batch is None:
      batch = ops.shape(instance_features)[0]
    features = self.decoder_features(instance_features, coarse_logits,
                                     training=training)
    rows = coarse_mask_head.mask_class_rows(classes, self.mask_num_classes,
                                            self.use_category_for_mask)
    dtype = features.dtype
    class_kernel, class_bias = coarse_mask_head.class_selected_weights(
        self.class_predict, rows, dtype)
    if self.upsample is None:
      logits = ops.einsum("nhwf,nf->nhw", features, class_kernel)
    else:
      # Transposed-conv kernel [u, u, F_out, F_in] contracted with the class
      # column over F_out: one [u, u, F_in] kernel per instance.
      up_kernel = ops.cast(self.upsample.kernel, dtype)
      up_bias = ops.cast(self.upsample.bias, dtype)
      fused_kernel = ops.einsum("abof,no->nabf", up_kernel, class_kernel)
      class_bias = class_bias + ops.einsum("o,no->n", up_bias, class_kernel)
      logits = ops.einsum("nijf,nabf->niajb", features, fused_kernel)
      logits = ops.reshape(logits, (-1, m * u, m * u))
    logits = logits + class_bias[:, None, None]
    return ops.reshape(logits, (batch, num_instances, m * u, m * u))

  def get_config(self):
    config = super().get_config()
    config.update({
        "num_classes": self.num_classes,
        "mask_crop_size": self.mask_crop_size,
        "num_convs": self.num_convs,
        "num_filters": self.num_filters,
        "upsample_factor": self.upsample_factor,
        "use_category_for_mask": self.use_category_for_mask,
        "norm_momentum": self.norm_momentum,
        "norm_epsilon": self.norm_epsilon,
        "use_sync_bn": self.use_sync_bn,
    })
    return config
