"""The JAX engine of `train.py` (`KERAS_BACKEND=jax`).

`JaxExperiment` runs the modes of `training/modes.py` like the TensorFlow
`Experiment` does, with the same settings: it wraps an `Experiment` built by
gin (never started), so the gin files, macros and `Experiment.*` bindings
are the same for both engines, and `config.gin` records them the same way.

What differs is the machinery:

* Devices: `keras.distribution.DataParallel` over every device of every
  process (the model's variables are replicated, batches sharded on their
  first axis). Several hosts join through `keras.distribution.initialize`
  when a `KERAS_DISTRIBUTION_*` environment variable is set (the same
  command on every host; see docs/engines.md). TensorFlow only reads and parses data
  on the host CPU: it is denied every accelerator.
* Input: each process reads its own share of the training files
  (`input_pipeline_id = process_index`) and yields `global_batch /
  num_processes` images per step.
* Step: `jax_step.TrainStep`, one compiled step per batch, on the
  `compute_losses` of the model (the loss of the TensorFlow loop), the
  gin-configured optimizer and schedule, gradient clip, frozen variables and
  precision policy. With `Experiment.per_replica_batch_size` set, the global
  batch is normalised in `global / per_replica_batch_size` groups (batch
  norm and loss normalisers, `ShapeMaskModel.set_batch_groups`), so any
  number of devices computes what the TensorFlow loop computes on replicas
  of that batch; unset, over the whole global batch. Progress lines, TensorBoard scalars and the final timing
  line are the TensorFlow loop's (`train_loop.ProgressLogger`).
* Checkpoints: Orbax (`jax_checkpoints`), asynchronous, in
  `model_dir/checkpoints/<step>`; the end of training also writes
  `model_dir/shapemask-<step>.weights.h5` for the TensorFlow export tools.
* Evaluation: every process reads the whole evaluation set (batches of
  `eval_batch_size`, split over all devices); the chief gives the replicated
  outputs of `jax_step.PredictStep` to the COCO evaluator. Between training
  rounds of `train_and_eval` COCOeval runs in a background process while
  training continues, and its table, `eval_<step>.json` and scalars appear
  when it is done.

A NaN or infinite loss stops the run naming the step, as in the TensorFlow
loop; nothing from that round is saved.
"""

import os
import subprocess
import sys
import tempfile
import time

import gin
import jax
import keras
import numpy as np
import tensorflow as tf

from official_shapemask.evaluation import coco_evaluator
from official_shapemask.modeling import factory
from official_shapemask.weights import any_engine
from official_shapemask.weights import paths
from official_shapemask.training import divergence
from official_shapemask.training import engine_switch
from official_shapemask.training import eval_results
from official_shapemask.training import experiment
from official_shapemask.weights import jax_checkpoints
from official_shapemask.training import jax_step
from official_shapemask.training import operative_config
from official_shapemask.training import train_loop

