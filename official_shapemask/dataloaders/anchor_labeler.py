"""RetinaNet anchor labelling for the TensorFlow input pipeline (spec section 4).

Each anchor is matched to the ground-truth box of highest IoU. Anchors with
IoU >= ``match_threshold`` are positives, below ``unmatched_threshold``
negatives (-1), in between ignored (-2); every ground-truth box additionally
claims its best anchor even below the threshold (``force_match_for_each_row``
in the reference). Box targets use the Faster R-CNN encoding without scale
factors and plain ``(max - min)`` sizes, with an epsilon of 1e-8.

Reused from Model Garden: ``official.vision.ops.iou_similarity.IouSimilarity``
(the same IoU as the reference) and ``official.vision.ops.box_matcher.
BoxMatcher`` (arg-max matching with thresholds and force matching, identical
to the reference ``ArgMaxMatcher``: IoU >= match threshold is positive, ties in
force matching go to the lower ground-truth index). Not reused:
``official.vision.ops.anchor.AnchorLabeler``, because it encodes a zero box
against every non-positive anchor (non-zero targets there) and cannot mark
ignored anchors with -2, while the reference and ``docs/contracts.md`` want
zeros and -1/-2.
"""

import numpy as np
import tensorflow as tf

from official.vision.ops import box_matcher
from official.vision.ops import iou_similarity
from official_shapemask.ops import anchors as anchor_ops

_EPSILON = 1e-8


def encode_boxes(boxes, anchors):
  """Encodes boxes relative to anchors, reference coder without scale factors.

  Args:
    boxes: float32 ``[..., 4]`` ``[ymin, xmin, ymax, xmax]``.
    anchors: float32 ``[..., 4]`` of the same (or broadcastable) shape.

  Returns:
    float32 ``[..., 4]`` ``(ty, tx, th, tw)``: ``ty = (yc - yc_a) / h_a``,
    ``tx = (xc - xc_a) / w_a``, ``th = log(h / h_a)``, ``tw = log(w / w_a)``,
    sizes ``max - min`` plus 1e-8.
  """
  ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
  a_ymin, a_xmin, a_ymax, a_xmax = tf.unstack(anchors, axis=-1)
  h = ymax - ymin + _EPSILON
  w = xmax - xmin + _EPSILON
  ha = a_ymax - a_ymin + _EPSILON
  wa = a_xmax - a_xmin + _EPSILON
  yc = ymin + 0.5 * (ymax - ymin)
  xc = xmin + 0.5 * (xmax - xmin)
  yca = a_ymin + 0.5 * (a_ymax - a_ymin)
  xca = a_xmin + 0.5 * (a_xmax - a_xmin)
  return tf.stack([(yc - yca) / ha, (xc - xca) / wa,
                   tf.math.log(h / ha), tf.math.log(w / wa)], axis=-1)


class AnchorLabeler:
  """Assigns classification and box-regression targets to a fixed anchor set.

  Args:
    anchor_boxes: float32 array ``[A_total, 4]`` ``[ymin, xmin, ymax, xmax]``
      in canvas pixels, e.g. from ``official_shapemask.ops.anchors.
      generate_anchors``; the flat order is kept in the outputs.
    match_threshold: IoU at or above which an anchor is positive.
    unmatched_threshold: IoU below which an anchor is negative.
  """

  def __init__(self, anchor_boxes, match_threshold=0.5,
               unmatched_threshold=0.5):
    if unmatched_threshold > match_threshold:
      raise ValueError(
          f'unmatched_threshold ({unmatched_threshold}) must not exceed '
          f'match_threshold ({match_threshold}).')
    anchor_boxes = np.asarray(anchor_boxes, np.float32)
    if anchor_boxes.ndim != 2 or anchor_boxes.shape[1] != 4:
      raise ValueError(
          f'anchor_boxes must be [A_total, 4], got {anchor_boxes.shape}.')
    self._anchor_boxes = anchor_boxes
    self._similarity = iou_similarity.IouSimilarity()
    self._matcher = box_matcher.BoxMatcher(
        thresholds=[unmatched_threshold, match_threshold],
        indicators=[-1, -2, 1],
        force_match_for_each_col=True)

  @classmethod
  def from_config(cls, image_size, min_level=3, max_level=7, num_scales=3,
                  aspect_ratios=(1.0, 2.0, 0.5), anchor_size=4.0,
                  match_threshold=0.5, unmatched_threshold=0.5):
    """Builds a labeler for the anchors of an ``image_size`` canvas."""
    boxes = anchor_ops.generate_anchors(image_size, min_level, max_level,
                                        num_scales, aspect_ratios,
                                        anchor_size)
    return cls(boxes, match_threshold, unmatched_threshold)

  @property
  def num_anchors(self):
    return self._anchor_boxes.shape[0]

  def label_anchors(self, gt_boxes, gt_classes):
    """Labels all anchors.

    Args:
      gt_boxes: float32 ``[n, 4]`` ground-truth boxes, canvas pixels, ``n``
        may be 0 or dynamic.
      gt_classes: int ``[n]`` class ids.

    Returns:
      cls_targets: int32 ``[A_total]``: class id for positives, -1 negatives,
        -2 ignored.
      box_targets: float32 ``[A_total, 4]`` encoded ``(ty, tx, th, tw)``,
        zeros for non-positives.
      num_positives: float32 scalar.
    """
    anchors = tf.constant(self._anchor_boxes)
    gt_boxes = tf.reshape(tf.cast(gt_boxes, tf.float32), [-1, 4])
    gt_classes = tf.reshape(tf.cast(gt_classes, tf.int32), [-1])
    similarity = self._similarity(anchors, gt_boxes)  # [A, n]
    match_indices, indicators = self._matcher(similarity)  # [A], [A]
    positive = tf.equal(indicators, 1)

    # A trailing dummy row makes the gather safe when there is no box (the
    # matcher then returns index 0 for every anchor).
    padded_boxes = tf.concat([gt_boxes, tf.zeros([1, 4], tf.float32)], 0)
    padded_classes = tf.concat([gt_classes, tf.zeros([1], tf.int32)], 0)
    matched_classes = tf.gather(padded_classes, match_indices)
    matched_boxes = tf.gather(padded_boxes, match_indices)

    cls_targets = tf.where(
        positive, matched_classes,
        tf.where(tf.equal(indicators, -2), -2, -1))
    encoded = encode_boxes(matched_boxes, anchors)
    box_targets = tf.where(positive[:, None], encoded, tf.zeros_like(encoded))
    num_positives = tf.reduce_sum(tf.cast(positive, tf.float32))

    cls_targets = tf.ensure_shape(tf.cast(cls_targets, tf.int32),
                                  [self.num_anchors])
    box_targets = tf.ensure_shape(box_targets, [self.num_anchors, 4])
    return cls_targets, box_targets, num_positives
