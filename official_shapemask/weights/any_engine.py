"""One model, two checkpoint formats: the newest step of either engine.

A model directory may hold the TensorFlow engine's checkpoints
(`ckpt-<step>` prefixes listed in its `checkpoint` state file), the JAX
engine's (Orbax folders `checkpoints/<step>/`) and the weights file a JAX
run writes when it reaches its total steps (`shapemask-<step>.weights.h5`).
This module finds the newest step among them (`newest_step`) and carries a
step of one engine over to the other through a backend-neutral set of
files:

| file | holds |
| --- | --- |
| `model.weights.h5` | every model variable (weights, batch-norm moving statistics, frozen kernels) in the Keras weights layout, which loads on every backend |
| `optimizer.npz` | every optimizer variable (step counter, momentum slots, ...) keyed by its Keras variable path (`sgd/iteration`, `sgd/shapemask_res_net_stem_conv_kernel_momentum`, ...); the paths are the same on both backends |
| `state.json` | the step; the source engine, path and format; the model's trainable variable paths; the optimizer's class, plain config, variable paths in order and for each a key that does not depend on the process (`iteration`, `slot/<i>/momentum` for the slot of the i-th trainable variable) |

Optimizer variables are matched by those keys: a second model built in one
process has other paths (`res_net_1/...`, `sgd_1/...`), the same keys.

`convert(ref, gin_config_text, out_dir, builder)` writes them from a
checkpoint: a subprocess with the Keras backend of the engine that wrote it
(`KERAS_BACKEND=tensorflow` for a TensorFlow checkpoint, `jax` for an Orbax
one, on the CPU, with this checkout on `PYTHONPATH`) builds the model and
optimizer with `builder` from the gin config and restores the checkpoint
exactly as that engine resumes. `builder` is the dotted name
`module:function` of `function(config_path) -> (model, optimizer)` (the
optimizer built on the model's trainable variables); the training layer
passes its own, so that this module needs nothing above it.

`load(files, model, optimizer)` puts them into the other engine's model and
optimizer. An optimizer of another class or with other variables (another
momentum form, other frozen layers) cannot take the saved slots:
`OptimizerMismatchError`, one line naming both.

Run as `python -m official_shapemask.weights.any_engine CONFIG FORMAT PATH
STEP OUT_DIR BUILDER` (what `convert` does), it is that subprocess.
"""

import collections
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import tensorflow as tf

from official_shapemask.weights import errors
from official_shapemask.weights import paths

TENSORFLOW, JAX = "tensorflow", "jax"  # `keras.backend.backend()` names.
TF_CHECKPOINT, ORBAX, KERAS_WEIGHTS = "tf_checkpoint", "orbax", "keras_weights"
ENGINE_OF = {TF_CHECKPOINT: TENSORFLOW, ORBAX: JAX, KERAS_WEIGHTS: JAX}
ENGINE_NAMES = {TENSORFLOW: "the TensorFlow engine", JAX: "the JAX engine"}
MODEL_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# Exit statuses of the converter subprocess, by what it raised.
# Starts the converter subprocess's error line on its stderr.
_ERROR_MARK = "shapemask-convert-error: "
_EXIT_ERRORS = {2: errors.CheckpointError, 3: errors.CheckpointUnreadableError,
                4: errors.CheckpointMismatchError}


class EngineUnavailableError(errors.CheckpointError):
  """Reading a step needs an engine that is not installed (names it)."""


class OptimizerMismatchError(errors.CheckpointMismatchError):
  """The saved optimizer state does not fit this run's optimizer.

  Attributes:
    saved_class, our_class: the two optimizers' class names.
  """

  def __init__(self, message, saved_class, our_class):
    super().__init__(message)
    self.saved_class = saved_class
    self.our_class = our_class


class StepRef(collections.namedtuple("StepRef",
                                     ["step", "engine", "path", "format"])):
  """One saved step: its number, engine (`tensorflow`/`jax`), path, format.

  `format` is `tf_checkpoint` (a `ckpt-<step>` prefix), `orbax` (a
  `checkpoints/<step>` folder) or `keras_weights` (model weights only).
  """

  def describe(self):
    """`the JAX engine's checkpoint <path>` (or `... weights file ...`)."""
    what = "weights file" if self.format == KERAS_WEIGHTS else "checkpoint"
    return f"{ENGINE_NAMES[self.engine]}'s {what} {self.path}"


# ------------------------------------------------------------- what is there
def _tf_steps(model_dir):
  state = tf.train.get_checkpoint_state(model_dir)
  if state is None:
    return []
  prefixes = list(state.all_model_checkpoint_paths)
  if state.model_checkpoint_path and (
      state.model_checkpoint_path not in prefixes):
    prefixes.append(state.model_checkpoint_path)
  found = []
  for prefix in prefixes:
    number = prefix.rsplit("-", 1)[-1]
    if number.isdigit() and tf.io.gfile.exists(prefix + ".index"):
      found.append(StepRef(int(number), TENSORFLOW, prefix, TF_CHECKPOINT))
  return found


