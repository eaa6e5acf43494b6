"""ShapeMask losses (keras.ops only, float32): focal, Huber box, prior MSE,
coarse/fine mask cross-entropy, L2 weight decay and their weighted sum."""

from official_shapemask.losses.box_loss import huber_box_loss
from official_shapemask.losses.focal_loss import focal_loss
from official_shapemask.losses.focal_loss import focal_modulator
from official_shapemask.losses.focal_loss import sigmoid_cross_entropy
from official_shapemask.losses.l2 import l2_regularization_loss
from official_shapemask.losses.mask_losses import mask_cross_entropy_loss
from official_shapemask.losses.mask_losses import shape_prior_loss
from official_shapemask.losses.shapemask_loss import ShapeMaskLoss

__all__ = [
    "ShapeMaskLoss",
    "focal_loss",
    "focal_modulator",
    "huber_box_loss",
    "l2_regularization_loss",
    "mask_cross_entropy_loss",
    "shape_prior_loss",
    "sigmoid_cross_entropy",
]
