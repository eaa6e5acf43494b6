"""Checkpoints of the JAX engine: Orbax, asynchronous, multi-host safe.

A checkpoint is `model_dir/checkpoints/<step>/` written by Orbax's
`CheckpointManager`: the three state lists of `jax_step.TrainStep`
(trainable weights, non-trainable state such as batch-norm moving
statistics and frozen kernels, the optimizer's step counter and momentum
slots) and a JSON item naming every variable (`variable.path`, in order).
Restoring gives back exactly the saved state, so a resumed run continues at
the saved step with the same learning rate, momentum and statistics.

Saving is asynchronous: `save` returns once the arrays are copied off the
devices, and the files are written by a background thread; Orbax writes into
a temporary folder and renames it when complete, so a process killed
mid-save leaves the previous checkpoints intact (the temporary folder is
removed at the next start). Every process of a multi-host run calls `save`
and `restore`; Orbax writes each replicated array once.

The TensorFlow tools (`tools/export_saved_model.py`, `--mode=eval` under the
TensorFlow backend) read Keras weights files: `write_keras_weights` writes
the model's weights as `model_dir/shapemask-<step>.weights.h5`, which the
engine does at the end of every training run.
"""

import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from official_shapemask.weights import atomic
from official_shapemask.weights import errors

CHECKPOINT_SUBDIR = "checkpoints"
_STATE = "state"
_META = "variables"
_GROUPS = ("trainable", "non_trainable", "optimizer")


class _QuietOrbax(logging.Filter):
  """Drops Orbax's INFO lines (a dozen per save); warnings and errors stay."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or (
        f"{os.sep}orbax{os.sep}" not in record.pathname)


def quiet_orbax_logs():
  """Keeps Orbax's per-save INFO log lines out of the progress output."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
    logger.addFilter(_QuietOrbax())


def checkpoint_dir(model_dir):
  return os.path.join(model_dir, CHECKPOINT_SUBDIR)


def has_checkpoint(model_dir):
  """Whether `model_dir/checkpoints` holds a finished (numbered) step.

  Orbax writes a step into a temporary folder and renames it to its number
  when it is complete, so a number means a finished checkpoint.
  """
  directory = checkpoint_dir(model_dir)
  if not tf.io.gfile.isdir(directory):
    return False
  return any(name.rstrip("/").isdigit()
             for name in tf.io.gfile.listdir(directory))


def _variable_names(train_step):
  return {group: [v.path for v in variables]
          for group, variables in zip(_GROUPS, train_step.variables())}


class CheckpointManager:
  """Saves and restores `TrainStep` states under `model_dir/checkpoints`.

  Args:
    model_dir: the run's model directory (local or a `gs://` path).
    train_step: the run's `jax_step.TrainStep` (names, shapes, shardings).
    max_to_keep: checkpoints kept (older ones are deleted).
    read_only: never write (evaluation).
  """

  def __init__(self, model_dir, train_step, max_to_keep=5, read_only=False):
    quiet_orbax_logs()
    self.directory = checkpoint_dir(model_dir)
    self.train_step = train_step
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=True)
    if read_only and not tf.io.gfile.isdir(self.directory):
      self._manager = None
    else:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=(_STATE, _META))

  def _reload(self):
    if self._manager is None and tf.io.gfile.isdir(self.directory):
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
          item_names=(_STATE, _META))
    elif self._manager is not None:
      self._manager.reload()

  def all_steps(self):
    self._reload()
    return sorted(self._manager.all_steps()) if self._manager else []

  def latest_step(self):
    steps = self.all_steps()
    return steps[-1] if steps else None

  def path(self, step):
    return os.path.join(self.directory, str(step))

  @property
  def latest_checkpoint(self):
    """Path of the newest finished checkpoint, or None."""
    step = self.latest_step()
    return None if step is None else self.path(step)

  def save(self, step, state):
    """Starts saving `state` as checkpoint `step` (returns before the write).

    The arrays are copied off the devices before this returns, so the state
    may be donated to the next training step right away.
    """
    if step in self._manager.all_steps():
      return False
    tree = dict(zip(_GROUPS, (list(group) for group in state)))
    return self._manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(tree),
        _META: ocp.args.JsonSave(_variable_names(self.train_step)),
    }), force=True)

  def restore(self, step=None):
    """The state saved at `step` (default: the latest), on the mesh.

    Raises:
      FileNotFoundError: no checkpoint (at that step).
      errors.CheckpointMismatchError: the checkpoint's variables are not the
        model's (another gin configuration), naming the checkpoint.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      step = steps[-1]
    if step not in steps:
      raise FileNotFoundError(
          f"no checkpoint {step} in {self.directory} (has {steps})")
    path = self.path(step)
    names = self._manager.restore(step, args=ocp.args.Composite(**{
        _META: ocp.args.JsonRestore()}))[_META]
    expected = _variable_names(self.train_step)
    for group in _GROUPS:
      saved, ours = list(names.get(group, [])), expected[group]
      if saved != ours:
        differ = [f"{a} vs {b}" for a, b in zip(saved, ours) if a != b][:3]
        raise errors.CheckpointMismatchError(
            f"checkpoint {path} does not match the model built from the gin "
            f"config: {group} variables {len(saved)} saved vs {len(ours)} in "
            f"the model{'; first differences: ' + ', '.join(differ) if differ else ''}")
    sharding = self.train_step.state_sharding
    abstract = {
        group: [jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                for v in variables]
        for group, variables in zip(_GROUPS, self.train_step.variables())}
    try:
      tree = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract)}))[_STATE]
    except ValueError as e:
      raise errors.CheckpointMismatchError(
          f"checkpoint {path} does not match the model built from the gin "
          f"config: {str(e).splitlines()[0]}") from e
    return tuple(tree[group] for group in _GROUPS), step

  def wait(self):
    """Blocks until every started save is written."""
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self):
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None


def write_keras_weights(model, path):
  """Writes `model.save_weights` to `path` (local or gs://) atomically.

  Process 0 of a multi-host run writes; the others return None.
  """
  if jax.process_index() != 0:
    return None
  return atomic.write_file(path, model.save_weights)


def snapshot(state):
  """Host copies (numpy) of a state's arrays."""
  return tuple([np.asarray(x) for x in group] for group in state)
