"""The custom tf.distribute training loop.

One `tf.function` runs `steps_per_loop` steps per call (the seed's
`iterations_per_loop`): each step calls `strategy.run` on the replica step,
which runs the model and the same `compute_losses` that `model.fit` uses,
scales the loss once by `1 / num_replicas_in_sync` (the Keras 3 optimizer
all-reduces gradients with SUM) and applies SGD. Each replica normalises
its own batch (batch norm, loss normalisers), in `model.batch_groups`
groups when `Experiment.per_replica_batch_size` splits it further. The loop stops at the first
step whose mean total loss is NaN or infinite, or above the explosion limit
of `divergence.LossGuard`, and reports that step.
"""

import math
import time

import keras
import numpy as np
import tensorflow as tf

from official_shapemask.training import divergence

# The errors live with the rule (backend-independent); these names stay.
DivergenceError = divergence.DivergenceError
NonFiniteLossError = divergence.NonFiniteLossError
LossExplosionError = divergence.LossExplosionError

LOSS_KEYS = ("total_loss", "model_loss", "cls_loss", "box_loss", "prior_loss",
             "coarse_loss", "fine_loss", "l2_loss")


class TrainLoop:
  """Builds the distributed train function for a model and optimizer.

  Args:
    strategy: a `tf.distribute.Strategy`; model and optimizer were built in
      its scope.
    model: a `ShapeMaskModel`.
    optimizer: a built `keras.optimizers.Optimizer`.
    gradient_clip_norm: float, global-norm clipping; 0 = none (reference).
    jit_compile: bool, XLA-compile the replica step (what a TPU runs).
      Not under MirroredStrategy over logical CPU devices: XLA's CPU
      backend places the compiled step on CPU:0 and cannot read the
      variables of the other logical devices.
    loss_explosion_factor: float, the `divergence.LossGuard` factor; 0
      checks for NaN / inf only.
  """

  def __init__(self, strategy, model, optimizer, gradient_clip_norm=0.0,
               jit_compile=False,
               loss_explosion_factor=divergence.DEFAULT_FACTOR):
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self.gradient_clip_norm = float(gradient_clip_norm)
    self.jit_compile = bool(jit_compile)
    self.guard = divergence.LossGuard(loss_explosion_factor)
    self._loop_fn = None
    # Set by `run` when it stopped early: the 1-based step, its losses,
    # 'non-finite' or 'explosion', and the limit in force.
    self.bad_step = None
    self.bad_losses = None
    self.bad_reason = None
    self.bad_limit = None

  def replica_step(self, images, labels):
    """One step on one replica; returns its float32 losses."""
    model = self.model
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
      outputs = model(model.pack_inputs(images, labels), training=True)
      losses = model.compute_losses(labels, outputs)
      scaled = losses["total_loss"] / tf.cast(
          self.strategy.num_replicas_in_sync, tf.float32)
    grads = tape.gradient(scaled, variables)
    if self.gradient_clip_norm > 0:
      grads, _ = tf.clip_by_global_norm(grads, self.gradient_clip_norm)
    self.optimizer.apply_gradients(zip(grads, variables))
    return {k: losses[k] for k in LOSS_KEYS}

  def _build(self):
    step_fn = self.replica_step
    if self.jit_compile:
      step_fn = tf.function(step_fn, jit_compile=True)
    strategy = self.strategy
    factor = self.guard.factor
    floor = divergence.FLOOR

    @tf.function
    def loop(iterator, num_steps, limit):
      # `limit` < 0: no reference yet; the first step's loss sets it.
      sums = {k: tf.constant(0.0) for k in LOSS_KEYS}
      done = tf.constant(0)
      bad = {k: tf.constant(0.0) for k in LOSS_KEYS}
      healthy = tf.constant(True)
      for _ in tf.range(num_steps):
        images, labels = next(iterator)
        per_replica = strategy.run(step_fn, args=(images, labels))
        step_losses = {
            k: strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica[k],
                               axis=None) for k in LOSS_KEYS
        }
        sums = {k: sums[k] + step_losses[k] for k in LOSS_KEYS}
        done += 1
        total = step_losses["total_loss"]
        limit = tf.where(limit < 0.0, factor * tf.maximum(total, floor),
                         limit)
        if tf.logical_or(tf.logical_not(tf.math.is_finite(total)),
                         total > limit):
          healthy = tf.constant(False)
          bad = step_losses
          break
      n = tf.cast(done, tf.float32)
      return {k: v / n for k, v in sums.items()}, healthy, bad, limit

    return loop

  def run(self, iterator, num_steps):
    """Runs up to `num_steps` steps; returns the mean losses (floats).

    Stops after a step whose total loss is NaN or infinite or above the
    guard's limit; then `bad_step` is that step (`optimizer.iterations`
    after it), `bad_losses` its losses, `bad_reason` 'non-finite' or
    'explosion' and `bad_limit` the limit. All are None otherwise, and the
    mean total loss joins the guard's history.
    """
    if self._loop_fn is None:
      self._loop_fn = self._build()
    limit = self.guard.limit()
    losses, healthy, bad, used_limit = self._loop_fn(
        iterator, tf.constant(num_steps, tf.int32),
        tf.constant(-1.0 if limit is None else limit, tf.float32))
    losses = {k: float(v) for k, v in losses.items()}
    self.bad_step = self.bad_losses = self.bad_reason = self.bad_limit = None
    if bool(healthy):
      self.guard.record(losses["total_loss"])
    else:
      self.bad_step = int(self.optimizer.iterations.numpy())
      self.bad_losses = {k: float(v) for k, v in bad.items()}
      self.bad_reason = ("non-finite" if not math.isfinite(
          self.bad_losses["total_loss"]) else "explosion")
      self.bad_limit = float(used_limit)
    return losses


def format_losses(losses):
  return " ".join(f"{k}={losses[k]:.4f}" for k in LOSS_KEYS if k in losses)


class ProgressLogger:
  """One line per loop: step, losses, LR, images/s and ETA; TensorBoard."""

  def __init__(self, total_steps, global_batch_size, summary_dir=None,
               print_fn=print):
    self.total_steps = int(total_steps)
    self.global_batch_size = int(global_batch_size)
    self.print_fn = print_fn
    self.writer = (tf.summary.create_file_writer(summary_dir)
                   if summary_dir else None)
    self._history = []

  def log(self, step, losses, learning_rate, seconds, num_steps):
    images_per_s = self.global_batch_size * num_steps / max(seconds, 1e-9)
    self._history.append(seconds / max(num_steps, 1))
    per_step = float(np.median(self._history[-20:]))
    eta = per_step * max(self.total_steps - step, 0)
    parts = format_losses(losses)
    self.print_fn(
        f"step {step}/{self.total_steps} {parts} lr={learning_rate:.5g} "
        f"{images_per_s:.2f} img/s eta {_format_seconds(eta)}", flush=True)
    if self.writer is not None:
      with self.writer.as_default(step=step):
        for k, v in losses.items():
          tf.summary.scalar(f"train/{k}", v)
        tf.summary.scalar("train/learning_rate", learning_rate)
        tf.summary.scalar("train/images_per_second", images_per_s)
      self.writer.flush()
    return images_per_s


def current_learning_rate(optimizer):
  lr = optimizer.learning_rate
  if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
    lr = lr(optimizer.iterations)
  return float(keras.ops.convert_to_numpy(lr))


def _format_seconds(seconds):
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Timer:
  """Wall time from strategy start to shutdown (the seed's measure)."""

  def __init__(self):
    self.start = time.time()

  def elapsed(self):
    return time.time() - self.start
