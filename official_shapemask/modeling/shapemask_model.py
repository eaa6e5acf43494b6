"""The ShapeMask model: RetinaNet detector + shape-prior, coarse and fine heads.

A subclassed `keras.Model` composed of plain Keras layers (see
`official_shapemask.modeling.factory.build_shapemask_model` for the builder).
It trains with `model.fit` on the input reader's `(images, labels)` batches and
with the custom `tf.distribute` loop; both use `compute_losses`, the one loss
implementation.

Tensor contracts (docs/contracts.md): images `[B, S, S, 3]`; boxes
`[ymin, xmin, ymax, xmax]` in pixels of the padded canvas.
"""

import keras
from keras import ops

from official_shapemask import losses as losses_lib
from official_shapemask.modeling.layers import batch_norm
from official_shapemask.ops import box_ops

# Keys of the training labels that the forward pass needs (the mask branch
# runs on the ground-truth boxes in training).
MASK_INPUT_KEYS = ("mask_boxes", "mask_outer_boxes", "mask_classes")
LOSS_NAMES = ("cls_loss", "box_loss", "prior_loss", "coarse_loss", "fine_loss",
              "l2_loss")
# Every loss a training step reports, in the order of the progress lines.
LOSS_KEYS = ("total_loss", "model_loss") + LOSS_NAMES
# Which trainable variables the L2 term decays (`ShapeMaskModel.l2_variables`):
# 'all' (the reference since December 2019) or 'seed_2019' (the seed's code:
# all but the backbone's batch-norm gamma/beta and every bias).
L2_VARIABLE_RULES = ("all", "seed_2019")


def _is_eval_batch(data):
  """Whether `data` is an `(images, labels)` batch with `image_info`."""
  return (isinstance(data, (tuple, list)) and len(data) >= 2 and
          isinstance(data[1], dict) and "image_info" in data[1])


def _nested_items(prefix, value):
  """(name, item) of the layers and variables inside lists/tuples/dicts."""
  if isinstance(value, (list, tuple)):
    for i, item in enumerate(value):
      yield from _nested_items(f"{prefix}_{i}", item)
  elif isinstance(value, dict):
    for key, item in value.items():
      yield from _nested_items(f"{prefix}_{key}", item)
  elif isinstance(value, (keras.layers.Layer, keras.Variable)):
    yield prefix, value


def _track_nested_state(model):
  """Names every layer/variable held in a list or dict for TF's object graph.

  Keras 3 keeps such collections in its own tracker, which TensorFlow's
  checkpoint graph does not follow: a `tf.train.Checkpoint(model=...)` would
  silently miss e.g. the ResNet blocks' BN statistics. Each item is added as
  a dependency named `<attribute>_<index or key>` of the layer holding it.
  Only runs under the TensorFlow backend (the method is TF's).
  """
  for layer in model._flatten_layers(include_self=True, recursive=True):  # pylint: disable=protected-access
    track = getattr(layer, "_track_trackable", None)
    if track is None:
      return
    for attr, value in list(vars(layer).items()):
      if attr.startswith("_") or not isinstance(value, (list, tuple, dict)):
        continue
      for name, item in _nested_items(attr, value):
        track(item, name=name, overwrite=True)


