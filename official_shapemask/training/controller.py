"""The controller of a `train.py` run: what every engine shares.

A `Controller` drives one engine (`engines/base.py`) through a run:

* validation of the settings and inputs, once, before the engine starts
  (`validation`), and of the batch against the engine's replicas or
  devices right after;
* the seed's timer, from just before the engine starts to its shutdown;
* resume: the newest readable checkpoint of `model_dir` (damaged ones named
  and moved aside), else the init checkpoint (`_restore_or_initialize`);
* the round loop: rounds of up to `steps_per_loop` steps that end at
  checkpoint boundaries, a checkpoint every `checkpoint_every` steps and at
  the end;
* the divergence rule: one `divergence.LossGuard` check of every step's
  total loss after each round; nothing from a bad round is saved;
* progress lines and TensorBoard (`progress.ProgressLogger`), the run's
  `config.gin` (`operative_config.TrainingConfigRecorder`);
* COCO evaluation for every engine, in the background inside
  `train_and_eval` (`evaluations.Evaluations`);
* the stop on SIGTERM / SIGINT: `request_stop` (called by
  `interrupt.SignalStop`'s watcher thread) makes the engine end its round
  after the running step; `check_stop` then saves that step, says so in one
  line and raises `interrupt.StopRequested`.

`modes.py` runs the three `--mode`s with it, holds the run lock and listens
for the signals.
"""

import math
import os
import time

import keras
import tensorflow as tf

from official_shapemask.training import datasets
from official_shapemask.training import divergence
from official_shapemask.training import engine_switch
from official_shapemask.training import engines
from official_shapemask.training import evaluations
from official_shapemask.training import interrupt
from official_shapemask.training import operative_config
from official_shapemask.training import progress
from official_shapemask.training import settings as settings_lib
from official_shapemask.training import validation
from official_shapemask.weights import any_engine
from official_shapemask.weights import errors

InvalidInputError = settings_lib.InvalidInputError


