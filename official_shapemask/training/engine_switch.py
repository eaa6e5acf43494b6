"""Switching engines on one model_dir: the other engine's newer step.

A run trained by one engine and continued by the other is one model. When
the newest step of a model directory is the other engine's, the engines
resume from it and `--mode=eval` evaluates it: `weights/any_engine` converts
it through backend-neutral files (a subprocess of the engine that wrote it)
and loads them here (weights, batch-norm statistics, optimizer slots and
step). The next save is in this engine's format; the other's checkpoints
stay where they are.

The subprocess builds the model and optimizer of the run that wrote the
step from `model_dir/config.gin` (the operative config of the run that made
the directory's newest save, `operative_config`), or from this process's
gin config when the directory has none.

Called by the controller (`training/controller.py`): when a run resumes
(`resume`, after the engine's own restore; the engine then takes the Keras
variables as its state, `Engine.adopt_keras_state`) and when an evaluation
restores the newest step (`restore_for_eval`); and by
`serving/export.restore_model` (`load`).
"""

import os
import tempfile

import gin
import tensorflow as tf

from official_shapemask.weights import any_engine
from official_shapemask.weights import errors
from official_shapemask.weights import paths

# Runs in the converter subprocess: `function(gin file) -> (model, optimizer)`.
BUILDER = "official_shapemask.training.engine_models:build_model_and_optimizer"
OTHER = {any_engine.TENSORFLOW: any_engine.JAX,
         any_engine.JAX: any_engine.TENSORFLOW}
# `build_momentum_optimizer.momentum_form` of each optimizer class.
_MOMENTUM_FORMS = {"SGD": "keras", "TF1Momentum": "tf1"}


def _source_config(model_dir):
  """The gin config of the run that wrote the directory's newest step."""
  path = os.path.join(model_dir, "config.gin")
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      return f.read()
  return gin.config_str()


def _one_line(error, ref, instead):
  """The CheckpointError of a failed conversion or load: what to do."""
  model_dir = any_engine.model_dir_of(ref)
  message = str(error)
  kind = type(error)
  if isinstance(error, any_engine.OptimizerMismatchError):
    form = _MOMENTUM_FORMS.get(error.saved_class)
    setting = (f"build_momentum_optimizer.momentum_form={form!r}" if form
               else f"the optimizer {error.saved_class}")
    if error.saved_class == error.our_class:
      setting = ("the frozen layers of that run (build_shapemask_model."
                 "freeze_early_convs, RESNET_CHECKPOINT)")
    message += (f". Set {setting} as in that run (its config: "
                f"{os.path.join(model_dir, 'config.gin')}), or train in a "
                "new --model_dir")
  elif isinstance(error, any_engine.EngineUnavailableError):
    message += f", or {instead}"
  elif isinstance(error, errors.CheckpointUnreadableError):
    message += (f"; move it out of {model_dir} (e.g. into "
                f"{os.path.join(model_dir, 'unreadable')}/) to use the step "
                "before it")
  # The same kind (unreadable, mismatch, ...), so callers can tell them.
  if kind is any_engine.OptimizerMismatchError:
    return errors.CheckpointMismatchError(message)
  return kind(message)


def _convert_and_load(ref, model, optimizer, instead):
  with tempfile.TemporaryDirectory(prefix="shapemask-switch-") as scratch:
    try:
      any_engine.convert(ref, _source_config(any_engine.model_dir_of(ref)),
                         scratch, BUILDER)
      return any_engine.load(scratch, model, optimizer)
    except errors.CheckpointError as e:
      raise _one_line(e, ref, instead) from None


def _moving_aside(ref, own):
  """What to do instead of reading `ref`, for the not-installed message."""
  folder = (os.path.join(any_engine.model_dir_of(ref), paths.ORBAX_SUBDIR)
            if ref.format == any_engine.ORBAX else f"{ref.path}.*")
  start = (f"from step {own.step}" if own is not None else "from scratch")
  return (f"move {folder} out of {any_engine.model_dir_of(ref)} to start "
          f"{start}")


def resume(model, optimizer, model_dir, engine, own_step, print_fn=print):
  """Resumes from the other engine's step when it is newer than ours.

  Args:
    model, optimizer: this engine's built model and optimizer.
    model_dir: the run's model directory.
    engine: this engine, `tensorflow` or `jax`.
    own_step: the step this engine restored from its own checkpoints, or
      None.
    print_fn: where the `Resuming step N from ...` line goes.

  Returns:
    the step resumed from, or None (nothing newer of the other engine).

  Raises:
    errors.CheckpointError: one line: the other engine's step cannot
      be read or carried over (its optimizer state does not fit this run's
      optimizer), with what to do.
  """
  other = any_engine.newest_step(model_dir, engine=OTHER[engine])
  if other is None or (own_step is not None and own_step >= other.step):
    return None
  own = any_engine.newest_step(model_dir, engine=engine)
  step = _convert_and_load(other, model, optimizer, _moving_aside(other, own))
  print_fn(f"Resuming step {step} from {other.describe()}")
  return step


def restore_for_eval(model, optimizer, model_dir, engine, print_fn=print):
  """Loads the other engine's step for evaluation when it is the newest.

  The model's weights are loaded and the optimizer's step counter set (the
  step evaluations report); its slots are not needed.

  Returns:
    the `StepRef` evaluated, or None (this engine's step is the newest).

  Raises:
    errors.CheckpointError: one line, as `resume`.
  """
  own = any_engine.newest_step(model_dir, engine=engine)
  other = any_engine.newest_step(model_dir, engine=OTHER[engine])
  if other is None or (own is not None and own.step >= other.step):
    return None
  step = _convert_and_load(other, model, None, _moving_aside(other, own))
  if optimizer is not None:
    optimizer.iterations.assign(step)
  print_fn(f"Evaluating step {step} from {other.describe()}")
  return other


def load(ref, model, optimizer=None, instead="use another checkpoint"):
  """Loads any engine's step `ref` through the neutral files.

  Args:
    ref: an `any_engine.StepRef` of a TensorFlow or Orbax checkpoint.
    model: a built model (either backend).
    optimizer: its built optimizer, or None (the model's weights only).
    instead: what the user can do when the engine that reads `ref` is not
      installed (ends that message).

  Returns:
    the step.

  Raises:
    errors.CheckpointError: one line, as `resume`.
  """
  return _convert_and_load(ref, model, optimizer, instead)
