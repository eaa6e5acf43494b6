"""The interface of a training engine.

An engine is one framework's way to hold and run the model: it builds the
model, optimizer and compiled step under its own distribution, restores and
saves checkpoints in its own format, runs training steps and predicts
evaluation batches. Everything else belongs to the controller
(`training/controller.py`), once for every engine: validation, the round
loop and its checkpoint and evaluation cadence, the divergence rule,
progress lines and TensorBoard, `config.gin`, resume rules, the run lock,
COCO evaluation (in the background too), the timer and the stop on SIGTERM.

The controller calls, in this order:

1. `Engine(settings, print_fn)`: nothing starts. `has_checkpoint(model_dir)`
   (a class method) may be asked before, `is_lock_holder()` (training
   modes; may join the other processes) and `known_replicas()` after.
2. `start(mode, model_kwargs)`: the distribution, model (built with
   `build_shapemask_model(**model_kwargs)`), optimizer, compiled step and
   checkpoint manager. Afterwards `chief`, `num_replicas`, `batch_parts`,
   `num_processes`, `use_bfloat16` and `model` are set.
3. `set_batch_groups(groups)`; `remove_interrupted_saves()`,
   `restore_newest(move_unreadable)` or `initialize_from(...)` (training),
   `restore(path)` (evaluation).
4. Training: `train_iterator(dataset_fn)` once, then rounds of
   `run_steps(iterator, n)`, each followed by the controller's checks and,
   at its cadence, `weights_finite()` and `save(step)`; `export_weights`
   at the last step. On SIGTERM / SIGINT, `request_stop()` comes from
   another thread; after the round, `any_process(flag)` agrees on stopping,
   then `save(step)` and `wait_for_saves()`.
5. Evaluation: `predict(images, image_info)` per batch.
6. `close()`.

A new engine (say PyTorch, `KERAS_BACKEND=torch`) is one new file
`engines/<backend>_engine.py` defining `Engine(base.Engine)`; `engines.load`
finds it by the backend's name.
"""

import abc
import math

from official_shapemask.training import optimizers