_DISTRIBUTION_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES",
                     "KERAS_DISTRIBUTION_NUM_PROCESSES",
                     "KERAS_DISTRIBUTION_PROCESS_ID")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def hide_accelerators_from_tensorflow():
  """TensorFlow (tf.data, summaries) keeps off the GPUs/TPUs JAX uses."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      # RuntimeError: TF already initialised its devices; ValueError: no
      # such device type. Either way there is nothing left to hide.
      pass


def initialize_multi_host():
  """Joins the other processes when `KERAS_DISTRIBUTION_*` is set (once).

  Returns:
    the number of processes.
  """
  if (any(os.environ.get(name) for name in _DISTRIBUTION_ENV) and
      not jax.distributed.is_initialized()):
    keras.distribution.initialize()
  return jax.process_count()


def _naming_damaged_files(iterator, pattern, setting):
  """Yields from a tf.data iterator; a damaged record's error names its file.

  Raises:
    experiment.InvalidInputError: naming the damaged TFRecord file
      (`experiment.data_error`); other errors pass unchanged.
  """
  while True:
    try:
      item = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      error = experiment.data_error(e, pattern, setting)
      if error is None:
        raise
      raise error from None
    yield item


def _use_bfloat16(settings):
  """`Experiment.use_bfloat16`; unset = on for TPUs and GPUs, off on CPU."""
  bound = gin.get_bindings(experiment.Experiment).get("use_bfloat16")
  if bound is None:
    return jax.default_backend() in ("tpu", "gpu")
  return bool(settings.use_bfloat16)


class JaxExperiment:
  """The JAX counterpart of `experiment.Experiment` (same interface).

  Args:
    settings: an `experiment.Experiment` constructed by gin (its settings are
      used; its TensorFlow strategy is never started).
    background_eval: how COCOeval runs for the evaluations inside
      `train_and_eval`: 'process' (default), 'thread' or False (on the
      training thread).
  """

  def __init__(self, settings, background_eval="process"):
    hide_accelerators_from_tensorflow()
    self.settings = settings
    self.model_dir = settings.model_dir
    self.total_steps = settings.total_steps
    self.steps_per_loop = settings.steps_per_loop
    self.checkpoint_every = settings.checkpoint_every
    self.eval_every = settings.eval_every
    self.train_batch_size = settings.train_batch_size
    self.eval_batch_size = settings.eval_batch_size
    self.print_fn = settings.print_fn
    self.background_eval = background_eval
    self.timer = None
    self.manager = None
    self.state = None
    self.chief = True
    self._mode = None
    self._step = 0
    self._iterator = None
    self._logger = None
    self._trained_steps = 0
    self._train_seconds = 0.0
    self._pending_evals = []
    self._resumed = False
    self._config = None
    self._guard = divergence.LossGuard(settings.loss_explosion_factor)
    self._first_loss = None  # This process's first step loss (the guard's).
    self._evaluator = None

  # ------------------------------------------------------------------ setup
  def join_processes(self):
    """Joins the other processes of a multi-host run; this one's index.

    A TPU pod's processes learn their index only here (no
    `KERAS_DISTRIBUTION_PROCESS_ID` is set), so the run lock asks this.
    """
    self.num_processes = initialize_multi_host()
    return jax.process_index()

  def start(self, mode):
    """Validates inputs, joins the processes, builds and restores."""
    s = self.settings
    experiment.validate_inputs(mode, s.train_file_pattern,
                               s.eval_file_pattern,
                               s.init_checkpoint if mode != "eval" else None,
                               s.init_checkpoint_prefix,
                               s.init_checkpoint_modules)
    groups = 1
    if mode != "eval":
      experiment.check_per_replica_batch_size(s.per_replica_batch_size,
                                              self.train_batch_size)
      groups = experiment.batch_groups(self.train_batch_size,
                                       s.per_replica_batch_size)
    self._mode = mode
    self.timer = train_loop.Timer()  # The seed's clock starts...
    self.num_processes = initialize_multi_host()
    self.chief = jax.process_index() == 0
    self.distribution = jax_step.data_parallel()
    keras.distribution.set_distribution(self.distribution)
    if mode != "eval":
      self._check_batch(self.train_batch_size, "train_batch_size")
    if mode != "train":
      self._check_batch(self.eval_batch_size, "eval_batch_size")
    self.use_bfloat16 = _use_bfloat16(s)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if self.use_bfloat16 else "float32")
    self.model = factory.build_shapemask_model(
        **s.model_overrides(say=mode != "eval"))
    # Per-replica statistics and loss normalisers over the global batch.
    self.model.set_batch_groups(groups)
    self.optimizer = experiment.build_momentum_optimizer()
    lr = self.optimizer.get_config()["learning_rate"]
    self._schedule = (keras.optimizers.schedules.deserialize(lr)
                      if isinstance(lr, dict) else float(lr))
    self.train_step = jax_step.TrainStep(
        self.model, self.optimizer, gradient_clip_norm=s.gradient_clip_norm,
        distribution=self.distribution)
    self.predict_step = jax_step.PredictStep(self.model, self.distribution)
    self.manager = jax_checkpoints.CheckpointManager(
        self.model_dir, self.train_step, max_to_keep=s.max_checkpoints,
        read_only=mode == "eval")
    if mode != "eval":
      self._restore_or_initialize()
    self.state = self.train_step.state()
    # config.gin stays the training's (written when training begins or
    # just before a resumed run's first save; evaluations write their own).
    self._config = operative_config.TrainingConfigRecorder(
        self.model_dir, enabled=self.chief, print_fn=self.print_fn)
    self.print_fn(
        f"JAX engine: {jax.device_count()} {jax.default_backend()} device(s) "
        f"in {self.num_processes} process(es), "
        f"{'mixed_bfloat16' if self.use_bfloat16 else 'float32'}")
    return self

  def _restore_or_initialize(self):
    # The newest readable step; damaged newer ones are named and, by the
    # chief, moved into model_dir/unreadable (the others only skip them).
    restored = self.manager.restore_newest_readable(
        move_unreadable=self.chief, print_fn=self.print_fn)
    # The TensorFlow engine's step, when newer (engine_switch: prints the
    # line); loaded into the Keras variables, which `start` then reads.
    switched = engine_switch.resume(
        self.model, self.optimizer, self.model_dir, "jax",
        restored[1] if restored else None, print_fn=self.print_fn)
    if switched is not None:
      self._step = switched
      self._resumed = True
    elif restored is not None:
      state, step = restored
      self.train_step.assign(state)
      self._step = step
      self._resumed = True
      self.print_fn(f"Resumed from {self.manager.path(step)} at step {step}")
    elif self.settings.init_checkpoint:
      self._initialize_from(self.settings.init_checkpoint,
                            self.settings.init_checkpoint_modules,
                            self.settings.init_checkpoint_prefix)

  def _initialize_from(self, checkpoint, modules, prefix=None):
    """Fine-tuning init through TensorFlow's readers (`init_weights_tf`)."""
    with tempfile.TemporaryDirectory() as scratch:
      config = os.path.join(scratch, "config.gin")
      with open(config, "w") as f:
        f.write(gin.config_str())
      weights = os.path.join(scratch, "init.weights.h5")
      env = dict(os.environ, KERAS_BACKEND="tensorflow",
                 CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                 PYTHONPATH=os.pathsep.join(
                     [_REPO_ROOT] + [p for p in [os.environ.get("PYTHONPATH")]
                                     if p]))
      proc = subprocess.run(
          [sys.executable, "-m", "official_shapemask.training.init_weights_tf",
           config, checkpoint, modules, prefix or "", weights],
          env=env, capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [
            f"exit status {proc.returncode}"]
        raise experiment.InvalidInputError(lines[-1])
      if proc.stdout.strip():
        self.print_fn(proc.stdout.rstrip())
      self.model.load_weights(weights)

  @property
  def step(self):
    return self._step

  def close(self):
    """Finishes evaluations and saves; returns the wall time since `start`."""
    try:
      self._collect_evaluations(wait=True)
    finally:
      if self._evaluator is not None:
        self._evaluator.close()
      if self.manager is not None:
        self.manager.close()
    return self.timer.elapsed() if self.timer else 0.0

  # --------------------------------------------------------------- training
  def _input_context(self):
    """This process's share of the input: one pipeline per process."""
    return tf.distribute.InputContext(
        num_input_pipelines=self.num_processes,
        input_pipeline_id=jax.process_index(),
        num_replicas_in_sync=self.num_processes)

  def _check_batch(self, global_batch, setting):
    devices = jax.device_count()
    if global_batch % devices:
      raise experiment.InvalidInputError(
          f"{setting}={global_batch} is not a multiple of the {devices} "
          "devices")

  def _make_iterator(self):
    s = self.settings
    # Names a file that is no TFRecord before the step is traced.
    experiment.check_record_files(s.train_file_pattern, "train_file_pattern")
    dataset_fn = experiment.make_train_dataset_fn(
        s.train_file_pattern, self.train_batch_size, self.model,
        self.use_bfloat16, s.deterministic_input)
    return _naming_damaged_files(
        dataset_fn(self._input_context()).as_numpy_iterator(),
        s.train_file_pattern, "train_file_pattern")

  def _learning_rate(self, step):
    # The optimizer's own `learning_rate` reads its step counter, whose
    # buffer the compiled step has consumed: use a copy of the schedule.
    lr = self._schedule
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
      lr = lr(step)
    return float(keras.ops.convert_to_numpy(lr))

  def _weights_finite(self):
    return all(bool(np.isfinite(np.asarray(v)).all()) for v in self.state[0])

  def _divergence_error(self, reason, step, bad_losses):
    """The TF loop's error for a non-finite or exploding step loss."""
    limit = self._guard.limit()
    if limit is None:
      limit = self._guard.limit_from_first(self._first_loss)
    return divergence.stop_error(
        self._guard, reason, step, bad_losses["total_loss"],
        train_loop.format_losses(bad_losses), limit,
        self.manager.latest_checkpoint)

  def train(self, until_step=None):
    """Trains to `until_step` (default total_steps), checkpointing.

    Raises:
      train_loop.NonFiniteLossError: a loss (or, at a checkpoint, a weight)
        became NaN or infinite; names the step.
      train_loop.LossExplosionError: a step's total loss exceeded the
        explosion limit (`divergence.LossGuard`); names the step.
        In both cases nothing from that round is saved, so the latest
        checkpoint is the last good one.
    """
    until_step = min(until_step or self.total_steps, self.total_steps)
    if self._iterator is None:
      self._iterator = self._make_iterator()
      # The input parser is configured now: the operative config is whole.
      self._config.training_begins(resumed=self._resumed, step=self._step)
      self._logger = train_loop.ProgressLogger(
          self.total_steps, self.train_batch_size,
          summary_dir=os.path.join(self.model_dir, "train")
          if self.chief else None, print_fn=self.print_fn)
    losses = {}
    step = self._step
    while step < until_step:
      self._collect_evaluations(wait=False)
      num = min(self.steps_per_loop, until_step - step,
                self.checkpoint_every - step % self.checkpoint_every)
      t = train_loop.Timer()
      history = []
      for _ in range(num):
        images, labels = next(self._iterator)
        batch = jax_step.shard_batch((images, labels), self.distribution)
        self.state, step_losses = self.train_step(self.state, *batch)
        history.append(step_losses)
      history = jax.device_get(history)  # Waits for the round's last step.
      seconds = t.elapsed()
      if self._first_loss is None and history:
        self._first_loss = float(history[0]["total_loss"])
      for i, values in enumerate(history):
        reason = self._guard.check(values["total_loss"],
                                   first=self._first_loss)
        if reason is not None:
          raise self._divergence_error(
              reason, step + i + 1, {k: float(v) for k, v in values.items()})
      step += num
      self._step = step
      losses = {k: float(np.mean([h[k] for h in history]))
                for k in jax_step.LOSS_KEYS}
      self._guard.record(losses["total_loss"])
      self._trained_steps += num
      self._train_seconds += seconds
      self._logger.log(step, losses, self._learning_rate(step), seconds, num)
      if step % self.checkpoint_every == 0 or step >= until_step:
        if not self._weights_finite():
          raise train_loop.NonFiniteLossError(
              f"non-finite weights after step {step}; training stopped, the "
              f"last good checkpoint is kept: {self.manager.latest_checkpoint}")
        self._config.before_save()
        self.manager.save(step, self.state)
    if step >= self.total_steps:
      self.train_step.assign(self.state)
      path = jax_checkpoints.write_keras_weights(
          self.model, paths.model_weights_path(self.model_dir, step))
      if path:
        self.print_fn(f"Wrote the weights for export: {path}")
    return losses

  # ------------------------------------------------------------- evaluation
  def evaluate(self):
    """COCO box + mask metrics of the current weights on the eval set.

    Writes `model_dir/eval_<step>.json` and TensorBoard scalars, prints the
    table, and returns the metrics. Inside `train_and_eval` before the last
    step, COCOeval runs in the background and this returns None; the
    results are published when it finishes (at the latest at `close`).
    """
    s = self.settings
    experiment.check_record_files(s.eval_file_pattern, "eval_file_pattern")
    dataset = experiment.make_eval_dataset(
        s.eval_file_pattern, self.eval_batch_size, self.model,
        self.use_bfloat16)
    background = (self._mode == "train_and_eval" and self.background_eval
                  and self._step < self.total_steps)
    if self._evaluator is None:
      self._evaluator = coco_evaluator.COCOEvaluator(
          annotation_file=s.val_json_file, mask_eval_class=s.mask_eval_class,
          run_in_background=self.background_eval or False)
    evaluator = self._evaluator
    evaluator.reset()
    step = self._step
    t = train_loop.Timer()
    seen = 0
    for images, labels in _naming_damaged_files(
        dataset.as_numpy_iterator(), s.eval_file_pattern,
        "eval_file_pattern"):
      batch = jax_step.replicate_batch((images, labels["image_info"]),
                                       self.distribution)
      outputs = jax.device_get(self.predict_step(self.state, *batch))
      if self.chief:
        evaluator.update(outputs, labels["groundtruths"])
      seen += int((labels["groundtruths"]["source_id"] >= 0).sum())
      if s.eval_samples and seen >= s.eval_samples:
        break
    predict_seconds = t.elapsed()
    if not self.chief:
      return None
    extra = {"predict_seconds": predict_seconds,
             "num_images": evaluator.num_images, "step": step}
    if background:
      self._pending_evals.append((extra, evaluator.evaluate_async()))
      return None
    self._collect_evaluations(wait=True)
    metrics = evaluator.evaluate()
    metrics.update(extra)
    return eval_results.publish(self.model_dir, metrics, print_fn=self.print_fn)

  def _collect_evaluations(self, wait):
    """Publishes the background evaluations that finished (or all)."""
    while self._pending_evals:
      extra, future = self._pending_evals[0]
      if not wait and not future.done():
        return
      self._pending_evals.pop(0)
      metrics = future.result()
      metrics.update(extra)
      eval_results.publish(self.model_dir, metrics, print_fn=self.print_fn)

  # ------------------------------------------------------------ checkpoints
  def latest_checkpoint(self):
    """The newest checkpoint folder in `model_dir/checkpoints`, or None."""
    return self.manager.latest_checkpoint

  def checkpoints_iterator(self, timeout):
    """Yields each new checkpoint until none appears within `timeout` s."""
    seen = set()
    deadline = time.time() + timeout
    while True:
      new = [s for s in self.manager.all_steps() if s not in seen]
      if new:
        step = max(new)
        seen.update(new)
        yield self.manager.path(step)
        deadline = time.time() + timeout
      elif time.time() > deadline:
        return
      else:
        time.sleep(1.0)

  def has_checkpoint(self):
    """Whether `model_dir` holds a checkpoint of either engine (before
    `start` too)."""
    return any_engine.newest_step(self.model_dir) is not None

  def restore(self, checkpoint_path):
    """Loads a checkpoint (a `model_dir/checkpoints/<step>` folder).

    Writes the operative config to `model_dir/eval_config.gin` (never
    `config.gin`, the training run's).

    Raises:
      experiment.InvalidInputError: naming the checkpoint, when it cannot
        be read or does not match the model.
    """
    step = int(os.path.basename(os.path.normpath(checkpoint_path)))
    state, self._step = self.manager.restore(step)
    self.state = self.train_step.place(state)
    if self.chief:
      operative_config.write_eval_config(self.model_dir)
    return self._step

  def restore_latest(self):
    """Restores the newest readable checkpoint of `model_dir` (evaluation).

    A damaged newer checkpoint is named and left where it is.

    Raises:
      experiment.InvalidInputError: `model_dir` holds no checkpoint, none
        can be read, or the newest readable one does not match the model
        (named).
    """
    # The TensorFlow engine's step, when newer (engine_switch: prints the
    # line).
    switched = engine_switch.restore_for_eval(
        self.model, self.optimizer, self.model_dir, "jax",
        print_fn=self.print_fn)
    if switched is not None:
      self._step = switched.step
      self.state = self.train_step.state()
      if self.chief:
        operative_config.write_eval_config(self.model_dir)
      return switched.path
    restored = self.manager.restore_newest_readable(
        move_unreadable=False, print_fn=self.print_fn)
    if restored is None:
      raise experiment.InvalidInputError(f"no checkpoint in {self.model_dir}")
    state, self._step = restored
    self.state = self.train_step.place(state)
    if self.chief:
      operative_config.write_eval_config(self.model_dir)
    return self.manager.path(self._step)

  @property
  def trained_steps(self):
    return self._trained_steps

  @property
  def train_images_per_second(self):
    if not self._train_seconds:
      return 0.0
    return self._trained_steps * self.train_batch_size / self._train_seconds
