"""Learning-rate schedules of the ShapeMask reference, as Keras 3 schedules.

Both schedules start with a linear warmup: at step 0 the rate is
``warmup_learning_rate`` and it rises linearly to ``init_learning_rate`` at
``warmup_steps``. After the warmup:

* ``StepDecayWithWarmup`` keeps ``init_learning_rate`` and switches to the
  ABSOLUTE value ``learning_rate_levels[i]`` from step
  ``learning_rate_steps[i]`` on (reference §8: the levels are values, not
  multipliers). The seed's batch-64 run: 0.0067 -> 0.08 over 500 steps, 0.08
  until 30,000, 0.008 from 30,000, 0.0008 from 40,000.
* ``CosineWithWarmup`` follows a half cosine from ``init_learning_rate`` at
  ``warmup_steps`` to ``alpha * init_learning_rate`` at ``total_steps`` and
  stays there afterwards.

The schedules use ``keras.ops`` only, so they run under the TensorFlow and the
JAX backends, inside ``tf.function`` / XLA, and as the ``learning_rate`` of any
Keras optimizer. They serialize (``get_config``; registered with Keras under
the package ``official_shapemask``).

gin: both classes are registered with gin under their class names (module
``schedules``), without changing the classes, e.g.::

    StepDecayWithWarmup.warmup_learning_rate = 0.0067
    StepDecayWithWarmup.warmup_steps = 500
    StepDecayWithWarmup.init_learning_rate = 0.08
    StepDecayWithWarmup.learning_rate_levels = [0.008, 0.0008]
    StepDecayWithWarmup.learning_rate_steps = [30000, 40000]
    build_optimizer.learning_rate = @StepDecayWithWarmup()

or through the builder, which applies the class bindings above::

    build_learning_rate_schedule.kind = 'cosine'
    CosineWithWarmup.total_steps = 45000
"""

import math

import gin
import keras
from keras import ops

_PACKAGE = 'official_shapemask'


def _check_rate(name, value, schedule):
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{schedule}: {name} must be a number, got {value!r}.')
  if not math.isfinite(value) or value < 0.0:
    raise ValueError(
        f'{schedule}: {name} must be finite and >= 0, got {value!r}.')
  return value


def _check_step(name, value, schedule, minimum=0):
  if isinstance(value, bool):
    raise ValueError(f'{schedule}: {name} must be an integer, got {value!r}.')
  try:
    as_float = float(value)
  except (TypeError, ValueError):
    raise ValueError(
        f'{schedule}: {name} must be an integer, got {value!r}.')
  if not math.isfinite(as_float) or as_float != int(as_float):
    raise ValueError(
        f'{schedule}: {name} must be an integer, got {value!r}.')
  value = int(as_float)
  if value < minimum:
    raise ValueError(
        f'{schedule}: {name} must be >= {minimum}, got {value}.')
  return value


def _warmup(step, warmup_learning_rate, init_learning_rate, warmup_steps):
  """Linear warmup value at float32 ``step`` (valid for step < warmup)."""
  fraction = step / float(max(warmup_steps, 1))
  return warmup_learning_rate + fraction * (init_learning_rate -
                                            warmup_learning_rate)


