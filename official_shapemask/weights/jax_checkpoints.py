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

Damaged checkpoints (`restore_newest_readable`) are handled as the
TensorFlow engine does (`checkpoints.restore_newest_readable`): a step whose
files are truncated, overwritten or missing is named in one line (no
TensorStore traceback), moved into `model_dir/unreadable/checkpoints-<step>`
when training (never by an evaluation), and the step before it is tried. A
checkpoint that reads but holds other variables or shapes than the model is
a mismatch, never damage. Errors that say nothing about the files (storage
unreachable, permission refused) are not taken for damage.
"""

import contextlib
import gc
import json
import logging
import os
import re
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from official_shapemask.weights import atomic
from official_shapemask.weights import checkpoints
from official_shapemask.weights import errors
from official_shapemask.weights import late_read_errors
from official_shapemask.weights import paths

CHECKPOINT_SUBDIR = paths.ORBAX_SUBDIR
_STATE = "state"
_META = "variables"
_GROUPS = ("trainable", "non_trainable", "optimizer")


CheckpointMismatchError = errors.CheckpointMismatchError
CheckpointUnreadableError = errors.CheckpointUnreadableError
UNREADABLE_DIR = checkpoints.UNREADABLE_DIR
# TensorStore status codes of a file that is missing, cut short or
# overwritten (`NOT_FOUND: ...`, `DATA_LOSS: ...`, ...).
_DAMAGE_CODES = re.compile(r"(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|"
                           r"FAILED_PRECONDITION|INVALID_ARGUMENT): ")
_TENSORSTORE_SPEC = re.compile(r"\s*\[tensorstore_spec.*$")


def _is_damage(error):
  """Whether a read error says the checkpoint's files are bad.

  A missing file (FileNotFoundError), a JSON item cut short or overwritten
  (JSONDecodeError), TensorStore's file errors, and Orbax's bare
  `Exception` around them. Storage that is unreachable or refuses
  (UNAVAILABLE, PERMISSION_DENIED, ...) is not damage.
  """
  if isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
    return True
  text = str(error).strip()
  return bool(_DAMAGE_CODES.match(text)) or (
      type(error) is Exception and "Encountered error while reading" in text)


def _why(error):
  """A short reason for a read error: TensorStore's code and last clause.

  `NOT_FOUND: Error opening "cast" driver: ... : Error reading ... of local
  file "<path>" [tensorstore_spec=...]` becomes `NOT_FOUND: Error reading
  ... of local file "<path>"`.
  """
  text = (str(error).strip().splitlines() or [""])[0]
  text = _TENSORSTORE_SPEC.sub("", text)
  code = re.match(r"([A-Z_]+): ", text)
  if code:
    return f"{code.group(1)}: {text.rsplit(': ', 1)[-1]}"
  return errors.first_line(error) if not text else (
      f"{type(error).__name__}: {text}")


@contextlib.contextmanager
def _quiet_failed_reads():
  """Keeps TensorStore's per-array tracebacks of a failed read quiet.

  When one array of a checkpoint cannot be read, Orbax's other read
  coroutines end with exceptions nobody awaits; Python prints each (with
  its whole TensorStore spec) through `sys.unraisablehook`, about ten lines
  per array. The error that `restore` raises says it in one line.
  """
  late_read_errors.install()  # Reads still in flight echo a failure later.
  previous = sys.unraisablehook
  sys.unraisablehook = lambda unraisable: None
  try:
    yield
  finally:
    gc.collect()  # Finalises the abandoned coroutines while muted.
    sys.unraisablehook = previous


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


class _Unreadable(Exception):
  """A checkpoint's files cannot be read (internal to this module)."""


