"""RetinaNet class/box head (reference §4), Keras 3, keras.ops only."""

import math

import keras
from keras import ops

from official_shapemask.modeling.layers import batch_norm
from official_shapemask.modeling.layers.conv_norm import conv_norm


@keras.saving.register_keras_serializable(package="official_shapemask")
class RetinaNetHead(keras.layers.Layer):
  """Class and box towers shared across pyramid levels.

  Each tower has ``num_convs`` 3x3 convolutions (``num_filters``, kernel
  N(0, 0.01), bias 0) whose weights are shared by all levels, each followed
  by its own BatchNorm per (conv index, level) and a ReLU. The class
  predictor is a 3x3 convolution to ``A * num_classes`` channels with kernel
  N(0, 1e-5) and bias ``-ln((1 - p) / p)`` (p = ``prior_probability``,
  -4.595 for 0.01); the box predictor a 3x3 convolution to ``A * 4``
  channels, kernel N(0, 1e-5), bias 0.

  Args:
    min_level: int, lowest level. Default 3.
    max_level: int, highest level. Default 7.
    num_classes: int, class slots including background slot 0. Default 91.
    num_anchors_per_location: int, A. Default 9.
    num_convs: int, convolutions per tower. Default 4.
    num_filters: int, tower channels. Default 256.
    prior_probability: float, initial foreground probability. Default 0.01.
    use_batch_norm: bool, BatchNorm after every tower convolution (ReLU
      only when False). Default True.
    norm_momentum: float, BatchNorm momentum. Default 0.997.
    norm_epsilon: float, BatchNorm epsilon. Default 1e-4.
    use_sync_bn: bool, cross-replica BatchNorm. Default False.

  Call args:
    features: dict ``{str(l): [B, H_l, W_l, c]}`` for
      ``l = min_level..max_level``.
    training: bool, BatchNorm mode.

  Returns:
    cls_outputs: ``[B, A_total, num_classes]`` logits.
    box_outputs: ``[B, A_total, 4]`` encoded ``(ty, tx, th, tw)``.
    ``A_total = sum_l H_l * W_l * A`` in the flat anchor order of
    ``official_shapemask.ops.anchors`` (level-major, then y, x, anchor;
    predictor channel ``a * num_classes + c`` is anchor ``a``, class ``c``).
  """

  def __init__(self, min_level=3, max_level=7, num_classes=91,
               num_anchors_per_location=9, num_convs=4, num_filters=256,
               prior_probability=0.01, use_batch_norm=True,
               norm_momentum=0.997, norm_epsilon=1e-4, use_sync_bn=False,
               **kwargs):
    super().__init__(**kwargs)
    if not 0.0 < prior_probability < 1.0:
      raise ValueError(
          f"RetinaNetHead: prior_probability must be in (0, 1), got "
          f"{prior_probability}.")
    self._config = dict(
        min_level=min_level, max_level=max_level, num_classes=num_classes,
        num_anchors_per_location=num_anchors_per_location,
        num_convs=num_convs, num_filters=num_filters,
        prior_probability=prior_probability, use_batch_norm=use_batch_norm,
        norm_momentum=norm_momentum, norm_epsilon=norm_epsilon,
        use_sync_bn=use_sync_bn)
    tower_init = keras.initializers.RandomNormal(stddev=0.01)
    predict_init = keras.initializers.RandomNormal(stddev=1e-5)

    def tower(prefix):
      convs = [
          keras.layers.Conv2D(
              num_filters, 3, padding="same", kernel_initializer=tower_init,
              bias_initializer="zeros", dtype=self.dtype_policy,
              name=f"{prefix}-{i}") for i in range(num_convs)
      ]
      norms = {}
      if use_batch_norm:
        for i in range(num_convs):
          for level in range(min_level, max_level + 1):
            norms[f"{i}-{level}"] = batch_norm.BatchNormalization(
                momentum=norm_momentum, epsilon=norm_epsilon,
                synchronized=use_sync_bn, dtype=self.dtype_policy,
                name=f"{prefix}-{i}-{level}")
      return convs, norms

    self.class_convs, self.class_norms = tower("class")
    self.box_convs, self.box_norms = tower("box")
    bias = -math.log((1.0 - prior_probability) / prior_probability)
    self.class_predict = keras.layers.Conv2D(
        num_classes * num_anchors_per_location, 3, padding="same",
        kernel_initializer=predict_init,
        bias_initializer=keras.initializers.Constant(bias),
        dtype=self.dtype_policy, name="class-predict")
    self.box_predict = keras.layers.Conv2D(
        4 * num_anchors_per_location, 3, padding="same",
        kernel_initializer=predict_init, bias_initializer="zeros",
        dtype=self.dtype_policy, name="box-predict")

  def build(self, features_shape):
    cfg = self._config
    key = str(cfg["min_level"])
    if key not in features_shape:
      raise ValueError(
          f"RetinaNetHead: features lack level '{key}'; got keys "
          f"{sorted(features_shape)}.")
    shape = (None, None, None, features_shape[key][-1])
    filters_shape = (None, None, None, cfg["num_filters"])
    for convs, norms in ((self.class_convs, self.class_norms),
                         (self.box_convs, self.box_norms)):
      for i, conv in enumerate(convs):
        conv.build(shape if i == 0 else filters_shape)
      for norm in norms.values():
        norm.build(filters_shape)
    predict_shape = filters_shape if cfg["num_convs"] else shape
    self.class_predict.build(predict_shape)
    self.box_predict.build(predict_shape)

  def _tower(self, x, convs, norms, level, training):
    for i, conv in enumerate(convs):
      norm = norms[f"{i}-{level}"] if norms else None
      x = ops.relu(conv_norm(conv, norm, x, training=training))
    return x

  def call(self, features, training=None):
    cfg = self._config
    num_anchors = cfg["num_anchors_per_location"]
    cls_outputs, box_outputs = [], []
    for level in range(cfg["min_level"], cfg["max_level"] + 1):
      if str(level) not in features:
        raise ValueError(
            f"RetinaNetHead: features lack level '{level}'; got keys "
            f"{sorted(features)}.")
      x = features[str(level)]
      height, width = x.shape[1], x.shape[2]
      cls = self.class_predict(
          self._tower(x, self.class_convs, self.class_norms, level, training))
      box = self.box_predict(
          self._tower(x, self.box_convs, self.box_norms, level, training))
      cls_outputs.append(ops.reshape(
          cls, (-1, height * width * num_anchors, cfg["num_classes"])))
      box_outputs.append(ops.reshape(
          box, (-1, height * width * num_anchors, 4)))
    return (ops.concatenate(cls_outputs, axis=1),
            ops.concatenate(box_outputs, axis=1))

  def get_config(self):
    config = super().get_config()
    config.update(self._config)
    return config