def _orbax_steps(model_dir):
  folder = os.path.join(model_dir, paths.ORBAX_SUBDIR)
  if not tf.io.gfile.isdir(folder):
    return []
  # Orbax renames a step's temporary folder to its number when complete.
  return [StepRef(int(name.rstrip("/")), JAX,
                  os.path.join(folder, name.rstrip("/")), ORBAX)
          for name in tf.io.gfile.listdir(folder)
          if name.rstrip("/").isdigit()]


def list_steps(model_dir, weights_files=False):
  """Every finished step of either engine in `model_dir`, oldest first.

  Args:
    model_dir: a run's model directory (local or remote).
    weights_files: also list `shapemask-<step>.weights.h5` (model weights
      only: for the readers, never to resume from).

  Returns:
    `[StepRef]` sorted by step; at one step a TensorFlow checkpoint comes
    last, then a weights file, then an Orbax checkpoint first (`newest_step`
    prefers what needs no conversion under TensorFlow).
  """
  found = _tf_steps(model_dir) + _orbax_steps(model_dir)
  if weights_files:
    found += [StepRef(step, JAX, path, KERAS_WEIGHTS)
              for step, path in paths.model_weights_steps(model_dir)]
  rank = {ORBAX: 0, KERAS_WEIGHTS: 1, TF_CHECKPOINT: 2}
  return sorted(found, key=lambda ref: (ref.step, rank[ref.format]))


def newest_step(model_dir, engine=None, weights_files=False):
  """The newest step in `model_dir` (of `engine` only, when given), or None.

  Returns:
    a `StepRef(step, engine, path, format)`; see `list_steps` for ties.
  """
  found = [ref for ref in list_steps(model_dir, weights_files)
           if engine is None or ref.engine == engine]
  return found[-1] if found else None


def orbax_step(path):
  """The `StepRef` of an Orbax step folder (`.../checkpoints/<step>`), or
  None when `path` is not one."""
  path = str(path).rstrip("/")
  name, parent = os.path.basename(path), os.path.dirname(path)
  if (name.isdigit() and os.path.basename(parent) == paths.ORBAX_SUBDIR and
      tf.io.gfile.isdir(path)):
    return StepRef(int(name), JAX, path, ORBAX)
  return None


def model_dir_of(ref):
  """The model directory that holds `ref`."""
  if ref.format == ORBAX:
    return os.path.dirname(os.path.dirname(ref.path))
  return os.path.dirname(ref.path)


# ----------------------------------------------------------------- converting
def engine_available(engine):
  """Whether this Python can run `engine`'s reader (JAX needs Orbax too)."""
  if engine == TENSORFLOW:
    return True
  try:
    return all(importlib.util.find_spec(name) is not None
               for name in ("jax", "orbax.checkpoint"))
  except (ImportError, ValueError):
    return False


