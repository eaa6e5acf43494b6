"""The JAX engine's compiled train and predict steps (no TensorFlow).

`TrainStep` is the one training step of `KERAS_BACKEND=jax python train.py`
and of `tools/bench/benchmark.py --backend=jax`: a `jax.jit` of the model's
training forward pass and `ShapeMaskModel.compute_losses` (the loss the
TensorFlow loop and `fit` use) inside a `keras.StatelessScope`,
`jax.value_and_grad`, an optional global-norm clip and the Keras
optimizer's `stateless_apply`. Only `model.trainable_variables` get
gradients (frozen kernels stay as they are); the batch-norm moving
statistics come back as new non-trainable values.

The state is three lists of arrays, `(trainable, non_trainable,
optimizer)`, in the order of `model.trainable_variables`,
`model.non_trainable_variables` and `optimizer.variables` (the optimizer's
step counter and momentum slots). The step donates the state it is given and
returns the next one; the Keras variables are only written when `assign` is
called (checkpoints, evaluation, the end of training).

Data parallelism follows a `keras.distribution.DataParallel`: the state is
replicated on its device mesh and every batch is sharded along its first
axis over the mesh (over all processes of a multi-host run). XLA's SPMD
partitioner turns the global-batch computation into per-device work with
all-reduced gradients, so N devices compute what one device computes on the
same global batch. Batch-norm statistics and loss normalisers follow the
model's `batch_groups` (`ShapeMaskModel.set_batch_groups`, set by the
engine from `Experiment.per_replica_batch_size` before the step is traced):
one group = the global batch, G groups = G replicas of the TensorFlow loop,
whatever the number of devices.
"""

import jax
import keras
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
from keras import ops

from official_shapemask.modeling import shapemask_model

# The loss values each step returns.
LOSS_KEYS = shapemask_model.LOSS_KEYS


def data_parallel(devices=None):
  """A `keras.distribution.DataParallel` over `devices` (default: all)."""
  devices = list(devices) if devices is not None else jax.devices()
  return keras.distribution.DataParallel(devices=devices)


def _mesh(distribution):
  return distribution.device_mesh.backend_mesh


def replicated_sharding(distribution):
  return NamedSharding(_mesh(distribution), PartitionSpec())


def batch_sharding(distribution):
  return NamedSharding(_mesh(distribution),
                       PartitionSpec(distribution.batch_dim_name))


def shard_batch(tree, distribution):
  """Process-local numpy batches -> global arrays sharded on axis 0.

  Args:
    tree: nest of arrays `[b, ...]`, this process's rows of the global batch
      (`b = global_batch / num_processes`).
    distribution: the run's `DataParallel`.

  Returns:
    the same nest of `jax.Array`s of leading size `global_batch`.
  """
  sharding = batch_sharding(distribution)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      tree)


def replicate_batch(tree, distribution):
  """A global batch that every process holds whole -> sharded on axis 0."""
  sharding = batch_sharding(distribution)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree_util.tree_map(put, tree)


def global_norm_clip(grads, clip_norm):
  """`grads` scaled by `min(1, clip_norm / global_norm)`."""
  norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in grads))
  scale = ops.minimum(1.0, clip_norm / ops.maximum(norm, 1e-12))
  return [g * ops.cast(scale, g.dtype) for g in grads]