def _handlers():
  """The two items of a checkpoint: the state arrays and their names."""
  return {_STATE: ocp.StandardCheckpointHandler(),
          _META: ocp.JsonCheckpointHandler()}


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
    self.model_dir = model_dir
    if read_only and not tf.io.gfile.isdir(self.directory):
      self._manager = None
    else:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_handlers=_handlers())

  def _reload(self):
    if self._manager is None and tf.io.gfile.isdir(self.directory):
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
          item_handlers=_handlers())
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
      CheckpointMismatchError: the checkpoint's variables (names, shapes or
        dtypes) are not the model's (another gin configuration), naming
        the checkpoint.
      CheckpointUnreadableError: its files cannot be read (truncated,
        overwritten, missing), naming the checkpoint and the reason.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"no checkpoint in {self.directory}")
      step = steps[-1]
    if step not in steps:
      raise FileNotFoundError(
          f"no checkpoint {step} in {self.directory} (has {steps})")
    try:
      return self._restore(step), step
    except _Unreadable as e:
      raise CheckpointUnreadableError(
          f"checkpoint {self.path(step)} cannot be read ({e})") from None

  def _read(self, step, what, read):
    """Runs `read()`; a failure is _Unreadable, unless not about the files."""
    try:
      with _quiet_failed_reads():
        return read()
    except Exception as e:  # pylint: disable=broad-exception-caught
      if _is_damage(e):
        raise _Unreadable(_why(e)) from None
      if isinstance(e, (ValueError, OSError)) or type(e) is Exception:
        # Storage unreachable, permission refused, or an error that does
        # not say the files are bad: named, and nothing is moved aside.
        raise CheckpointUnreadableError(
            f"checkpoint {self.path(step)}: cannot read its {what} "
            f"({_why(e)}); nothing was moved") from None
      raise  # A bug, not the checkpoint.

  def _restore(self, step):
    """Restores `step`; raises _Unreadable or CheckpointMismatchError."""
    path = self.path(step)
    names = self._read(step, "variable names", lambda: self._manager.restore(
        step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[
            _META])
    if not isinstance(names, dict):
      raise _Unreadable(f"its {_META} item holds no variable names")
    expected = _variable_names(self.train_step)
    for group in _GROUPS:
      saved, ours = list(names.get(group, [])), expected[group]
      if saved != ours:
        differ = [f"{a} vs {b}" for a, b in zip(saved, ours) if a != b][:3]
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match the model built from the gin "
            f"config: {group} variables {len(saved)} saved vs {len(ours)} in "
            f"the model{'; first differences: ' + ', '.join(differ) if differ else ''}")
    stored = self._read(step, "array metadata",
                        lambda: self._manager.item_metadata(step)[_STATE])
    variables = self.train_step.variables()
    for group, group_vars in zip(_GROUPS, variables):
      for i, (name, v) in enumerate(zip(expected[group], group_vars)):
        try:
          meta = stored[group][i]
          shape, dtype = tuple(meta.shape), np.dtype(meta.dtype)
        except (KeyError, IndexError, TypeError, AttributeError):
          raise _Unreadable(f"its array metadata lacks {group} array "
                            f"{i}") from None
        if shape != tuple(v.shape) or dtype != np.dtype(v.dtype):
          raise CheckpointMismatchError(
              f"checkpoint {path} does not match the model built from the "
              f"gin config: {name} is {shape} {dtype} in the checkpoint, "
              f"{tuple(v.shape)} {np.dtype(v.dtype)} in the model")
    sharding = self.train_step.state_sharding
    abstract = {
        group: [jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                for v in group_vars]
        for group, group_vars in zip(_GROUPS, variables)}
    tree = self._read(step, "arrays", lambda: self._manager.restore(
        step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardRestore(abstract)}))[_STATE])
    return tuple(tree[group] for group in _GROUPS)

  def restore_newest_readable(self, move_unreadable=False, print_fn=print):
    """Restores the newest checkpoint that reads cleanly.

    Steps are tried newest first; one that cannot be read is reported and,
    with `move_unreadable` (training; an evaluation leaves the directory
    alone), moved to `model_dir/unreadable/checkpoints-<step>`
    (`checkpoints-<step>.2`, ... when taken), so the next save and every
    reader see the readable ones only.

    Returns:
      `(state, step)`, or None when there is no checkpoint.

    Raises:
      CheckpointMismatchError: the newest readable one does not match the
        model (named).
      CheckpointUnreadableError: none can be read (each named), or a read
        failed for a reason that is not damage (storage unreachable,
        permission refused).
    """
    steps = self.all_steps()
    if not steps:
      return None
    unreadable, restored = [], None
    for step in reversed(steps):
      try:
        restored = (self._restore(step), step)
      except _Unreadable as e:
        unreadable.append((step, str(e)))
        continue
      break
    if restored is None:
      details = "; ".join(f"{self.path(s)} ({why})" for s, why in unreadable)
      raise CheckpointUnreadableError(
          f"no checkpoint in {self.directory} can be read: {details}. Move "
          "them away to start from scratch, or restore them from a copy")
    for step, why in unreadable:
      where = ""
      if move_unreadable:
        where = f" moved to {self._move_unreadable(step)};"
      if print_fn is not None:
        print_fn(f"Checkpoint {self.path(step)} cannot be read ({why});"
                 f"{where} using {self.path(restored[1])} instead")
    if move_unreadable and unreadable:
      self._reload()
    return restored

  def _move_unreadable(self, step):
    """Moves step `step` out of Orbax's sight; returns where it went."""
    target = os.path.join(self.model_dir, UNREADABLE_DIR)
    tf.io.gfile.makedirs(target)
    name = f"{CHECKPOINT_SUBDIR}-{step}"
    moved, n = os.path.join(target, name), 1
    while tf.io.gfile.exists(moved):
      n += 1
      moved = os.path.join(target, f"{name}.{n}")
    tf.io.gfile.rename(self.path(step), moved)
    return moved

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