class Engine(abc.ABC):
  """One framework's model, optimizer, step and checkpoints (see module).

  Args:
    settings: the run's `settings.Settings` (read, never changed).
    print_fn: where the engine's own messages go.

  Attributes set by `start`:
    model: the `ShapeMaskModel`.
    optimizer: its Keras optimizer.
    chief: whether this process writes the run's files.
    num_replicas: replicas that normalise their share of a batch apart
      (`settings.replica_groups`).
    batch_parts: `(count, name)`: the pieces every batch is split into
      (`(8, 'replicas')`, `(4, 'devices')`), for the divisibility checks.
    num_processes: processes that train together.
    use_bfloat16: whether the model computes in `mixed_bfloat16`.
  """

  #: Where an unset `Experiment.use_bfloat16` means on (platform names).
  BFLOAT16_PLATFORMS = ()
  #: The Keras backend the engine runs under (names its checkpoint format
  #: for `training/engine_switch`).
  BACKEND = None

  def __init__(self, settings, print_fn=print):
    self.settings = settings
    self.print_fn = print_fn
    self.model = None
    self.optimizer = None
    self.chief = True
    self.num_replicas = 1
    self.batch_parts = (1, "replicas")
    self.num_processes = 1
    self.use_bfloat16 = False
    self._learning_rate = None

  # ------------------------------------------------------- before `start`
  @classmethod
  @abc.abstractmethod
  def has_checkpoint(cls, model_dir):
    """Whether `model_dir` holds a checkpoint of this engine's format."""

  @abc.abstractmethod
  def is_lock_holder(self):
    """Whether this process holds `model_dir`'s run lock (the chief).

    Called before `start` by the training modes; may join the other
    processes of a multi-host run to learn this one's index.
    """

  def known_replicas(self):
    """`num_replicas` if known without starting anything, else None."""
    return None

  # ----------------------------------------------------------------- start
  @abc.abstractmethod
  def start(self, mode, model_kwargs):
    """Starts the distribution and builds model, optimizer and step.

    Args:
      mode: 'train', 'train_and_eval' or 'eval' (read-only checkpoints).
      model_kwargs: `build_shapemask_model` overrides.
    """

  def set_batch_groups(self, groups):
    """`ShapeMaskModel.set_batch_groups`, before the step is traced."""
    self.model.set_batch_groups(groups)

  # ----------------------------------------------------------- checkpoints
  def remove_interrupted_saves(self):
    """Removes what a killed save left behind; returns the paths removed."""
    return []

  @abc.abstractmethod
  def restore_newest(self, move_unreadable):
    """Restores the newest readable checkpoint of the run.

    Unreadable newer ones are named through `print_fn` and, with
    `move_unreadable`, moved into `model_dir/unreadable/`.

    Returns:
      the restored checkpoint's path, or None when there is none.

    Raises:
      errors.CheckpointError: none is readable, or the newest readable one
        does not fit the model (named).
    """

  @abc.abstractmethod
  def restore(self, path):
    """Restores checkpoint `path` (from `checkpoints()`); returns its step.

    Raises:
      errors.CheckpointError: it cannot be read or does not fit the model.
    """

  def adopt_keras_state(self, step):
    """Takes the Keras variables as the state at `step`.

    Called after `training/engine_switch` loaded the other engine's
    checkpoint into `model` and `optimizer` (weights, batch-norm
    statistics, momentum slots, `optimizer.iterations`). An engine whose
    state is those variables has nothing to do.
    """
    del step

  @abc.abstractmethod
  def initialize_from(self, checkpoint, modules, prefix=None):
    """Fine-tuning start: `modules` of the model from `checkpoint`.

    Raises:
      OSError, ValueError, ImportError, RuntimeError: the checkpoint cannot
        initialise these modules (the message names it).
    """

  @abc.abstractmethod
  def checkpoints(self):
    """The run's finished checkpoints: `[(step, path)]`, oldest first."""

  def latest_checkpoint(self):
    """The newest finished checkpoint's path, or None."""
    found = self.checkpoints()
    return found[-1][1] if found else None

  @abc.abstractmethod
  def save(self, step):
    """Saves the current state as checkpoint `step`; returns its path."""

  def wait_for_saves(self):
    """Blocks until every `save` so far is written.

    An engine that saves asynchronously waits here; one whose `save`
    returns when the checkpoint is written has nothing to do. The
    controller calls it before it says that a stopped run's step is saved.
    """

  def export_weights(self, step):
    """At the last step: writes what other tools need (path) or None."""
    del step
    return None

  # -------------------------------------------------------------- training
  @abc.abstractmethod
  def train_iterator(self, dataset_fn):
    """The training batches of `dataset_fn` (a `tf.distribute` input fn)."""

  @abc.abstractmethod
  def run_steps(self, iterator, num_steps, stop_above=math.inf):
    """Runs up to `num_steps` training steps.

    The engine may end the round early after a step whose total loss is
    non-finite or above `stop_above`, and must end it after the step that
    is running when `request_stop` is called; the controller applies the
    divergence rule to what this returns.

    Returns:
      one dict per step run (`shapemask_model.LOSS_KEYS` -> float).
    """

  @property
  @abc.abstractmethod
  def step(self):
    """The number of training steps the current state has taken."""

  def learning_rate(self, step):
    """The optimizer's learning rate at `step` (host side)."""
    if self._learning_rate is None:
      self._learning_rate = optimizers.LearningRateReadout(self.optimizer)
    return self._learning_rate(step)

  @abc.abstractmethod
  def weights_finite(self):
    """Whether every trainable weight is finite."""

  @abc.abstractmethod
  def request_stop(self):
    """Makes `run_steps` end after its current step (any thread)."""

  def any_process(self, flag):
    """Whether `flag` is True in any process (collective when several)."""
    return bool(flag)

  # ------------------------------------------------------------ evaluation
  @abc.abstractmethod
  def predict(self, images, image_info):
    """Inference outputs of a global evaluation batch, as numpy arrays.

    Args:
      images: `[B, S, S, 3]`, the whole batch (every process passes it).
      image_info: `[B, 4, 2]`.

    Returns:
      the model's inference dict (docs/contracts.md), all `B` rows.
    """

  def close(self):
    """Waits for pending saves and releases the devices."""
