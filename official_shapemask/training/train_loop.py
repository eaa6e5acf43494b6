"""The TensorFlow engine's `tf.distribute` training loop.

One `tf.function` runs up to `steps_per_loop` steps per call (the seed's
`iterations_per_loop`, few host round trips for a TPU): each step calls
`strategy.run` on the replica step, which runs the model and the same
`compute_losses` that `model.fit` uses, scales the loss once by
`1 / num_replicas_in_sync` (the Keras 3 optimizer all-reduces gradients
with SUM) and applies SGD. Each replica normalises its own batch (batch
norm, loss normalisers), in `model.batch_groups` groups when
`Experiment.per_replica_batch_size` splits it further.

The call returns every step's losses (a `TensorArray` per loss); the
controller applies the divergence rule to them (`divergence.LossGuard`).
The loop itself only stops early, after the current step, on a non-finite
total loss, a total loss above the limit it is given, or when `stop` is
set (`request_stop`, from another thread: a SIGTERM), so that no compute is
spent on a run that ends.
"""

import math

import tensorflow as tf

from official_shapemask.modeling import shapemask_model
from official_shapemask.training import divergence

# The errors live with the rule (backend-independent); these names stay.
DivergenceError = divergence.DivergenceError
NonFiniteLossError = divergence.NonFiniteLossError
LossExplosionError = divergence.LossExplosionError

LOSS_KEYS = shapemask_model.LOSS_KEYS


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
    stop_checks: whether the loop reads the stop flag after each step.
      False where processes must stop at the same step (multi-worker): the
      controller agrees on stopping between calls instead.
  """

  def __init__(self, strategy, model, optimizer, gradient_clip_norm=0.0,
               jit_compile=False, stop_checks=True):
    self.strategy = strategy
    self.model = model
    self.optimizer = optimizer
    self.gradient_clip_norm = float(gradient_clip_norm)
    self.jit_compile = bool(jit_compile)
    self.stop_checks = bool(stop_checks)
    # A host variable outside the strategy: set from another thread while
    # the loop runs, read after every step.
    with tf.device("/cpu:0"):
      self.stop = tf.Variable(False, trainable=False, name="stop_requested")
    self._loop_fn = None

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
    stop, stop_checks = self.stop, self.stop_checks

    @tf.function
    def loop(iterator, num_steps, stop_above):
      arrays = {k: tf.TensorArray(tf.float32, size=0, dynamic_size=True,
                                 element_shape=())
                for k in LOSS_KEYS}
      for i in tf.range(num_steps):
        images, labels = next(iterator)
        per_replica = strategy.run(step_fn, args=(images, labels))
        step_losses = {
            k: strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica[k],
                               axis=None) for k in LOSS_KEYS
        }
        arrays = {k: arrays[k].write(i, step_losses[k]) for k in LOSS_KEYS}
        total = step_losses["total_loss"]
        ends = tf.logical_or(tf.logical_not(tf.math.is_finite(total)),
                             total > stop_above)
        if stop_checks:
          ends = tf.logical_or(ends, stop.read_value())
        if ends:
          break
      return {k: arrays[k].stack() for k in LOSS_KEYS}

    return loop

  def run(self, iterator, num_steps, stop_above=math.inf):
    """Runs up to `num_steps` steps; returns each step's losses.

    Args:
      iterator: a distributed iterator of `(images, labels)` batches.
      num_steps: int.
      stop_above: float; the loop ends after a step whose total loss
        exceeds it (or is NaN / inf, or after `stop` was set).

    Returns:
      a list of one dict per step run (`LOSS_KEYS` -> float), in order;
      shorter than `num_steps` when the loop ended early. The step count is
      `optimizer.iterations`.
    """
    if self._loop_fn is None:
      self._loop_fn = self._build()
    arrays = self._loop_fn(iterator, tf.constant(num_steps, tf.int32),
                           tf.constant(stop_above, tf.float32))
    arrays = {k: v.numpy() for k, v in arrays.items()}
    return [{k: float(arrays[k][i]) for k in LOSS_KEYS}
            for i in range(len(arrays["total_loss"]))]

  def request_stop(self):
    """Makes a running (or the next) `run` end after its current step."""
    self.stop.assign(True)