def convert(ref, gin_config_text, out_dir, builder):
  """Writes `ref`'s state as the neutral files in `out_dir`.

  Args:
    ref: a `StepRef` of a TensorFlow or Orbax checkpoint.
    gin_config_text: the gin config that builds the model and optimizer of
      the run that wrote `ref` (its `config.gin`).
    out_dir: an existing, empty local folder.
    builder: `module:function`, run in the subprocess: `function(path of a
      gin file) -> (model, optimizer)`, the optimizer built.

  Returns:
    `out_dir`.

  Raises:
    EngineUnavailableError: JAX or Orbax is not installed (an Orbax step).
    CheckpointUnreadableError: its files cannot be read (names it).
    CheckpointMismatchError: it does not fit the model the config builds.
    CheckpointError: any other failure, its last line.
  """
  if ref.format not in (TF_CHECKPOINT, ORBAX):
    raise ValueError(f"{ref.describe()} holds no training state to convert")
  if not engine_available(ref.engine):
    raise EngineUnavailableError(
        f"{ref.describe()} (step {ref.step}) is read by the JAX engine, "
        "which is not installed: pip install official_shapemask[jax]")
  config = os.path.join(out_dir, "source_config.gin")
  with open(config, "w") as f:
    f.write(gin_config_text)
  env = dict(os.environ, KERAS_BACKEND=ref.engine, CUDA_VISIBLE_DEVICES="",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join(
                 [_REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")]
                                 if p]))
  proc = subprocess.run(
      [sys.executable, "-m", __name__, config, ref.format, ref.path,
       str(ref.step), out_dir, builder],
      env=env, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    lines = [line for line in proc.stderr.strip().splitlines()
             if line.strip()] or [f"exit status {proc.returncode}"]
    # The converter's own line, even when library output (TensorStore's
    # late read errors, say) comes after it.
    ours = [line[len(_ERROR_MARK):] for line in lines
            if line.startswith(_ERROR_MARK)]
    lines = ours or lines
    if proc.returncode in _EXIT_ERRORS:  # A line that names the checkpoint.
      raise _EXIT_ERRORS[proc.returncode](lines[-1])
    raise errors.CheckpointError(
        f"{ref.describe()} (step {ref.step}) cannot be converted for the "
        f"other engine: {lines[-1]}")
  return out_dir


def _numpy(variable):
  import keras  # pylint: disable=g-import-not-at-top
  return np.asarray(keras.ops.convert_to_numpy(variable.value))


def _json_config(optimizer):
  """The optimizer's plain settings (momentum, nesterov, ...) for the record."""
  config = {}
  for key, value in optimizer.get_config().items():
    if isinstance(value, (bool, int, float, str)) or value is None:
      config[key] = value
  return config


def _plain_path(path):
  """A variable path without Keras' uniquifying suffixes (`res_net_1` ->
  `res_net`): a second model built in one process has such names."""
  return re.sub(r"_\d+(?=/|$)", "", path)


def _optimizer_keys(model, optimizer):
  """`[key]` of the optimizer's variables, independent of the process.

  A slot of the i-th trainable variable (path `sgd/<its path with _>_<slot>`)
  is `slot/<i>/<slot>`; the others (`iteration`, `learning_rate`) are their
  path without the optimizer's name.
  """
  owners = {v.path.replace("/", "_"): i
            for i, v in enumerate(model.trainable_variables)}
  keys = []
  for variable in optimizer.variables:
    rest = variable.path.split("/", 1)[-1]
    owner = max((name for name in owners if rest.startswith(name + "_")),
                key=len, default=None)
    keys.append(f"slot/{owners[owner]}/{rest[len(owner) + 1:]}"
                if owner is not None else rest)
  return keys


def write(model, optimizer, step, out_dir, source=None):
  """Writes the neutral files of `model` and `optimizer` at `step`.

  Args:
    model, optimizer: a built model and optimizer (any backend).
    step: int, the step they are at.
    out_dir: a local folder.
    source: the `StepRef` they were restored from (recorded).

  Returns:
    `out_dir`.
  """
  model.save_weights(os.path.join(out_dir, MODEL_FILE))
  variables = list(optimizer.variables)
  np.savez(os.path.join(out_dir, OPTIMIZER_FILE),
           **{v.path: _numpy(v) for v in variables})
  state = {
      "step": int(step),
      "source": dict(source._asdict()) if source else None,
      "trainable": [_plain_path(v.path) for v in model.trainable_variables],
      "optimizer": {"class": type(optimizer).__name__,
                    "config": _json_config(optimizer),
                    "variables": [v.path for v in variables],
                    "keys": _optimizer_keys(model, optimizer)},
  }
  with open(os.path.join(out_dir, STATE_FILE), "w") as f:
    json.dump(state, f, indent=1)
  return out_dir


def _source_of(state):
  source = state.get("source")
  return StepRef(**source) if source else None


def _describe(state, files):
  source = _source_of(state)
  return (f"{source.describe()} (step {state['step']})" if source else
          f"the state in {files} (step {state['step']})")


def _check_optimizer(state, files, model, optimizer):
  """Raises OptimizerMismatchError unless `optimizer` takes the saved state.

  Returns:
    `[(our variable, its path in optimizer.npz)]`.
  """
  saved = state["optimizer"]
  saved_class, our_class = saved["class"], type(optimizer).__name__
  saved_keys = dict(zip(saved["keys"], saved["variables"]))
  our_keys = _optimizer_keys(model, optimizer)
  trainable = [_plain_path(v.path) for v in model.trainable_variables]
  why = None
  if saved_class != our_class:
    why = (f"its optimizer is {saved_class}, this run's is {our_class}, so "
           f"its {len(saved_keys)} optimizer variables (e.g. "
           f"{saved['variables'][-1]}) cannot carry over")
  elif trainable != state["trainable"]:
    differ = next((f"{a} vs {b}" for a, b in zip(state["trainable"],
                                                  trainable) if a != b),
                  "none in the shorter list")
    why = (f"its model trained {len(state['trainable'])} variables, this "
           f"run's trains {len(trainable)} (first difference: {differ}): "
           "the frozen layers differ, so the optimizer slots do not "
           "correspond")
  elif set(saved_keys) != set(our_keys):
    missing = sorted(set(our_keys) - set(saved_keys))
    extra = sorted(set(saved_keys) - set(our_keys))
    why = (f"its {saved_class} variables differ from this run's (this run "
           f"has {len(missing)} it lacks, e.g. {(missing or ['none'])[0]}; "
           f"it has {len(extra)} this run lacks, e.g. "
           f"{(extra or ['none'])[0]})")
  if why is not None:
    raise OptimizerMismatchError(
        f"cannot resume from {_describe(state, files)}: {why}", saved_class,
        our_class)
  return [(variable, saved_keys[key])
          for variable, key in zip(optimizer.variables, our_keys)]


def read_state(files):
  """The `state.json` of a neutral file set (step, source, optimizer)."""
  with open(os.path.join(files, STATE_FILE)) as f:
    return json.load(f)


def load(files, model, optimizer=None):
  """Loads the neutral files in `files` into `model` (and `optimizer`).

  Args:
    files: the folder `convert` wrote.
    model: a built model (any backend).
    optimizer: its built optimizer, or None to load the model only.

  Returns:
    the step.

  Raises:
    CheckpointMismatchError: the model's layout or shapes differ (names
      the source checkpoint).
    OptimizerMismatchError: another optimizer class or other variables.
  """
  state = read_state(files)
  if optimizer is not None:  # Before anything is assigned.
    saved_paths = _check_optimizer(state, files, model, optimizer)
  try:
    model.load_weights(os.path.join(files, MODEL_FILE))
  except ValueError as e:
    raise errors.CheckpointMismatchError(
        f"{_describe(state, files)} does not match the model built from the "
        f"gin config: {errors.first_line(e)}") from None
  if optimizer is not None:
    with np.load(os.path.join(files, OPTIMIZER_FILE)) as arrays:
      for variable, path in saved_paths:
        value = arrays[path]
        if tuple(value.shape) != tuple(variable.shape):
          raise errors.CheckpointMismatchError(
              f"{_describe(state, files)} does not match this run's "
              f"optimizer: {variable.path} is {tuple(value.shape)} there, "
              f"{tuple(variable.shape)} here")
        variable.assign(value.astype(variable.dtype))
  return int(state["step"])


# ------------------------------------------------------------ the subprocess
class _StateVariables:
  """The three variable lists `jax_checkpoints.CheckpointManager` restores
  into (those of `jax_step.TrainStep`), on one CPU device."""

  def __init__(self, model, optimizer):
    import jax  # pylint: disable=g-import-not-at-top
    self._groups = (list(model.trainable_variables),
                    list(model.non_trainable_variables),
                    list(optimizer.variables))
    self.state_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def variables(self):
    return self._groups


def _restore(ref, model, optimizer):
  """Restores `ref` into `model` and `optimizer` as its engine resumes."""
  if ref.format == TF_CHECKPOINT:
    from official_shapemask.weights import checkpoints  # pylint: disable=g-import-not-at-top
    checkpoints.restore_checkpoint(
        tf.train.Checkpoint(model=model, optimizer=optimizer), ref.path)
    return
  from official_shapemask.weights import jax_checkpoints  # pylint: disable=g-import-not-at-top
  holder = _StateVariables(model, optimizer)
  manager = jax_checkpoints.CheckpointManager(model_dir_of(ref), holder,
                                              read_only=True)
  try:
    state, _ = manager.restore(ref.step)
  finally:
    manager.close()
  for group, values in zip(holder.variables(), state):
    for variable, value in zip(group, values):
      variable.assign(value)


def main(argv):
  """The converter subprocess (see `convert`); errors: one stderr line."""
  if len(argv) != 7:
    print(f"usage: python -m {__name__} CONFIG FORMAT PATH STEP OUT_DIR "
          "MODULE:BUILDER", file=sys.stderr)
    return 1
  config, fmt, path, step, out_dir, builder = argv[1:]
  ref = StepRef(int(step), ENGINE_OF[fmt], path, fmt)
  import keras  # pylint: disable=g-import-not-at-top
  if keras.backend.backend() != ref.engine:
    print(f"{ref.describe()} is read with KERAS_BACKEND={ref.engine}, not "
          f"{keras.backend.backend()}", file=sys.stderr)
    return 1
  module, function = builder.split(":")
  try:
    model, optimizer = getattr(importlib.import_module(module),
                               function)(config)
    _restore(ref, model, optimizer)
    write(model, optimizer, ref.step, out_dir, source=ref)
  except errors.CheckpointError as e:
    print(_ERROR_MARK + " ".join(str(e).split()), file=sys.stderr)
    return next(code for code, kind in sorted(
        _EXIT_ERRORS.items(), reverse=True) if isinstance(e, kind))
  except (OSError, ValueError, ImportError, RuntimeError) as e:
    # `convert` names the checkpoint around this line.
    print(_ERROR_MARK + " ".join(errors.first_line(e).split()),
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