class TrainStep:
  """The compiled training step of a built model and optimizer.

  Args:
    model: a built `ShapeMaskModel`.
    optimizer: a Keras optimizer (built here if needed).
    gradient_clip_norm: float, global-norm clip of the gradients; 0 = none
      (the reference).
    distribution: a `keras.distribution.DataParallel`; default: the one set
      with `keras.distribution.set_distribution`, else all devices.

  Call `step(state, images, labels) -> (state, losses)` with the global
  batch (`shard_batch` / `replicate_batch`): `images [B, S, S, 3]`, the
  training labels of docs/contracts.md; `losses` maps `LOSS_KEYS` to float32
  scalars (device arrays: reading one waits for the step).
  """

  def __init__(self, model, optimizer, gradient_clip_norm=0.0,
               distribution=None):
    self.model = model
    self.optimizer = optimizer
    self.gradient_clip_norm = float(gradient_clip_norm)
    self.distribution = (distribution or keras.distribution.distribution()
                         or data_parallel())
    self.trainable_variables = list(model.trainable_variables)
    self.non_trainable_variables = list(model.non_trainable_variables)
    if not optimizer.built:
      optimizer.build(self.trainable_variables)
    self.optimizer_variables = list(optimizer.variables)
    self._iterations_index = next(
        i for i, v in enumerate(self.optimizer_variables)
        if v is optimizer.iterations)
    self.state_sharding = replicated_sharding(self.distribution)
    self._compiled = jax.jit(
        self._step, donate_argnums=(0,),
        out_shardings=(self.state_sharding, self.state_sharding))

  # ------------------------------------------------------------------ state
  def variables(self):
    """The Keras variables behind the state, as three lists."""
    return (self.trainable_variables, self.non_trainable_variables,
            self.optimizer_variables)

  def state(self):
    """The variables' current values, replicated on the mesh."""
    return jax.device_put(
        tuple([v.value for v in group] for group in self.variables()),
        self.state_sharding)

  def assign(self, state):
    """Writes a state into the Keras variables (model and optimizer)."""
    for group, values in zip(self.variables(), state):
      for variable, value in zip(group, values):
        variable.assign(value)

  def place(self, state):
    """A state (numpy or arrays) replicated on the mesh."""
    return jax.device_put(tuple(list(group) for group in state),
                          self.state_sharding)

  def step_number(self, state):
    """The optimizer's step counter in `state` (waits for the device)."""
    return int(np.asarray(state[2][self._iterations_index]))

  # ------------------------------------------------------------------- step
  def _loss(self, trainable, non_trainable, images, labels):
    model = self.model
    mapping = list(zip(self.trainable_variables, trainable)) + list(
        zip(self.non_trainable_variables, non_trainable))
    with keras.StatelessScope(state_mapping=mapping) as scope:
      outputs = model(model.pack_inputs(images, labels), training=True)
      losses = model.compute_losses(labels, outputs)
    new_non_trainable = []
    for variable, old in zip(self.non_trainable_variables, non_trainable):
      value = scope.get_current_value(variable)
      new_non_trainable.append(old if value is None else value)
    return losses["total_loss"], (losses, new_non_trainable)

  def _step(self, state, images, labels):
    trainable, non_trainable, optimizer_vars = state
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    (_, (losses, non_trainable)), grads = grad_fn(trainable, non_trainable,
                                                  images, labels)
    if self.gradient_clip_norm > 0:
      grads = global_norm_clip(grads, self.gradient_clip_norm)
    trainable, optimizer_vars = self.optimizer.stateless_apply(
        optimizer_vars, grads, trainable)
    losses = {k: ops.cast(losses[k], "float32") for k in LOSS_KEYS}
    return (trainable, non_trainable, optimizer_vars), losses

  def __call__(self, state, images, labels):
    return self._compiled(state, images, labels)

  def lower(self, state, images, labels):
    """`jax.jit(...).lower` of the step (to compile ahead of time)."""
    return self._compiled.lower(state, images, labels)


class PredictStep:
  """The compiled inference step (detections and masks) on a state.

  Call `predict(state, images, image_info)` with a global batch; returns the
  model's inference outputs (docs/contracts.md), replicated so that every
  process can read all rows.
  """

  def __init__(self, model, distribution=None):
    self.model = model
    self.distribution = (distribution or keras.distribution.distribution()
                         or data_parallel())
    self._compiled = jax.jit(
        self._predict, out_shardings=replicated_sharding(self.distribution))

  def _predict(self, trainable, non_trainable, images, image_info):
    outputs, _ = self.model.stateless_call(
        trainable, non_trainable, {"images": images, "image_info": image_info},
        training=False)
    return outputs

  def __call__(self, state, images, image_info):
    return self._compiled(state[0], state[1], images, image_info)

  def lower(self, state, images, image_info):
    return self._compiled.lower(state[0], state[1], images, image_info)
