"""ShapeMask shape-prior head (reference spec section 5.4)."""

import keras
import numpy as np
from keras import ops

from official_shapemask.ops import spatial_transform


@keras.saving.register_keras_serializable(package="official_shapemask")
class ShapePriorHead(keras.layers.Layer):
  """Pools instance features and predicts a soft shape prior per instance.

  1. ``X = multilevel_crop_and_resize(fpn_features, outer_boxes)``, then a
     per-pixel linear layer (1x1 conv, bias, Glorot, no activation) to ``D``
     channels: the ``instance_features``.
  2. ``U`` = an all-ones ``[m, m]`` mask moved from the tight box into the
     outer box (the box indicator in the outer-box frame).
  3. Shape-mode classifier: ``mean_{h,w}(X * U)`` -> dense to
     ``C_mask * K`` logits (kernel N(0, 0.01), bias 0); the row of the
     instance's class (row 0 when class-agnostic); softmax over K.
  4. Prior = the softmax-weighted sum of the class's K priors (tight-box
     frame), moved into the outer-box frame.

  The per-pixel layer runs as a 1x1 conv on a ``[B * N, m, m, C]`` tensor
  with static shapes (a 5-D Dense broke TensorRT export, tensorflow/tpu#815).

  The priors are a non-trainable weight ``shape_priors`` of shape
  ``[C_mask, K, m, m]``, created in `build` (zeros unless `set_shape_priors`
  gave values, before or after building), where ``C_mask`` is
  `num_classes`, or 1 when `use_category_for_mask` is False.

  Args:
    num_classes: int, class slots including background (COCO: 91).
    num_clusters: int, priors per class ``K``.
    mask_crop_size: int, crop side ``m``.
    num_downsample_channels: int, channels ``D`` of the instance features.
    use_category_for_mask: bool; False uses a single prior row (row 0) and a
      single classifier row for every instance.
    **kwargs: keras.layers.Layer arguments (name, dtype, ...).
  """

  def __init__(self,
               num_classes,
               num_clusters,
               mask_crop_size=32,
               num_downsample_channels=128,
               use_category_for_mask=True,
               **kwargs):
    super().__init__(**kwargs)
    self.num_classes = int(num_classes)
    self.num_clusters = int(num_clusters)
    self.mask_crop_size = int(mask_crop_size)
    self.num_downsample_channels = int(num_downsample_channels)
    self.use_category_for_mask = bool(use_category_for_mask)
    self.mask_num_classes = (self.num_classes
                             if self.use_category_for_mask else 1)

    self.shape_prior_fc = keras.layers.Conv2D(
        self.num_downsample_channels, 1, name="shape_prior_fc",
        dtype=self.dtype_policy)
    self.shape_classifier = keras.layers.Dense(
        self.mask_num_classes * self.num_clusters,
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
        bias_initializer="zeros",
        name="shape_classifier",
        dtype=self.dtype_policy)
    # Created in `build` (so its path sits under the parent model's scope);
    # values given earlier to `set_shape_priors` wait in `_pending_priors`.
    self.shape_priors = None
    self._pending_priors = None

  @property
  def shape_priors_shape(self):
    """``(C_mask, K, m, m)``, the shape `set_shape_priors` accepts."""
    return (self.mask_num_classes, self.num_clusters, self.mask_crop_size,
            self.mask_crop_size)

  def set_shape_priors(self, priors):
    """Assigns the prior masks (e.g. loaded from the k-means ``.npy``).

    Args:
      priors: array-like ``[C_mask, K, m, m]`` soft masks in the tight-box
        frame.

    Raises:
      ValueError: if the shape is not `shape_priors_shape`.
    """
    priors = np.asarray(priors, dtype=np.float32)
    if tuple(priors.shape) != self.shape_priors_shape:
      raise ValueError(
          f"ShapePriorHead '{self.name}': shape priors of shape "
          f"{tuple(priors.shape)} do not match the expected shape "
          f"{self.shape_priors_shape} ([num_class_slots={self.mask_num_classes}"
          f", num_clusters={self.num_clusters}, mask_crop_size, "
          f"mask_crop_size]; use_category_for_mask="
          f"{self.use_category_for_mask}).")
    if self.shape_priors is None:
      self._pending_priors = priors
    else:
      self.shape_priors.assign(priors)

  def build(self, fpn_features_shape):
    channels = None
    for shape in fpn_features_shape.values():
      channels = shape[-1]
    m = self.mask_crop_size
    self.shape_prior_fc.build((None, m, m, channels))
    self.shape_classifier.build((None, self.num_downsample_channels))
    pending = self._pending_priors
    self.shape_priors = self.add_weight(
        name="shape_priors",
        shape=self.shape_priors_shape,
        initializer=(keras.initializers.Zeros() if pending is None else
                     keras.initializers.Constant(pending)),
        trainable=False,
        dtype="float32")
    self._pending_priors = None
    self.built = True

  def _instance_classes(self, classes):
    """Row of each instance in the classifier / prior tables, ``[B, N]``."""
    if not self.use_category_for_mask:
      return ops.zeros_like(ops.cast(classes, "int32"))
    # Out-of-range ids cannot raise under XLA; clamp them explicitly so every
    # backend behaves the same.
    return ops.clip(ops.cast(classes, "int32"), 0, self.mask_num_classes - 1)

  def call(self, fpn_features, boxes, outer_boxes, classes, training=None):
    """Instance features and outer-box-frame priors.

    Args:
      fpn_features: dict ``{level: [B, H_l, W_l, C]}`` (levels 3..7).
      boxes: float ``[B, N, 4]`` tight boxes, canvas pixels.
      outer_boxes: float ``[B, N, 4]`` outer boxes, canvas pixels.
      classes: int ``[B, N]`` class slot ids.
      training: unused (no batch-dependent layers); kept for a uniform API.

    Returns:
      ``(instance_features [B, N, m, m, D], prior_masks [B, N, m, m])``;
      the priors are float32 values in [0, 1] in the outer-box frame.
    """
    del training
    m = self.mask_crop_size
    boxes = ops.cast(boxes, "float32")
    outer_boxes = ops.cast(outer_boxes, "float32")
    batch = boxes.shape[0] if boxes.shape[0] is not None else ops.shape(
        boxes)[0]
    num_instances = boxes.shape[1]

    crops = spatial_transform.multilevel_crop_and_resize(
        fpn_features, outer_boxes, output_size=m)
    crops = ops.reshape(crops, (-1, m, m, crops.shape[-1]))
    features = self.shape_prior_fc(crops)
    instance_features = ops.reshape(
        features, (batch, num_instances, m, m, self.num_downsample_channels))

    uniform = spatial_transform.crop_mask_in_target_box(
        ops.ones((batch, num_instances, m, m), "float32"), boxes, outer_boxes,
        m)
    box_features = ops.mean(
        ops.cast(instance_features, "float32") * uniform[..., None],
        axis=(2, 3))
    logits = self.shape_classifier(box_features)
    logits = ops.reshape(
        ops.cast(logits, "float32"),
        (batch, num_instances, self.mask_num_classes, self.num_clusters))
    rows = self._instance_classes(classes)
    row_index = ops.broadcast_to(
        rows[:, :, None, None], (batch, num_instances, 1, self.num_clusters))
    logits = ops.take_along_axis(logits, row_index, axis=2)
    weights = ops.softmax(logits[:, :, 0, :], axis=-1)

    priors = ops.take(ops.cast(self.shape_priors, "float32"), rows, axis=0)
    tight_prior = ops.sum(weights[:, :, :, None, None] * priors, axis=2)
    prior_masks = spatial_transform.crop_mask_in_target_box(
        tight_prior, boxes, outer_boxes, m)
    return instance_features, prior_masks

  def get_config(self):
    config = super().get_config()
    config.update({
        "num_classes": self.num_classes,
        "num_clusters": self.num_clusters,
        "mask_crop_size": self.mask_crop_size,
        "num_downsample_channels": self.num_downsample_channels,
        "use_category_for_mask": self.use_category_for_mask,
    })
    return config
