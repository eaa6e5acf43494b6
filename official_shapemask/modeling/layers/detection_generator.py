"""RetinaNet post-processing: decode, per-class NMS, global top-k (§9.1-9.3).

Keras 3, keras.ops only; static shapes; traces under XLA and jax.jit.
"""

import keras
from keras import ops

from official_shapemask.ops import anchors as anchor_ops
from official_shapemask.ops import box_ops
from official_shapemask.ops import nms


def _gather_per_image(values, indices):
  """``values[b, indices[b, ...]]`` for ``values [B, N, D]``, ``indices
  [B, ...]`` (int) -> ``[B, ..., D]``, without broadcasting ``values``."""
  num = values.shape[1]
  indices = ops.cast(indices, "int32")
  batch = ops.shape(indices)[0]
  offsets = ops.arange(batch, dtype="int32") * num
  offsets = ops.reshape(offsets, (-1,) + (1,) * (len(indices.shape) - 1))
  flat = ops.reshape(values, (-1, values.shape[2]))
  gathered = ops.take(flat, ops.reshape(indices + offsets, (-1,)), axis=0)
  return ops.reshape(gathered,
                     (-1,) + tuple(indices.shape[1:]) + (values.shape[2],))


@keras.saving.register_keras_serializable(package="official_shapemask")
class DetectionGenerator(keras.layers.Layer):
  """Turns RetinaNet head outputs into a fixed number of detections.

  Steps (reference ``_generate_detections_v1``, §9):
  1. sigmoid on the class logits, drop background channel 0;
  2. decode every anchor's box with ``box_ops.decode_boxes`` (legacy "+1"
     convention, size clip ln(1000/16)), clip to ``[0, size - 1]`` of the
     padded canvas;
  3. per class: the ``pre_nms_num_boxes`` highest scores, then greedy NMS
     (candidates need score > ``score_threshold``; a box is suppressed by a
     kept box with IoU > ``nms_iou_threshold``), at most
     ``max_num_detections`` kept per class, score -1 in unused slots;
  4. all classes together: the global top ``max_num_detections`` by score.

  Differences from the reference, none of which changes a valid detection:
  - Steps 3 and 4 are batched: one ``[B, C - 1, k]`` top-k, then
    ``ops.nms.multiclass_non_max_suppression_padded``, a single greedy pass
    over all classes that yields exactly the per-class-NMS-then-global-top-k
    result (see its docstring) in at most ``max_num_detections`` steps,
    instead of a Python loop over images and classes. The loop stops early
    once no candidate is left.
  - Padded output slots (score -1) get box ``[0, 0, 0, 0]`` and class 0;
    the reference leaves whatever box/class its gather produced there.
  - IoU uses plain box sizes with a 1e-8 epsilon (``box_ops.box_iou``)
    where ``tf.image.non_max_suppression_padded`` uses its own kernel; they
    agree except for IoU values within ~1e-8 of the threshold.

  Args:
    image_size: ``(height, width)`` of the padded canvas.
    min_level: int, lowest anchor level. Default 3.
    max_level: int, highest anchor level. Default 7.
    num_scales: int, anchor scales per level. Default 3.
    aspect_ratios: sequence of float, anchor width/height ratios.
      Default ``(1.0, 2.0, 0.5)``.
    anchor_size: float, anchor base size relative to the stride. Default 4.
    pre_nms_num_boxes: int, candidates per class before NMS (capped at the
      number of anchors). Default 5000.
    nms_iou_threshold: float. Default 0.5.
    score_threshold: float. Default 0.05.
    max_num_detections: int, output slots (and per-class NMS budget).
      Default 100.

  Call args:
    cls_outputs: ``[B, A_total, C]`` class logits (C includes background).
    box_outputs: ``[B, A_total, 4]`` encoded box offsets.

  Returns:
    dict with
    - ``num_detections``: int32 ``[B]``, number of valid slots (a prefix);
    - ``detection_boxes``: float32 ``[B, N, 4]`` canvas pixels,
      ``[ymin, xmin, ymax, xmax]``;
    - ``detection_classes``: int32 ``[B, N]``, class slot id (1..C-1; the
      raw COCO id for COCO), 0 in padded slots;
    - ``detection_scores``: float32 ``[B, N]``, sigmoid scores in decreasing
      order, -1 in padded slots;
    where ``N = max_num_detections``.
  """

  def __init__(self, image_size, min_level=3, max_level=7, num_scales=3,
               aspect_ratios=(1.0, 2.0, 0.5), anchor_size=4.0,
               pre_nms_num_boxes=5000, nms_iou_threshold=0.5,
               score_threshold=0.05, max_num_detections=100, **kwargs):
    super().__init__(**kwargs)
    image_size = tuple(int(s) for s in image_size)
    aspect_ratios = tuple(float(r) for r in aspect_ratios)
    self._config = dict(
        image_size=image_size, min_level=min_level, max_level=max_level,
        num_scales=num_scales, aspect_ratios=aspect_ratios,
        anchor_size=anchor_size, pre_nms_num_boxes=pre_nms_num_boxes,
        nms_iou_threshold=nms_iou_threshold, score_threshold=score_threshold,
        max_num_detections=max_num_detections)
    self._anchors = anchor_ops.generate_anchors(
        image_size, min_level, max_level, num_scales, aspect_ratios,
        anchor_size)

  def call(self, cls_outputs, box_outputs):
    cfg = self._config
    num_anchors = self._anchors.shape[0]
    if cls_outputs.shape[1] != num_anchors or box_outputs.shape[1] != (
        num_anchors):
      raise ValueError(
          f"DetectionGenerator: expected {num_anchors} anchors for "
          f"image_size={cfg['image_size']}, levels {cfg['min_level']}.."
          f"{cfg['max_level']}, got cls_outputs {cls_outputs.shape} and "
          f"box_outputs {box_outputs.shape}.")
    num_classes = cls_outputs.shape[2]
    if num_classes is None or num_classes < 2:
      raise ValueError(
          f"DetectionGenerator: cls_outputs needs a static class dimension "
          f">= 2 (background + classes), got {cls_outputs.shape}.")
    max_det = int(cfg["max_num_detections"])
    height, width = cfg["image_size"]

    # [B, A, C - 1] foreground probabilities, [B, A, 4] clipped boxes.
    scores = ops.sigmoid(ops.cast(cls_outputs, "float32"))[:, :, 1:]
    boxes = box_ops.decode_boxes(box_outputs,
                                 ops.convert_to_tensor(self._anchors))
    boxes = box_ops.clip_boxes(boxes, height, width)

    # Per-class candidates: [B, C - 1, k].
    k = min(int(cfg["pre_nms_num_boxes"]), num_anchors)
    class_scores, class_idx = ops.top_k(
        ops.transpose(scores, (0, 2, 1)), k, sorted=True)
    class_boxes = _gather_per_image(boxes, class_idx)  # [B, C - 1, k, 4]

    # Per-class NMS + global top max_det, as one greedy pass.
    top_class, top_pos, is_valid = nms.multiclass_non_max_suppression_padded(
        class_boxes, class_scores, max_det,
        iou_threshold=cfg["nms_iou_threshold"],
        score_threshold=cfg["score_threshold"])  # [B, max_det]
    pick = top_class * k + top_pos  # into the flattened [C - 1, k] axis
    flat_scores = ops.reshape(class_scores, (-1, (num_classes - 1) * k))
    top_scores = ops.where(
        is_valid, ops.take_along_axis(flat_scores, pick, axis=1), -1.0)
    top_boxes = _gather_per_image(
        ops.reshape(class_boxes, (-1, (num_classes - 1) * k, 4)), pick)
    top_classes = top_class + 1
    return {
        "num_detections": ops.sum(ops.cast(is_valid, "int32"), axis=1),
        "detection_boxes": ops.where(is_valid[..., None], top_boxes, 0.0),
        "detection_classes": ops.where(is_valid, top_classes, 0),
        "detection_scores": top_scores,
    }

  def get_config(self):
    config = super().get_config()
    config.update(self._config)
    return config
