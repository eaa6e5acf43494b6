"""Huber loss for the RetinaNet box outputs (reference spec section 6)."""

from keras import ops

from official_shapemask.losses.group_sums import normalized_sum


def huber_box_loss(box_outputs, box_targets, delta=0.15, normalizer=1.0,
                   num_groups=1):
  """Summed Huber loss over the non-zero box-target elements.

  Per element ``0.5 * e**2`` for ``|e| <= delta`` else
  ``delta * (|e| - 0.5 * delta)``, with ``e = output - target``, counted
  only where the target is non-zero (non-positive anchors have all-zero
  targets).

  Args:
    box_outputs: ``[B, A, 4]`` encoded box predictions.
    box_targets: ``[B, A, 4]`` encoded targets, zeros for non-positives.
    delta: float, Huber threshold.
    normalizer: float scalar (e.g. total positives + 1), or ``[G]`` with
      `num_groups` G > 1 (one per group).
    num_groups: int G: per-group sums and normalizers, averaged over the
      groups (`group_sums`).

  Returns:
    float32 scalar: the sum divided by ``4 * normalizer``.
  """
  box_outputs = ops.cast(box_outputs, "float32")
  box_targets = ops.cast(box_targets, "float32")
  weight = ops.cast(ops.not_equal(box_targets, 0.0), "float32")
  error = ops.abs(box_outputs - box_targets)
  quadratic = ops.minimum(error, delta)
  linear = error - quadratic
  huber = 0.5 * ops.square(quadratic) + delta * linear
  return normalized_sum(huber * weight, 4.0 * ops.cast(normalizer, "float32"),
                        num_groups)
