"""Feature Pyramid Network (reference §3), Keras 3, keras.ops only."""

import keras
from keras import ops

from official_shapemask.modeling.layers import batch_norm


@keras.saving.register_keras_serializable(package="official_shapemask")
class FPN(keras.layers.Layer):
  """FPN producing P_min..P_max from backbone features C_min..C_backbone_max.

  - Lateral 1x1 convolution (``num_filters``, with bias, Glorot-uniform) on
    every backbone level ``min_level..backbone_max_level``.
  - Top-down path from ``backbone_max_level``: nearest-neighbour 2x upsample
    plus the lateral.
  - A 3x3 stride-1 "post-hoc" convolution on every backbone level.
  - Extra levels above the backbone: ``P_{b+1}`` = 3x3 stride-2 convolution
    of ``P_b`` (the post-hoc output, not C5); every further level applies the
    same to ``ReLU`` of the previous one.
  - Optionally a BatchNorm **without** activation per output level.

  Args:
    min_level: int, lowest output level. Default 3.
    max_level: int, highest output level (>= backbone_max_level). Default 7.
    num_filters: int, channels of every output level. Default 256.
    use_batch_norm: bool, BatchNorm on every output level. Default True.
    norm_momentum: float, BatchNorm momentum. Default 0.997.
    norm_epsilon: float, BatchNorm epsilon. Default 1e-4.
    use_sync_bn: bool, cross-replica BatchNorm. Default False.
    backbone_max_level: int, highest backbone level consumed (5 for ResNet).
      Default 5.

  Call args:
    features: dict with string keys ``str(l)`` for ``l`` in
      ``min_level..backbone_max_level`` (extra keys such as ``'2'`` are
      ignored), ``[B, H_l, W_l, c_l]`` with ``H_l = 2 * H_{l+1}``.
    training: bool, BatchNorm mode.

  Returns:
    dict ``{str(l): [B, H_l, W_l, num_filters]}`` for
    ``l = min_level..max_level``.
  """

  def __init__(self, min_level=3, max_level=7, num_filters=256,
               use_batch_norm=True, norm_momentum=0.997, norm_epsilon=1e-4,
               use_sync_bn=False, backbone_max_level=5, **kwargs):
    super().__init__(**kwargs)
    if not min_level <= backbone_max_level <= max_level:
      raise ValueError(
          f"FPN: need min_level <= backbone_max_level <= max_level, got "
          f"{min_level}, {backbone_max_level}, {max_level}.")
    self._config = dict(
        min_level=min_level, max_level=max_level, num_filters=num_filters,
        use_batch_norm=use_batch_norm, norm_momentum=norm_momentum,
        norm_epsilon=norm_epsilon, use_sync_bn=use_sync_bn,
        backbone_max_level=backbone_max_level)
    self.lateral = {}
    self.post_hoc = {}
    self.coarse = {}
    self.norms = {}
    for level in range(min_level, max_level + 1):
      key = str(level)
      if level <= backbone_max_level:
        self.lateral[key] = keras.layers.Conv2D(
            num_filters, 1, padding="same", dtype=self.dtype_policy,
            name=f"l{level}")
        self.post_hoc[key] = keras.layers.Conv2D(
            num_filters, 3, padding="same", dtype=self.dtype_policy,
            name=f"post_hoc_d{level}")
      else:
        self.coarse[key] = keras.layers.Conv2D(
            num_filters, 3, strides=2, padding="same",
            dtype=self.dtype_policy, name=f"p{level}")
      if use_batch_norm:
        self.norms[key] = batch_norm.BatchNormalization(
            momentum=norm_momentum, epsilon=norm_epsilon,
            synchronized=use_sync_bn, dtype=self.dtype_policy,
            name=f"p{level}-bn")

  def build(self, features_shape):
    cfg = self._config
    filters_shape = (None, None, None, cfg["num_filters"])
    for level in range(cfg["min_level"], cfg["max_level"] + 1):
      key = str(level)
      if key in self.lateral:
        if key not in features_shape:
          raise ValueError(
              f"FPN: backbone features lack level '{key}'; got keys "
              f"{sorted(features_shape)}.")
        self.lateral[key].build(features_shape[key])
        self.post_hoc[key].build(filters_shape)
      else:
        self.coarse[key].build(filters_shape)
      if key in self.norms:
        self.norms[key].build(filters_shape)

  def compute_output_shape(self, features_shape):
    cfg = self._config
    top = features_shape[str(cfg["backbone_max_level"])]
    shapes = {}
    for level in range(cfg["min_level"], cfg["max_level"] + 1):
      if level <= cfg["backbone_max_level"]:
        shape = features_shape[str(level)]
        spatial = shape[1:3]
      else:
        spatial = [None if s is None else -(-s // 2**(
            level - cfg["backbone_max_level"])) for s in top[1:3]]
      shapes[str(level)] = (top[0], spatial[0], spatial[1],
                            cfg["num_filters"])
    return shapes

  def call(self, features, training=None):
    min_level = self._config["min_level"]
    max_level = self._config["max_level"]
    top = self._config["backbone_max_level"]
    missing = [str(l) for l in range(min_level, top + 1)
               if str(l) not in features]
    if missing:
      raise ValueError(
          f"FPN: backbone features lack levels {missing}; got keys "
          f"{sorted(features)}.")
    lateral = {str(l): self.lateral[str(l)](features[str(l)])
               for l in range(min_level, top + 1)}
    feats = {str(top): lateral[str(top)]}
    for level in range(top - 1, min_level - 1, -1):
      up = feats[str(level + 1)]
      up = ops.repeat(ops.repeat(up, 2, axis=1), 2, axis=2)
      feats[str(level)] = up + lateral[str(level)]
    for level in range(min_level, top + 1):
      feats[str(level)] = self.post_hoc[str(level)](feats[str(level)])
    for level in range(top + 1, max_level + 1):
      x = feats[str(level - 1)]
      if level > top + 1:
        x = ops.relu(x)
      feats[str(level)] = self.coarse[str(level)](x)
    if self._config["use_batch_norm"]:
      for level in range(min_level, max_level + 1):
        feats[str(level)] = self.norms[str(level)](
            feats[str(level)], training=training)
    return {str(l): feats[str(l)] for l in range(min_level, max_level + 1)}

  def get_config(self):
    config = super().get_config()
    config.update(self._config)
    return config