class Controller:
  """One run of one engine (see the module).

  Args:
    settings: the run's `settings.Settings`.
    engine: an `engines.base.Engine` built with the same settings.
    print_fn: where messages, progress lines and tables go.
    background_eval: how COCOeval runs for the evaluations inside
      `train_and_eval`: 'process' (default), 'thread' or False (on the
      training thread).
  """

  def __init__(self, settings, engine, print_fn=print,
               background_eval="process"):
    self.settings = settings
    self.engine = engine
    self.print_fn = print_fn
    self.mode = None
    self.timer = None
    self.started = False
    self.evaluations = evaluations.Evaluations(
        settings.model_dir, settings, background_eval, print_fn)
    self.guard = divergence.LossGuard(settings.loss_explosion_factor)
    self._first_loss = None  # This process's first step loss (the guard's).
    self._resumed = False
    self._config = None
    self._iterator = None
    self._logger = None
    self._trained_steps = 0
    self._train_seconds = 0.0
    self._saved = (None, None)  # (step, path) of the newest checkpoint.
    self._stop_signal = None

  # ------------------------------------------------------------ properties
  @property
  def model_dir(self):
    return self.settings.model_dir

  @property
  def total_steps(self):
    return self.settings.total_steps

  @property
  def eval_every(self):
    return self.settings.eval_every

  @property
  def step(self):
    return self.engine.step

  @property
  def chief(self):
    return self.engine.chief

  @property
  def trained_steps(self):
    return self._trained_steps

  @property
  def train_images_per_second(self):
    if not self._train_seconds:
      return 0.0
    return (self._trained_steps * self.settings.train_batch_size /
            self._train_seconds)

  def has_checkpoint(self):
    """Whether `model_dir` holds a checkpoint of either engine (before
    `start` too)."""
    return any_engine.newest_step(self.settings.model_dir) is not None

  def latest_checkpoint(self):
    return self.engine.latest_checkpoint()

  # ------------------------------------------------------------------ setup
  def start(self, mode):
    """Validates, starts the engine, and restores or initialises (training).

    Raises:
      InvalidInputError: a setting or input that cannot work (one line),
        before the engine starts where it can be known without it.
    """
    s, training = self.settings, mode != "eval"
    validation.validate(s, mode, print_fn=self.print_fn)
    if training:
      replicas = self.engine.known_replicas()
      if replicas:  # one_device, mirrored: checked before anything starts.
        settings_lib.replica_groups(s, replicas)
    model_kwargs = validation.model_overrides(
        s, print_fn=self.print_fn if training else None)
    self.mode = mode
    self.timer = progress.Timer()  # The seed's clock starts...
    self.started = True
    self.engine.start(mode, model_kwargs)
    parts, what = self.engine.batch_parts
    if training:
      settings_lib.check_divisible(s.train_batch_size, "train_batch_size",
                                   parts, what)
      self.engine.set_batch_groups(
          settings_lib.replica_groups(s, self.engine.num_replicas))
    if mode != "train":
      settings_lib.check_divisible(s.eval_batch_size, "eval_batch_size",
                                   parts, what)
    # config.gin stays the training's (written when training begins or
    # just before a resumed run's first save; evaluations write their own).
    self._config = operative_config.TrainingConfigRecorder(
        s.model_dir, enabled=self.chief, print_fn=self.print_fn)
    if training:
      self._restore_or_initialize()
    return self

  def close(self):
    """Finishes evaluations, stops the engine; returns the seconds since
    `start` (the seed's measure)."""
    try:
      self.evaluations.close()
    finally:
      if self.started:
        self.engine.close()
    return self.timer.elapsed() if self.timer else 0.0

  # ---------------------------------------------------------------- resume
  def _restore_newest(self, move_unreadable):
    """Restores the newest readable checkpoint of `model_dir`; its path.

    The one place that decides what a run resumes from (training) and what
    an evaluation reads.
    """
    try:
      return self.engine.restore_newest(move_unreadable)
    except errors.CheckpointError as e:
      raise InvalidInputError(str(e)) from None

  def _restore_or_initialize(self):
    """Resumes from the newest readable checkpoint, or initialises."""
    for path in self.engine.remove_interrupted_saves():
      self.print_fn(f"Removed {path}, left by an interrupted checkpoint save")
    latest = self._restore_newest(move_unreadable=self.chief)
    s = self.settings
    # The other engine's step, when newer: loaded into the Keras variables
    # (engine_switch prints its line), then taken up by the engine.
    try:
      switched = engine_switch.resume(
          self.engine.model, self.engine.optimizer, s.model_dir,
          self.engine.BACKEND, self.step if latest else None,
          print_fn=self.print_fn)
    except errors.CheckpointError as e:
      raise InvalidInputError(str(e)) from None
    if switched is not None:
      self.engine.adopt_keras_state(switched)
      self._resumed = True
    elif latest:
      self._resumed = True
      self._saved = (self.step, latest)
      self.print_fn(f"Resumed from {latest} at step {self.step}")
    elif s.init_checkpoint:
      try:
        self.engine.initialize_from(s.init_checkpoint,
                                    s.init_checkpoint_modules,
                                    s.init_checkpoint_prefix)
      except InvalidInputError:
        raise
      except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise InvalidInputError(f"init_checkpoint: {e}") from None

  def restore(self, checkpoint_path):
    """Loads a training checkpoint (evaluation); returns its step.

    Writes the operative config to `model_dir/eval_config.gin` (never
    `config.gin`, the training run's).

    Raises:
      InvalidInputError: naming the checkpoint, when it cannot be read or
        does not match the model built from the gin config.
    """
    try:
      self.engine.restore(checkpoint_path)
    except errors.CheckpointError as e:
      raise InvalidInputError(str(e)) from None
    if self.chief:
      operative_config.write_eval_config(self.settings.model_dir)
    return self.step

  def restore_latest(self):
    """Restores the newest readable checkpoint of `model_dir` (evaluation).

    An unreadable newer checkpoint is named and left where it is.

    Returns:
      the restored checkpoint's path.

    Raises:
      InvalidInputError: `model_dir` holds no checkpoint, none is readable,
        or the newest readable one does not match the model (named).
    """
    # The other engine's step, when newer (engine_switch prints its line).
    try:
      switched = engine_switch.restore_for_eval(
          self.engine.model, self.engine.optimizer, self.settings.model_dir,
          self.engine.BACKEND, print_fn=self.print_fn)
    except errors.CheckpointError as e:
      raise InvalidInputError(str(e)) from None
    if switched is not None:
      self.engine.adopt_keras_state(switched.step)
      if self.chief:
        operative_config.write_eval_config(self.settings.model_dir)
      return switched.path
    path = self._restore_newest(move_unreadable=False)
    if path is None:
      raise InvalidInputError(f"no checkpoint in {self.settings.model_dir}")
    if self.chief:
      operative_config.write_eval_config(self.settings.model_dir)
    return path

  def checkpoints_iterator(self, timeout, poll_seconds=1.0):
    """Yields each new checkpoint's path until none appears in `timeout` s."""
    seen = set()
    deadline = time.time() + timeout
    while True:
      new = [(step, path) for step, path in self.engine.checkpoints()
             if step not in seen]
      if new:
        seen.update(step for step, _ in new)
        yield max(new)[1]
        deadline = time.time() + timeout
      elif time.time() > deadline:
        return
      else:
        time.sleep(poll_seconds)

  # -------------------------------------------------------------- training
  def train_dataset_fn(self):
    """The `tf.distribute` input function of the training set.

    Checks first that every file starts with a TFRecord header (names the
    file that does not), before the train step is traced.
    """
    s = self.settings
    validation.check_record_files(s.train_file_pattern, "train_file_pattern")
    return datasets.make_train_dataset_fn(
        s.train_file_pattern, s.train_batch_size, self.engine.model,
        self.engine.use_bfloat16, s.deterministic_input)

  def _begin_training(self):
    s = self.settings
    self._iterator = self.engine.train_iterator(self.train_dataset_fn())
    # The input parser is configured now: the operative config is whole.
    self._config.training_begins(resumed=self._resumed, step=self.step)
    self._logger = progress.ProgressLogger(
        s.total_steps, s.train_batch_size,
        summary_dir=os.path.join(s.model_dir, "train") if self.chief
        else None, print_fn=self.print_fn)

  def train(self, until_step=None):
    """Trains to `until_step` (default total_steps), checkpointing.

    Returns:
      the mean losses of the last round (empty when none ran).

    Raises:
      divergence.NonFiniteLossError: a loss (or, at a checkpoint, a weight)
        became NaN or infinite; names the step.
      divergence.LossExplosionError: a step's total loss exceeded the
        explosion limit (`divergence.LossGuard`); names the step.
        In both cases nothing from that round is saved, so the latest
        checkpoint is the last good one.
      InvalidInputError: a training file is damaged; names it.
    """
    s = self.settings
    until = min(until_step or s.total_steps, s.total_steps)
    if self._iterator is None:
      self._begin_training()
    losses = {}
    step = self.step
    while step < until:
      self.check_stop()
      self.evaluations.collect(wait=False)
      num = min(s.steps_per_loop, until - step,
                s.checkpoint_every - step % s.checkpoint_every)
      losses = self._round(step, num)
      step = self.step
      if step % s.checkpoint_every == 0 or step >= until:
        self._save(step)
    self.check_stop()
    if step >= s.total_steps:
      path = self.engine.export_weights(step)
      if path:
        self.print_fn(f"Wrote the weights for export: {path}")
    return losses

  def _round(self, step, num):
    """Runs one round of `num` steps from `step`; returns its mean losses."""
    s = self.settings
    limit = self.guard.limit()
    timer = progress.Timer()
    try:
      history = self.engine.run_steps(
          self._iterator, num, math.inf if limit is None else limit)
    except tf.errors.OpError as e:
      error = datasets.data_error(e, s.train_file_pattern,
                                  "train_file_pattern")
      if error is None:
        raise
      raise error from None
    seconds = timer.elapsed()
    self._check_losses(history, step + 1)
    losses = progress.mean_losses(history)
    self.guard.record(losses["total_loss"])
    self._trained_steps += len(history)
    self._train_seconds += seconds
    new_step = step + len(history)
    self._logger.log(new_step, losses, self.engine.learning_rate(new_step),
                     seconds, len(history))
    return losses

  def _check_losses(self, history, first_step):
    """The divergence rule on a round's per-step losses (raises)."""
    if self._first_loss is None and history:
      self._first_loss = float(history[0]["total_loss"])
    for i, losses in enumerate(history):
      reason = self.guard.check(losses["total_loss"], first=self._first_loss)
      if reason is None:
        continue
      limit = self.guard.limit()
      if limit is None:
        limit = self.guard.limit_from_first(self._first_loss)
      raise divergence.stop_error(
          self.guard, reason, first_step + i, losses["total_loss"],
          progress.format_losses(losses), limit,
          self.engine.latest_checkpoint())

  def _save(self, step):
    if not self.engine.weights_finite():
      raise divergence.NonFiniteLossError(
          f"non-finite weights after step {step}; training stopped, the "
          f"last good checkpoint is kept: {self.engine.latest_checkpoint()}")
    self._config.before_save()
    path = self.engine.save(step)
    self._saved = (step, path)
    return path

  # ------------------------------------------------------------------ stop
  def request_stop(self, signum):
    """Asks the run to stop after the running step (from any thread).

    `interrupt.SignalStop` calls this on SIGTERM / SIGINT; the engine ends
    its round after the step it is running, and the controller's next
    `check_stop` saves and stops.
    """
    self._stop_signal = signum
    self.engine.request_stop()

  def stop_requested(self):
    """Whether this or any other process of the run was asked to stop.

    A collective where several processes train together: every process
    calls it at the same points (round ends, evaluation batches).
    """
    return self.engine.any_process(self._stop_signal is not None)

  def check_stop(self):
    """After a stop request: saves the current step and stops.

    The step is saved unless a checkpoint already holds it (the round ended
    at a checkpoint boundary, or nothing was trained since the resume);
    the save is waited for, then one line names the signal, the step and
    the checkpoint.

    Raises:
      interrupt.StopRequested: when a stop was requested.
    """
    if not self.stop_requested():
      return
    step = self.step
    saved_step, path = self._saved
    if saved_step != step and step > 0:  # Step 0: nothing trained.
      path = self._save(step)
    if path is not None:
      self.engine.wait_for_saves()
    stop = interrupt.StopRequested(self._stop_signal, step, path)
    self.print_fn(str(stop), flush=True)
    raise stop

  # ------------------------------------------------------------ evaluation
  def evaluate(self):
    """COCO box + mask metrics of the current weights on the eval set.

    Writes `model_dir/eval_<step>.json` and TensorBoard scalars, prints the
    table, and returns the metrics. Inside `train_and_eval` before the last
    step, COCOeval runs in the background and this returns None; the
    results are published when it finishes (at the latest at `close`).
    Inside `train_and_eval`, a stop request abandons the evaluation after
    the current batch (None; `check_stop` then stops the run).
    """
    s = self.settings
    validation.check_record_files(s.eval_file_pattern, "eval_file_pattern")
    dataset = datasets.make_eval_dataset(
        s.eval_file_pattern, s.eval_batch_size, self.engine.model,
        self.engine.use_bfloat16)
    batches = datasets.naming_damaged_files(
        dataset.as_numpy_iterator(), s.eval_file_pattern, "eval_file_pattern")
    training = self.mode == "train_and_eval"
    return self.evaluations.run(
        self.engine.predict, batches, self.step, chief=self.chief,
        in_background=training and self.step < s.total_steps,
        should_stop=self.stop_requested if training else None)


def build(model_dir, strategy_name="one_device", tpu=None, print_fn=print,
          background_eval="process", **settings):
  """A `Controller` of the running Keras backend's engine.

  Args:
    model_dir: the run's directory.
    strategy_name: the TensorFlow engine's strategy (`--strategy`).
    tpu: `--tpu`.
    print_fn: where messages go.
    background_eval: see `Controller`.
    **settings: `Settings` arguments over the gin-bound ones.

  Raises:
    InvalidInputError: a size or step count that is not a positive whole
      number, in one line naming the gin setting (`settings.create`).
  """
  run_settings = settings_lib.create(model_dir, strategy_name=strategy_name,
                                     tpu=tpu, **settings)
  engine_class = engines.load(keras.backend.backend())
  return Controller(run_settings, engine_class(run_settings, print_fn),
                    print_fn=print_fn, background_eval=background_eval)
