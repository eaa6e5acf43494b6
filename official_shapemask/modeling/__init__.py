"""ShapeMask layers, heads and model (keras.ops only; no TensorFlow import)."""

from official_shapemask.modeling.factory import build_shapemask_model
from official_shapemask.modeling.shapemask_model import ShapeMaskModel

__all__ = ["build_shapemask_model", "ShapeMaskModel"]