@keras.saving.register_keras_serializable(package="official_shapemask")
class ShapeMaskModel(keras.Model):
  """ShapeMask instance segmentation model.

  Call with either an image batch `[B, S, S, 3]` (inference: detections, then
  the mask branch on them) or a dict `{'images': ..., 'mask_boxes': [B, N, 4],
  'mask_outer_boxes': [B, N, 4], 'mask_classes': [B, N]}` (the mask branch on
  the given boxes, as in training). A dict may also carry `image_info`
  `[B, 4, 2]`, which inference passes through.

  Args:
    backbone: layer mapping images to `{'2'..'5': C_l}`.
    decoder: FPN layer mapping those to `{'3'..str(max_level): P_l}`.
    head: RetinaNet head, `(cls [B, A, C], box [B, A, 4])`.
    prior_head: `ShapePriorHead`.
    coarse_head: `CoarseMaskHead`.
    fine_head: `FineMaskHead`.
    detection_generator: `DetectionGenerator` (inference post-processing).
    loss: `ShapeMaskLoss` (weights of the loss terms).
    image_size: int, the square padded canvas side `S`.
    outer_box_scale: float, outer boxes = boxes scaled about their centre.
    l2_weight_decay: float, weight of `0.5 * sum(v**2)` over the variables
      of `l2_variables`.
    l2_variables: which trainable variables the L2 term decays (frozen
      ones never count): `'all'` (the reference since December 2019:
      kernels, biases, every batch-norm gamma/beta) or `'seed_2019'` (the
      seed's code of November 2019: all but the backbone's batch-norm
      gamma/beta and every bias; the FPN's and heads' batch norms are
      decayed). See `l2_regularized_variables`.
    batch_groups: int G, how training normalises (`set_batch_groups`);
      1 = over the whole batch.
  """

  def __init__(self,
               backbone,
               decoder,
               head,
               prior_head,
               coarse_head,
               fine_head,
               detection_generator,
               loss,
               image_size,
               outer_box_scale=1.25,
               l2_weight_decay=1e-4,
               l2_variables="all",
               batch_groups=1,
               **kwargs):
    super().__init__(**kwargs)
    self.backbone = backbone
    self.decoder = decoder
    self.head = head
    self.prior_head = prior_head
    self.coarse_head = coarse_head
    self.fine_head = fine_head
    self.detection_generator = detection_generator
    self.shapemask_loss = loss
    self.image_size = int(image_size)
    self.outer_box_scale = float(outer_box_scale)
    self.l2_weight_decay = float(l2_weight_decay)
    if l2_variables not in L2_VARIABLE_RULES:
      raise ValueError(
          f"l2_variables={l2_variables!r} is not one of "
          f"{', '.join(repr(r) for r in L2_VARIABLE_RULES)}")
    self.l2_variables = l2_variables
    self._loss_trackers = {
        name: keras.metrics.Mean(name=name) for name in LOSS_NAMES
    }
    # Attribute assignment makes Keras track the metrics (reset per epoch).
    self.loss_trackers = list(self._loss_trackers.values())
    self.set_batch_groups(batch_groups)

  def set_batch_groups(self, num_groups):
    """Normalise training batches in `num_groups` groups (ghost batches).

    With G > 1 a training batch of B images counts as G replicas of
    ``B / G`` consecutive images each: every batch norm takes its
    statistics per group (`batch_norm.BatchNormalization(num_groups=G)`)
    and `compute_losses` normalises every term within each group, then
    averages over the groups (`losses.group_sums`). So one device computes
    what G replicas of the `tf.distribute` loop compute. The engines set it
    from `Experiment.per_replica_batch_size`, before the step is traced.
    Inference does not depend on it; B must be a multiple of G in training.

    Args:
      num_groups: int >= 1.
    """
    num_groups = batch_norm.check_num_groups(num_groups)
    for layer in self._flatten_layers(include_self=False, recursive=True):  # pylint: disable=protected-access
      if isinstance(layer, batch_norm.BatchNormalization):
        layer.set_num_groups(num_groups)
    self.batch_groups = num_groups

  def _trackable_children(self, save_type="checkpoint", **kwargs):
    # Called by TensorFlow when it saves or restores a checkpoint/SavedModel.
    _track_nested_state(self)
    return super()._trackable_children(save_type, **kwargs)

  def build(self, input_shape=None):
    # Sub-layers build on the first call (static shapes come from the data).
    del input_shape
    self.built = True

  # ---------------------------------------------------------------- forward
  def _features(self, images, training):
    backbone_features = self.backbone(images, training=training)
    return self.decoder(backbone_features, training=training)

  def _mask_branch(self, fpn_features, boxes, outer_boxes, classes, training):
    instance_features, prior_masks = self.prior_head(
        fpn_features, boxes, outer_boxes, classes, training=training)
    coarse_logits = self.coarse_head(
        instance_features, prior_masks, classes, training=training)
    fine_logits = self.fine_head(
        instance_features, coarse_logits, classes, training=training)
    return prior_masks, coarse_logits, fine_logits

  def call(self, inputs, training=None):
    if isinstance(inputs, dict):
      images = inputs["images"]
      given_boxes = all(k in inputs for k in MASK_INPUT_KEYS)
    else:
      images, given_boxes = inputs, False
    fpn_features = self._features(images, training)
    cls_outputs, box_outputs = self.head(fpn_features, training=training)

    if given_boxes:
      classes = ops.cast(inputs["mask_classes"], "int32")
      prior, coarse, fine = self._mask_branch(
          fpn_features, inputs["mask_boxes"], inputs["mask_outer_boxes"],
          classes, training)
      return {
          "cls_outputs": ops.cast(cls_outputs, "float32"),
          "box_outputs": ops.cast(box_outputs, "float32"),
          "prior_masks": ops.cast(prior, "float32"),
          "coarse_mask_logits": ops.cast(coarse, "float32"),
          "fine_mask_logits": ops.cast(fine, "float32"),
      }

    detections = self.detection_generator(
        ops.cast(cls_outputs, "float32"), ops.cast(box_outputs, "float32"))
    boxes = detections["detection_boxes"]
    outer_boxes = box_ops.compute_outer_boxes(
        boxes, self.image_size, self.image_size, scale=self.outer_box_scale)
    classes = ops.cast(detections["detection_classes"], "int32")
    _, _, fine = self._mask_branch(
        fpn_features, ops.stop_gradient(boxes),
        ops.stop_gradient(outer_boxes), classes, training)
    outputs = dict(detections)
    outputs["detection_outer_boxes"] = outer_boxes
    outputs["detection_masks"] = ops.sigmoid(ops.cast(fine, "float32"))
    if isinstance(inputs, dict) and "image_info" in inputs:
      outputs["image_info"] = ops.cast(inputs["image_info"], "float32")
    return outputs

  # ------------------------------------------------------------------- loss
  def l2_regularized_variables(self):
    """The trainable variables the L2 term decays (`l2_variables`).

    `'seed_2019'` leaves out, by layer rather than by name, the gamma and
    beta of every batch norm inside the backbone and the bias of every
    layer (convolutions, transposed convolution, predictors); in the
    reference's names these are the variables containing
    `batch_normalization` or `bias`.

    Returns:
      list of variables, in `trainable_variables` order.
    """
    variables = self.trainable_variables
    if self.l2_variables == "all":
      return variables
    excluded = set()
    for layer in self.backbone._flatten_layers(include_self=True,  # pylint: disable=protected-access
                                               recursive=True):
      if isinstance(layer, keras.layers.BatchNormalization):
        excluded.update(id(v) for v in (layer.gamma, layer.beta)
                        if v is not None)
    for layer in self._flatten_layers(include_self=False, recursive=True):  # pylint: disable=protected-access
      bias = getattr(layer, "bias", None)
      if isinstance(bias, keras.Variable):
        excluded.add(id(bias))
    return [v for v in variables if id(v) not in excluded]

  def compute_losses(self, labels, outputs):
    """All loss terms, in float32.

    Args:
      labels: the training labels dict (docs/contracts.md).
      outputs: the training outputs of `call`.

    Returns:
      dict of scalars: cls_loss, box_loss, prior_loss, coarse_loss,
      fine_loss, model_loss, l2_loss (over `l2_regularized_variables`) and
      total_loss (= model_loss + l2_loss).
      With `batch_groups` G > 1 each model term is the mean over the G
      groups of the term normalised within the group; L2 is added once.
    """
    terms = dict(self.shapemask_loss(labels, outputs,
                                     num_groups=self.batch_groups))
    terms["l2_loss"] = losses_lib.l2_regularization_loss(
        self.l2_regularized_variables(), self.l2_weight_decay)
    terms["total_loss"] = terms["model_loss"] + terms["l2_loss"]
    return terms

  def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                   training=True):
    """Keras hook used by `fit`/`evaluate`; same losses as the custom loop."""
    del x, sample_weight, training
    terms = self.compute_losses(y, y_pred)
    for name, tracker in self._loss_trackers.items():
      tracker.update_state(terms[name])
    total = terms["total_loss"]
    if self.losses:  # Any `add_loss` from sub-layers.
      total = total + ops.sum(self.losses)
    return total

  # ------------------------------------------------------- Keras step hooks
  @staticmethod
  def pack_inputs(images, labels):
    """The forward-pass input of a training batch: images + GT mask boxes."""
    inputs = {"images": images}
    for key in MASK_INPUT_KEYS:
      inputs[key] = labels[key]
    return inputs

  def _pack_data(self, data):
    if isinstance(data, (tuple, list)) and len(data) >= 2 and isinstance(
        data[1], dict) and all(k in data[1] for k in MASK_INPUT_KEYS):
      images, labels = data[0], data[1]
      if isinstance(images, dict):
        images = images["images"]
      return (self.pack_inputs(images, labels), labels)
    return data

  def train_step(self, *args):
    # TF/torch backends call train_step(data); JAX calls train_step(state,
    # data). Only the batch is repacked so the default steps run the mask
    # branch on the ground-truth boxes.
    *state, data = args
    return super().train_step(*state, self._pack_data(data))

  def test_step(self, *args):
    *state, data = args
    return super().test_step(*state, self._pack_data(data))

  def predict_step(self, *args):
    # `(images, labels)` batches from the eval parser: predict from the
    # images alone, passing image_info through for the evaluator.
    # `predict(dataset)` passes such a batch as is; `predict_on_batch(batch)`
    # wraps it in a 1-tuple `((images, labels),)`.
    *state, data = args
    if (isinstance(data, (tuple, list)) and len(data) == 1 and
        _is_eval_batch(data[0])):
      data = data[0]
    if _is_eval_batch(data):
      images = data[0]
      if isinstance(images, dict):
        images = images["images"]
      data = ({"images": images, "image_info": data[1]["image_info"]},)
    return super().predict_step(*state, data)

  # ---------------------------------------------------------- serialization
  def get_config(self):
    config = super().get_config()
    config.update({
        "backbone": keras.saving.serialize_keras_object(self.backbone),
        "decoder": keras.saving.serialize_keras_object(self.decoder),
        "head": keras.saving.serialize_keras_object(self.head),
        "prior_head": keras.saving.serialize_keras_object(self.prior_head),
        "coarse_head": keras.saving.serialize_keras_object(self.coarse_head),
        "fine_head": keras.saving.serialize_keras_object(self.fine_head),
        "detection_generator": keras.saving.serialize_keras_object(
            self.detection_generator),
        "loss": keras.saving.serialize_keras_object(self.shapemask_loss),
        "image_size": self.image_size,
        "outer_box_scale": self.outer_box_scale,
        "l2_weight_decay": self.l2_weight_decay,
        "l2_variables": self.l2_variables,
        "batch_groups": self.batch_groups,
    })
    return config

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    for key in ("backbone", "decoder", "head", "prior_head", "coarse_head",
                "fine_head", "detection_generator", "loss"):
      config[key] = keras.saving.deserialize_keras_object(config[key])
    return cls(**config)
