"""Loss sums per ghost batch: the TF loop's per-replica normalisation.

The seed normalises each loss on each core by that core's own count (the
positive anchors + 1, the foreground mask pixels) and averages the cores'
gradients. With ``num_groups = G > 1`` a batch ``[B, ...]`` stands for G
such replicas of ``B / G`` consecutive images: every loss term is
normalised within its group and the G results are averaged, which is what
the `tf.distribute` loop's ``1 / num_replicas`` scaling and SUM all-reduce
give on G replicas. ``G = 1`` is the plain sum over the batch.
"""

from keras import ops


def group_sums(values, num_groups=1):
  """Sums of `values` over each group of its leading axis.

  Args:
    values: float ``[B, ...]``.
    num_groups: int G; B must be a multiple of it.

  Returns:
    float scalar (G = 1: the sum of everything) or ``[G]`` (group g sums
    rows ``g * B / G`` to ``(g + 1) * B / G - 1``).
  """
  if num_groups == 1:
    return ops.sum(values)
  batch = values.shape[0]
  if batch is not None and batch % num_groups:
    raise ValueError(f"loss: the batch of {batch} images is not a multiple "
                     f"of num_groups={num_groups}")
  return ops.sum(ops.reshape(values, (num_groups, -1)), axis=1)


def normalized_sum(values, normalizer, num_groups=1):
  """``sum(values) / normalizer``, per group and averaged over the groups.

  Args:
    values: float32 ``[B, ...]``.
    normalizer: float32 scalar (G = 1) or ``[G]``, one per group.
    num_groups: int G.

  Returns:
    float32 scalar: ``mean_g(sum_g(values) / normalizer[g])``.
  """
  if num_groups == 1:
    return ops.sum(values) / normalizer
  return ops.mean(group_sums(values, num_groups) / normalizer)