@gin.register(module='schedules')
@keras.saving.register_keras_serializable(package=_PACKAGE)
class StepDecayWithWarmup(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup, then piecewise-constant ABSOLUTE learning-rate levels.

  ``lr(step)`` =
    ``warmup_learning_rate + step / warmup_steps * (init - warmup)`` for
    ``step < warmup_steps``;
    ``learning_rate_levels[i]`` for
    ``learning_rate_steps[i] <= step < learning_rate_steps[i + 1]``;
    ``init_learning_rate`` otherwise.

  Args:
    warmup_learning_rate: float >= 0, rate at step 0. Default 0.0067.
    warmup_steps: int >= 0, length of the linear warmup; 0 disables it.
      Default 500.
    init_learning_rate: float >= 0, rate at the end of the warmup. Default
      0.08.
    learning_rate_levels: sequence of float >= 0, absolute rates (not
      multipliers) used from the matching ``learning_rate_steps`` on. Default
      (0.008, 0.0008).
    learning_rate_steps: sequence of int, strictly increasing, each greater
      than ``warmup_steps``, same length as ``learning_rate_levels``. Default
      (30000, 40000).

  Raises:
    ValueError: naming the argument, for a negative or non-finite rate, a
      non-integer or negative step, levels and steps of different lengths,
      steps not strictly increasing or not after the warmup.

  Call: ``schedule(step)`` with a scalar integer (or float) step tensor
  returns a float32 scalar.
  """

  def __init__(self,
               warmup_learning_rate=0.0067,
               warmup_steps=500,
               init_learning_rate=0.08,
               learning_rate_levels=(0.008, 0.0008),
               learning_rate_steps=(30000, 40000)):
    name = type(self).__name__
    self.warmup_learning_rate = _check_rate('warmup_learning_rate',
                                            warmup_learning_rate, name)
    self.warmup_steps = _check_step('warmup_steps', warmup_steps, name)
    self.init_learning_rate = _check_rate('init_learning_rate',
                                          init_learning_rate, name)
    if isinstance(learning_rate_levels, (str, bytes)) or isinstance(
        learning_rate_steps, (str, bytes)):
      raise ValueError(f'{name}: learning_rate_levels and learning_rate_steps '
                       'must be sequences of numbers.')
    try:
      levels = list(learning_rate_levels)
      steps = list(learning_rate_steps)
    except TypeError:
      raise ValueError(
          f'{name}: learning_rate_levels and learning_rate_steps must be '
          f'sequences, got {learning_rate_levels!r} and '
          f'{learning_rate_steps!r}.')
    if len(levels) != len(steps):
      raise ValueError(
          f'{name}: learning_rate_levels has {len(levels)} values '
          f'{levels} but learning_rate_steps has {len(steps)} values '
          f'{steps}; they must have the same length.')
    self.learning_rate_levels = tuple(
        _check_rate(f'learning_rate_levels[{i}]', v, name)
        for i, v in enumerate(levels))
    self.learning_rate_steps = tuple(
        _check_step(f'learning_rate_steps[{i}]', v, name)
        for i, v in enumerate(steps))
    previous = self.warmup_steps
    for i, step in enumerate(self.learning_rate_steps):
      if step <= previous:
        what = ('warmup_steps' if i == 0 else
                f'learning_rate_steps[{i - 1}]')
        raise ValueError(
            f'{name}: learning_rate_steps must be strictly increasing and '
            f'greater than warmup_steps; learning_rate_steps[{i}] = {step} '
            f'is not greater than {what} = {previous}.')
      previous = step

  def __call__(self, step):
    step = ops.cast(step, 'float32')
    learning_rate = ops.where(
        step < float(self.warmup_steps),
        _warmup(step, self.warmup_learning_rate, self.init_learning_rate,
                self.warmup_steps),
        ops.full_like(step, self.init_learning_rate))
    for level, start in zip(self.learning_rate_levels,
                            self.learning_rate_steps):
      learning_rate = ops.where(step >= float(start),
                                ops.full_like(step, level), learning_rate)
    return learning_rate

  def get_config(self):
    return {
        'warmup_learning_rate': self.warmup_learning_rate,
        'warmup_steps': self.warmup_steps,
        'init_learning_rate': self.init_learning_rate,
        'learning_rate_levels': list(self.learning_rate_levels),
        'learning_rate_steps': list(self.learning_rate_steps),
    }


@gin.register(module='schedules')
@keras.saving.register_keras_serializable(package=_PACKAGE)
class CosineWithWarmup(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warmup, then cosine decay to ``alpha * init_learning_rate``.

  For ``warmup_steps <= step``, with ``t = min(step, total_steps)``::

    progress = (t - warmup_steps) / (total_steps - warmup_steps)
    lr = init_learning_rate * ((1 - alpha) * 0.5 * (1 + cos(pi * progress))
                               + alpha)

  and the linear warmup of ``StepDecayWithWarmup`` before ``warmup_steps``.

  Args:
    warmup_learning_rate: float >= 0, rate at step 0.
    warmup_steps: int >= 0, length of the linear warmup; 0 disables it.
    init_learning_rate: float >= 0, rate at the end of the warmup.
    total_steps: int > warmup_steps, step at which the decay ends.
    alpha: float in [0, 1], final rate as a fraction of
      ``init_learning_rate``. Default 0.0.

  Raises:
    ValueError: naming the argument, for a negative or non-finite rate,
      a non-integer step, ``total_steps <= warmup_steps`` or ``alpha``
      outside [0, 1].
  """

  def __init__(self,
               warmup_learning_rate,
               warmup_steps,
               init_learning_rate,
               total_steps,
               alpha=0.0):
    name = type(self).__name__
    self.warmup_learning_rate = _check_rate('warmup_learning_rate',
                                            warmup_learning_rate, name)
    self.warmup_steps = _check_step('warmup_steps', warmup_steps, name)
    self.init_learning_rate = _check_rate('init_learning_rate',
                                          init_learning_rate, name)
    self.total_steps = _check_step('total_steps', total_steps, name)
    if self.total_steps <= self.warmup_steps:
      raise ValueError(
          f'{name}: total_steps = {self.total_steps} must be greater than '
          f'warmup_steps = {self.warmup_steps}.')
    alpha = _check_rate('alpha', alpha, name)
    if alpha > 1.0:
      raise ValueError(f'{name}: alpha must be in [0, 1], got {alpha}.')
    self.alpha = alpha

  def __call__(self, step):
    step = ops.cast(step, 'float32')
    decay_steps = float(self.total_steps - self.warmup_steps)
    progress = ops.clip(
        (step - float(self.warmup_steps)) / decay_steps, 0.0, 1.0)
    cosine = 0.5 * (1.0 + ops.cos(math.pi * progress))
    decayed = self.init_learning_rate * (
        (1.0 - self.alpha) * cosine + self.alpha)
    return ops.where(
        step < float(self.warmup_steps),
        _warmup(step, self.warmup_learning_rate, self.init_learning_rate,
                self.warmup_steps), decayed)

  def get_config(self):
    return {
        'warmup_learning_rate': self.warmup_learning_rate,
        'warmup_steps': self.warmup_steps,
        'init_learning_rate': self.init_learning_rate,
        'total_steps': self.total_steps,
        'alpha': self.alpha,
    }


_KINDS = {'step': StepDecayWithWarmup, 'cosine': CosineWithWarmup}


@gin.configurable
def build_learning_rate_schedule(kind='step', **kwargs):
  """Builds a schedule by kind, honouring the gin bindings of its class.

  Args:
    kind: ``'step'`` (``StepDecayWithWarmup``) or ``'cosine'``
      (``CosineWithWarmup``). Default ``'step'``.
    **kwargs: constructor arguments; they override gin bindings such as
      ``StepDecayWithWarmup.init_learning_rate = 0.08``.

  Returns:
    A ``keras.optimizers.schedules.LearningRateSchedule``.

  Raises:
    ValueError: for an unknown ``kind`` (the valid kinds are listed) or bad
      schedule arguments.
  """
  if kind not in _KINDS:
    raise ValueError(
        f'build_learning_rate_schedule: unknown kind {kind!r}; expected one '
        f'of {sorted(_KINDS)}.')
  # The gin-wrapped constructor applies `<ClassName>.<arg>` bindings and
  # returns an instance of the plain (registered) class.
  return gin.get_configurable(_KINDS[kind])(**kwargs)
