"""Sigmoid focal loss for the RetinaNet class outputs (reference spec section 6)."""

from keras import ops

from official_shapemask.losses.group_sums import normalized_sum

# Anchor labels in `cls_targets` (contracts.md).
NEGATIVE_LABEL = -1
IGNORE_LABEL = -2


def sigmoid_cross_entropy(logits, targets):
  """Elementwise, numerically stable sigmoid cross-entropy.

  ``max(x, 0) - x * z + log(1 + exp(-|x|))``, float32.
  """
  logits = ops.cast(logits, "float32")
  targets = ops.cast(targets, "float32")
  return (ops.relu(logits) - logits * targets +
          ops.log1p(ops.exp(-ops.abs(logits))))


def focal_modulator(logits, targets, gamma):
  """``(1 - p_t) ** gamma``, computed stably.

  ``exp(-gamma * z * x - gamma * softplus(-x))`` with ``p_t = sigmoid(x)``
  for ``z = 1`` and ``1 - sigmoid(x)`` for ``z = 0``; finite for any logit
  and with a well-defined gradient for ``gamma < 1``.
  """
  logits = ops.cast(logits, "float32")
  targets = ops.cast(targets, "float32")
  return ops.exp(-gamma * targets * logits - gamma * ops.softplus(-logits))


def focal_loss(logits, cls_targets, alpha=0.4, gamma=1.5, normalizer=1.0,
               num_groups=1):
  """Summed sigmoid focal loss over anchors and classes.

  Targets are one-hot over the C class slots; negatives (-1) and ignored
  anchors (-2) give all-zero rows, and ignored anchors contribute nothing.
  Positive elements are weighted by `alpha`, the others by ``1 - alpha``.

  Args:
    logits: ``[B, A, C]`` class logits (any float dtype; cast to float32).
    cls_targets: int ``[B, A]``: class id for positives, -1 negatives,
      -2 ignored.
    alpha: float, positive weight.
    gamma: float, focusing exponent.
    normalizer: float scalar (e.g. total positives + 1), or ``[G]`` with
      `num_groups` G > 1 (one per group).
    num_groups: int G: the sum of each group of ``B / G`` images is divided
      by its normalizer and the G results averaged (`group_sums`).

  Returns:
    float32 scalar: the sum divided by `normalizer`.
  """
  logits = ops.cast(logits, "float32")
  cls_targets = ops.cast(cls_targets, "int32")
  num_classes = logits.shape[-1]
  class_ids = ops.arange(num_classes, dtype="int32")
  positive = ops.equal(cls_targets[..., None], class_ids)
  targets = ops.cast(positive, "float32")
  loss = (focal_modulator(logits, targets, gamma) *
          sigmoid_cross_entropy(logits, targets))
  loss = ops.where(positive, alpha * loss, (1.0 - alpha) * loss)
  keep = ops.cast(ops.not_equal(cls_targets, IGNORE_LABEL), "float32")
  return normalized_sum(loss * keep[..., None],
                        ops.cast(normalizer, "float32"), num_groups)
