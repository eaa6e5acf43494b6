"""Momentum SGD in the TF1 form (`tf.compat.v1.train.MomentumOptimizer`).

Two ways to write momentum SGD, for gradient `g`, learning rate `lr` and
momentum `m`:

- Keras' `SGD` keeps a velocity that already holds the learning rate:
  `v = m * v - lr * g; w = w + v`.
- TF1's `MomentumOptimizer` (the seed's optimizer) keeps an accumulator of
  raw gradients and applies the current learning rate to all of it:
  `a = m * a + g; w = w - lr * a` (Nesterov: `w = w - lr * (g + m * a)`,
  with the new `a`).

At a constant learning rate the two give the same weights. When the rate
changes, Keras keeps taking steps of the old size until the velocity has
decayed (about 1 / (1 - m) = 10 steps at m = 0.9), while the TF1 form
scales the whole step at once: over the seed's warmup and after each of its
drops the two runs differ. `TF1Momentum` is the TF1 form as a Keras 3
optimizer (`keras.ops` only): it trains under both engines, the TensorFlow
`tf.distribute` loop (`apply_gradients`) and the JAX step
(`stateless_apply`), serializes with `get_config` and checkpoints its
accumulators like `SGD`'s momentum slots.

`build_momentum_optimizer` is the gin-configured optimizer of `train.py`
(either form), and `learning_rate_at` the learning-rate readout of the
progress lines, the same for every engine.
"""

import gin
import keras
from keras import ops

MOMENTUM_FORMS = ("keras", "tf1")


@keras.saving.register_keras_serializable(package="official_shapemask")
class TF1Momentum(keras.optimizers.Optimizer):
  """Momentum SGD as TF1's `MomentumOptimizer` computes it.

  Update of each variable `w` with gradient `g` (float32 or the variable's
  dtype), learning rate `lr` of the current step and accumulator `a`
  (zeros at the start, one per variable, shaped like it):

      a = momentum * a + g
      w = w - lr * a                      (nesterov=False)
      w = w - lr * (g + momentum * a)     (nesterov=True)

  Args:
    learning_rate: float or a `keras.optimizers.schedules` schedule.
    momentum: float in [0, 1].
    nesterov: bool, TF1's `use_nesterov`.
    name: the optimizer's name (its variables' path prefix).
    **kwargs: the base optimizer's arguments (`clipnorm`, ...).
  """

  def __init__(self, learning_rate=0.01, momentum=0.9, nesterov=False,
               name="tf1_momentum", **kwargs):
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
      raise ValueError(f"momentum must be a float in [0, 1], got {momentum!r}")
    self.momentum = float(momentum)
    self.nesterov = bool(nesterov)

  def build(self, variables):
    """Creates one zero accumulator per variable."""
    if self.built:
      return
    super().build(variables)
    self.accumulators = self.add_optimizer_variables(variables, "accumulator")

  def update_step(self, gradient, variable, learning_rate):
    """One TF1 momentum update of `variable` with `gradient`."""
    lr = ops.cast(learning_rate, variable.dtype)
    gradient = ops.cast(gradient, variable.dtype)
    momentum = ops.cast(self.momentum, variable.dtype)
    accumulator = self.accumulators[self._get_variable_index(variable)]
    new_accumulator = ops.add(ops.multiply(accumulator, momentum), gradient)
    self.assign(accumulator, new_accumulator)
    if self.nesterov:
      step = ops.add(gradient, ops.multiply(new_accumulator, momentum))
    else:
      step = new_accumulator
    self.assign_sub(variable, ops.multiply(step, lr))

  def get_config(self):
    config = super().get_config()
    config.update({"momentum": self.momentum, "nesterov": self.nesterov})
    return config


@gin.configurable
def build_momentum_optimizer(learning_rate=gin.REQUIRED, momentum=0.9,
                             nesterov=False, momentum_form="keras"):
  """Momentum SGD, 0.9, not Nesterov (the TF1 reference's settings).

  Args:
    learning_rate: float or schedule (`StepDecayWithWarmup` in the configs).
    momentum: float in [0, 1].
    nesterov: bool.
    momentum_form: `'keras'`: Keras `SGD` (`v = m*v - lr*g; w += v`);
      `'tf1'`: `TF1Momentum`, TF1's `MomentumOptimizer`
      (`a = m*a + g; w -= lr*a`), the seed's. Equal at a constant learning
      rate; after each change of it (warmup, decays) they differ.

  Returns:
    a `keras.optimizers.Optimizer` (not built).

  Raises:
    ValueError: an unknown `momentum_form`.
  """
  if momentum_form == "keras":
    return keras.optimizers.SGD(learning_rate=learning_rate,
                                momentum=momentum, nesterov=nesterov)
  if momentum_form == "tf1":
    return TF1Momentum(learning_rate=learning_rate, momentum=momentum,
                       nesterov=nesterov)
  raise ValueError(
      f"build_momentum_optimizer.momentum_form={momentum_form!r} is not one "
      f"of {', '.join(repr(f) for f in MOMENTUM_FORMS)}")


class LearningRateReadout:
  """The learning rate an optimizer applies at a given step, on the host.

  Reads a copy of the optimizer's schedule (from its config), never its
  variables: the JAX engine's compiled step consumes the optimizer's own
  step counter, and reading a TensorFlow variable would wait for the
  device.
  """

  def __init__(self, optimizer):
    lr = optimizer.get_config()["learning_rate"]
    self._schedule = (keras.optimizers.schedules.deserialize(lr)
                      if isinstance(lr, dict) else float(lr))

  def __call__(self, step):
    """The learning rate of step `step` (the optimizer's iteration count)."""
    lr = self._schedule
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
      lr = lr(step)
    return float(ops.convert_to_numpy(lr))
