"""When a training run has diverged: NaN / inf, or a finite loss explosion.

Backend-independent (Python floats), so the TensorFlow loop and any other
engine apply the same rule.

The rule. A step's total loss is an explosion when it exceeds

    limit = factor * max(reference, FLOOR)

where `reference` is the lowest value the running median of the last
`WINDOW` reported losses (one per host loop: the mean over its steps) has
taken in this process; before the first report it is the total loss of the
first step this process trains. The reference never rises, so a loss that
climbs slowly is measured against the best level the run reached, not
against its own recent past. `FLOOR` keeps a nearly converged run (total
loss far below one) from stopping on one hard batch. With the default
`factor` of 20 the limit sits far above healthy noise: on the tiny CPU
config (coco_tiny160, batch 4, one loss per step) the largest step loss over
120 steps, warmup included, was 1.28x the reference, and the whole demo
(gin/demo.gin, 2,500 steps, bfloat16) trained to the end with the factor set
to 5; a learning rate of 1e4 takes the loss past 1e6 within a few steps.

A run stops at the first step that is non-finite or an explosion. The loop
saves a checkpoint only at the end of a host loop in which no step did
either, so every checkpoint comes from before the explosion and
`max_checkpoints` rotation never removes one from before it.
"""

import math

import numpy as np

DEFAULT_FACTOR = 20.0
WINDOW = 10
FLOOR = 1.0


class DivergenceError(FloatingPointError):
  """Training stopped because the loss diverged; the message names the step."""


class NonFiniteLossError(DivergenceError):
  """A loss (or, at a checkpoint, a weight) became NaN or infinite."""


class LossExplosionError(DivergenceError):
  """A finite total loss exceeded the explosion limit (see the module)."""


class LossGuard:
  """The explosion limit of one process's training (see the module).

  Args:
    factor: float; the limit is `factor * max(reference, FLOOR)`. 0 (or
      less) disables the check (NaN / inf still stop a run).
    window: int, reported losses in the running median.
  """

  def __init__(self, factor=DEFAULT_FACTOR, window=WINDOW):
    self.factor = float(factor)
    self.window = int(window)
    if self.window < 1:
      raise ValueError(f"LossGuard: window must be >= 1, got {window}")
    self.reference = None
    self._recent = []

  @property
  def enabled(self):
    return self.factor > 0

  def limit(self):
    """The current limit: inf when disabled, None before any reference."""
    if not self.enabled:
      return math.inf
    if self.reference is None:
      return None
    return self.factor * max(self.reference, FLOOR)

  def limit_from_first(self, first_total_loss):
    """The limit for a run whose reference is its first step's loss."""
    return self.factor * max(float(first_total_loss), FLOOR)

  def record(self, total_loss):
    """Adds one reported (finite, not exploded) loss to the history."""
    total_loss = float(total_loss)
    if not math.isfinite(total_loss):
      return
    self._recent = (self._recent + [total_loss])[-self.window:]
    median = float(np.median(self._recent))
    if self.reference is None or median < self.reference:
      self.reference = median

  def check(self, total_loss, first=None):
    """'non-finite', 'explosion' or None for one step's total loss.

    Args:
      total_loss: float, the step's total loss.
      first: the first step's loss of this process when no reference
        exists yet (engines that check on the host pass it).
    """
    total_loss = float(total_loss)
    if not math.isfinite(total_loss):
      return "non-finite"
    limit = self.limit()
    if limit is None:
      limit = self.limit_from_first(total_loss if first is None else first)
    return "explosion" if total_loss > limit else None

  def describe(self, total_loss, limit):
    """One sentence: the loss, the limit and how the limit was formed."""
    reference = ("the first step's loss" if self.reference is None else
                 f"the lowest running median {self.reference:.4g}")
    return (f"total loss {total_loss:.4g} exceeds {limit:.4g} = "
            f"{self.factor:g} x max({reference}, {FLOOR:g})")


def stop_error(guard, reason, step, total_loss, losses_text, limit,
               latest_checkpoint):
  """The error that stops a diverged run (the same text for every engine).

  Args:
    guard: the run's `LossGuard`.
    reason: 'non-finite' or 'explosion' (`LossGuard.check`).
    step: int, the step whose loss diverged.
    total_loss: float, that step's total loss.
    losses_text: str, all of that step's losses, formatted.
    limit: float, the explosion limit that step was checked against.
    latest_checkpoint: the newest checkpoint saved before it, or None.

  Returns:
    a `NonFiniteLossError` or `LossExplosionError` naming the step and the
    checkpoint kept.
  """
  kept = (f"the last good checkpoint is kept: {latest_checkpoint}"
          if latest_checkpoint else "no checkpoint was saved before it")
  if reason == "non-finite":
    return NonFiniteLossError(
        f"non-finite loss at step {step} ({losses_text}); training stopped, "
        f"{kept}")
  return LossExplosionError(
      f"loss explosion at step {step}: {guard.describe(total_loss, limit)} "
      f"({losses_text}); training stopped, {kept} (nothing is saved once a "
      "step explodes). Lower the learning rate, or change "
      "Experiment.loss_explosion_factor (0 = off)")
