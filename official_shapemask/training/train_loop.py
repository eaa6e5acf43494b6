"""The custom tf.distribute training loop.

One `tf.function` runs `steps_per_loop` steps per call (the seed's
`iterations_per_loop`): each step calls `strategy.run` on the replica step,
which runs the model and the same `compute_losses` that `model.fit` uses,
scales the loss once by `1 / num_replicas_in_sync` (the Keras 3 optimizer
all-reduces gradients with SUM) and applies SGD. The loop stops at the first
step whose mean total loss is NaN or infinite and reports that step.
"""

import time

import keras
import numpy as np
import tensorflow as tf

LOSS_KEYS = ("total_loss", "model_loss", "cls_loss", "box_loss", "prior_loss",
             "coarse_loss", "fine_loss", "l2_loss")


class NonFiniteLossError(FloatingPointError):
  """Raised when a loss becomes NaN or infinite; names the step."""


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
  """

  def __init__(self, strategy, model, optimizer, gradient_clip_norm=0.0,
               jit_compile=False):
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self.gradient_clip_norm = float(gradient_clip_norm)
    self.jit_compile = bool(jit_compile)
    self._loop_fn = None
    self.nonfinite_step = None  # Set by `run`: 1-based step of a bad loss.
    self.nonfinite_losses = None

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

    @tf.function
    def loop(iterator, num_steps):
      sums = {k: tf.constant(0.0) for k in LOSS_KEYS}
      done = tf.constant(0)
      bad = {k: tf.constant(0.0) for k in LOSS_KEYS}
      finite = tf.constant(True)
      for _ in tf.range(num_steps):
        images, labels = next(iterator)
        per_replica = strategy.run(step_fn, args=(images, labels))
        step_losses = {
            k: strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica[k],
                               axis=None) for k in LOSS_KEYS
        }
        sums = {k: sums[k] + step_losses[k] for k in LOSS_KEYS}
        done += 1
        if not tf.math.is_finite(step_losses["total_loss"]):
          finite = tf.constant(False)
          bad = step_losses
          break
      n = tf.cast(done, tf.float32)
      return {k: v / n for k, v in sums.items()}, finite, bad

    return loop

  def run(self, iterator, num_steps):
    """Runs up to `num_steps` steps; returns the mean losses (floats).

    Stops after a step whose total loss is NaN or infinite; then
    `nonfinite_step` is that step (`optimizer.iterations` after it) and
    `nonfinite_losses` its losses. Both are None otherwise.
    """
    if self._loop_fn is None:
      self._loop_fn = self._build()
    losses, finite, bad = self._loop_fn(iterator,
                                        tf.constant(num_steps, tf.int32))
    self.nonfinite_step = self.nonfinite_losses = None
    if not bool(finite):
      self.nonfinite_step = int(self.optimizer.iterations.numpy())
      self.nonfinite_losses = {k: float(v) for k, v in bad.items()}
    return {k: float(v) for k, v in losses.items()}


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
