"""ShapeMask mask losses: prior MSE and coarse / fine cross-entropy.

Reference spec section 6. Both are normalised by the number of foreground
target pixels summed over **all** mask slots (valid or not) plus an epsilon
(1e-20 in the reference), and only valid slots contribute to the numerator.
With ``num_groups = G > 1`` numerator and count are per group of ``B / G``
images and the G quotients are averaged (`group_sums`).
"""

from keras import ops

from official_shapemask.losses.focal_loss import sigmoid_cross_entropy
from official_shapemask.losses.group_sums import group_sums
from official_shapemask.losses.group_sums import normalized_sum

MASK_LOSS_EPSILON = 1e-20


def _valid_weights(mask_is_valid):
  """``[B, N]`` -> float32 ``[B, N, 1, 1]``."""
  return ops.cast(mask_is_valid, "float32")[:, :, None, None]


def shape_prior_loss(prior_masks, mask_targets, mask_is_valid,
                     epsilon=MASK_LOSS_EPSILON, num_groups=1):
  """``0.5 * sum((T - prior)**2 * valid) / (sum(T) + epsilon)``.

  Args:
    prior_masks: ``[B, N, m, m]`` priors in [0, 1] (outer-box frame).
    mask_targets: ``[B, N, m, m]`` binary targets (outer-box frame).
    mask_is_valid: ``[B, N]`` 0/1 slot validity.
    epsilon: float, denominator guard.
    num_groups: int G, groups of ``B / G`` images normalised on their own.

  Returns:
    float32 scalar.
  """
  priors = ops.cast(prior_masks, "float32")
  targets = ops.cast(mask_targets, "float32")
  squared = ops.square(targets - priors) * _valid_weights(mask_is_valid)
  return 0.5 * normalized_sum(
      squared, group_sums(targets, num_groups) + epsilon, num_groups)


def mask_cross_entropy_loss(mask_logits, mask_targets, mask_is_valid,
                            epsilon=MASK_LOSS_EPSILON, num_groups=1):
  """``sum(sigmoid_ce(logits, T) * valid) / (sum(T) + epsilon)``.

  Used for the coarse (``m x m``) and the fine (``m*u x m*u``) logits.

  Args:
    mask_logits: ``[B, N, s, s]`` logits (outer-box frame).
    mask_targets: ``[B, N, s, s]`` binary targets (outer-box frame).
    mask_is_valid: ``[B, N]`` 0/1 slot validity.
    epsilon: float, denominator guard.
    num_groups: int G, groups of ``B / G`` images normalised on their own.

  Returns:
    float32 scalar.
  """
  targets = ops.cast(mask_targets, "float32")
  losses = (sigmoid_cross_entropy(mask_logits, targets) *
            _valid_weights(mask_is_valid))
  return normalized_sum(losses, group_sums(targets, num_groups) + epsilon,
                        num_groups)
