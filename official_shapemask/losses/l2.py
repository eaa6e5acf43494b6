"""L2 weight decay (reference spec section 6)."""

from keras import ops


def l2_regularization_loss(variables, weight=1e-4):
  """``weight * sum_v 0.5 * ||v||**2`` over `variables`, in float32.

  The caller picks the list: `ShapeMaskModel.l2_regularized_variables()`
  (every trainable variable, or the seed's subset).

  Args:
    variables: iterable of variables or tensors.
    weight: float, decay coefficient.

  Returns:
    float32 scalar (0.0 for an empty list).
  """
  total = ops.convert_to_tensor(0.0, "float32")
  for variable in variables:
    value = ops.cast(ops.convert_to_tensor(variable), "float32")
    total = total + 0.5 * ops.sum(ops.square(value))
  return weight * total
