"""The ShapeMask training loss (reference spec section 6).

``model_loss = cls + w_box * box + w_prior * prior + w_coarse * coarse +
w_fine * fine``; L2 weight decay is added by the caller
(`l2_regularization_loss`), which owns the variable list.
"""

import keras
from keras import ops

from official_shapemask.losses.box_loss import huber_box_loss
from official_shapemask.losses.focal_loss import focal_loss
from official_shapemask.losses.group_sums import group_sums
from official_shapemask.losses.mask_losses import MASK_LOSS_EPSILON
from official_shapemask.losses.mask_losses import mask_cross_entropy_loss
from official_shapemask.losses.mask_losses import shape_prior_loss

LABEL_KEYS = ("cls_targets", "box_targets", "num_positives", "mask_targets",
              "fine_mask_targets", "mask_is_valid")
OUTPUT_KEYS = ("cls_outputs", "box_outputs", "prior_masks",
               "coarse_mask_logits", "fine_mask_logits")
LOSS_KEYS = ("cls_loss", "box_loss", "prior_loss", "coarse_loss", "fine_loss",
             "model_loss")


def _require(tensors, keys, what):
  missing = [key for key in keys if key not in tensors]
  if missing:
    raise KeyError(
        f"ShapeMaskLoss: {what} lack {missing}; got {sorted(tensors)} "
        "(see docs/contracts.md).")


@keras.saving.register_keras_serializable(package="official_shapemask")
class ShapeMaskLoss:
  """Computes every ShapeMask loss term in float32.

  Class and box losses are normalised by ``sum_batch(num_positives) + 1``
  (per replica); the mask losses by their foreground pixel counts. Called
  with ``num_groups = G > 1``, each term is normalised within each group of
  ``B / G`` consecutive images and averaged over the groups, as G replicas
  of the `tf.distribute` loop compute it (`group_sums`).

  Args:
    focal_loss_alpha: float, focal-loss positive weight.
    focal_loss_gamma: float, focal-loss exponent.
    huber_loss_delta: float, box Huber threshold.
    box_loss_weight: float, weight of the box loss.
    prior_loss_weight: float, weight of the shape-prior MSE loss.
    coarse_loss_weight: float, weight of the coarse mask loss.
    fine_loss_weight: float, weight of the fine mask loss.
    mask_loss_epsilon: float, guard in the mask-loss denominators
      (reference 1e-20).
  """

  def __init__(self,
               focal_loss_alpha=0.4,
               focal_loss_gamma=1.5,
               huber_loss_delta=0.15,
               box_loss_weight=50.0,
               prior_loss_weight=0.1,
               coarse_loss_weight=1.0,
               fine_loss_weight=1.0,
               mask_loss_epsilon=MASK_LOSS_EPSILON):
    self.focal_loss_alpha = float(focal_loss_alpha)
    self.focal_loss_gamma = float(focal_loss_gamma)
    self.huber_loss_delta = float(huber_loss_delta)
    self.box_loss_weight = float(box_loss_weight)
    self.prior_loss_weight = float(prior_loss_weight)
    self.coarse_loss_weight = float(coarse_loss_weight)
    self.fine_loss_weight = float(fine_loss_weight)
    self.mask_loss_epsilon = float(mask_loss_epsilon)

  def __call__(self, labels, outputs, num_groups=1):
    """All loss terms.

    Args:
      labels: training-batch label dict (contracts.md): ``cls_targets``
        ``[B, A]``, ``box_targets`` ``[B, A, 4]``, ``num_positives`` ``[B]``,
        ``mask_targets`` ``[B, N, m, m]``, ``fine_mask_targets``
        ``[B, N, m*u, m*u]``, ``mask_is_valid`` ``[B, N]``; other keys are
        ignored.
      outputs: model training outputs: ``cls_outputs`` ``[B, A, C]``,
        ``box_outputs`` ``[B, A, 4]``, ``prior_masks`` ``[B, N, m, m]``,
        ``coarse_mask_logits`` ``[B, N, m, m]``, ``fine_mask_logits``
        ``[B, N, m*u, m*u]``.
      num_groups: int G >= 1 dividing B: per-group normalisation, averaged.

    Returns:
      dict of float32 scalars: cls_loss, box_loss, prior_loss, coarse_loss,
      fine_loss, model_loss (the weighted sum).
    """
    _require(labels, LABEL_KEYS, "labels")
    _require(outputs, OUTPUT_KEYS, "outputs")
    groups = num_groups
    normalizer = group_sums(ops.cast(labels["num_positives"], "float32"),
                            groups) + 1.0
    valid = labels["mask_is_valid"]
    terms = {
        "cls_loss": focal_loss(
            outputs["cls_outputs"], labels["cls_targets"],
            alpha=self.focal_loss_alpha, gamma=self.focal_loss_gamma,
            normalizer=normalizer, num_groups=groups),
        "box_loss": huber_box_loss(
            outputs["box_outputs"], labels["box_targets"],
            delta=self.huber_loss_delta, normalizer=normalizer,
            num_groups=groups),
        "prior_loss": shape_prior_loss(
            outputs["prior_masks"], labels["mask_targets"], valid,
            epsilon=self.mask_loss_epsilon, num_groups=groups),
        "coarse_loss": mask_cross_entropy_loss(
            outputs["coarse_mask_logits"], labels["mask_targets"], valid,
            epsilon=self.mask_loss_epsilon, num_groups=groups),
        "fine_loss": mask_cross_entropy_loss(
            outputs["fine_mask_logits"], labels["fine_mask_targets"], valid,
            epsilon=self.mask_loss_epsilon, num_groups=groups),
    }
    terms["model_loss"] = (
        terms["cls_loss"] + self.box_loss_weight * terms["box_loss"] +
        self.prior_loss_weight * terms["prior_loss"] +
        self.coarse_loss_weight * terms["coarse_loss"] +
        self.fine_loss_weight * terms["fine_loss"])
    return terms

  def get_config(self):
    return {
        "focal_loss_alpha": self.focal_loss_alpha,
        "focal_loss_gamma": self.focal_loss_gamma,
        "huber_loss_delta": self.huber_loss_delta,
        "box_loss_weight": self.box_loss_weight,
        "prior_loss_weight": self.prior_loss_weight,
        "coarse_loss_weight": self.coarse_loss_weight,
        "fine_loss_weight": self.fine_loss_weight,
        "mask_loss_epsilon": self.mask_loss_epsilon,
    }

  @classmethod
  def from_config(cls, config):
    return cls(**config)
