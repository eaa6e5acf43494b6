"""The JAX engine (`KERAS_BACKEND=jax`).

* Devices: `keras.distribution.DataParallel` over every device of every
  process (the model's variables are replicated, batches sharded on their
  first axis). Several hosts join through `keras.distribution.initialize`
  when a `KERAS_DISTRIBUTION_*` environment variable is set (the same
  command on every host; see README). TensorFlow only reads and parses data
  on the host CPU: it is denied every accelerator.
* Input: each process reads its own share of the training files
  (`input_pipeline_id = process_index`) and yields `global_batch /
  num_processes` images per step.
* Step: `jax_step.TrainStep`, one compiled step per batch, dispatched
  asynchronously at most one step ahead of the device; a round's losses
  are read once, at its end. A stop request (`request_stop`, SIGTERM) ends
  the round after the step that is running. The global
  batch is normalised as one unit (SPMD), in `global /
  per_replica_batch_size` groups when that is set, so any number of
  devices computes what the TensorFlow engine computes on replicas of that
  batch.
* Checkpoints: Orbax (`weights/jax_checkpoints`), asynchronous, in
  `model_dir/checkpoints/<step>`; the last step also writes
  `model_dir/shapemask-<step>.weights.h5` for the TensorFlow tools.
* Fine-tuning starts from any checkpoint TensorFlow's readers take, read in
  a TensorFlow subprocess (`training/init_weights_tf.py`).
* Evaluation: every process reads the whole evaluation set; the batch is
  split over all devices and the outputs come back replicated.
"""

import os
import subprocess
import sys
import tempfile
import threading

import gin
import jax
import keras
import numpy as np
import tensorflow as tf

import official_shapemask
from official_shapemask.modeling import factory
from official_shapemask.training import jax_step
from official_shapemask.training import optimizers
from official_shapemask.training import run_lock
from official_shapemask.training import settings as settings_lib
from official_shapemask.training.engines import base
from official_shapemask.weights import jax_checkpoints
from official_shapemask.weights import paths

_DISTRIBUTION_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES",
                     "KERAS_DISTRIBUTION_NUM_PROCESSES",
                     "KERAS_DISTRIBUTION_PROCESS_ID")
# The directory that holds the package (a checkout or site-packages).
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(
    os.path.abspath(official_shapemask.__file__)))


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


class Engine(base.Engine):
  """`KERAS_BACKEND=jax`: see the module."""

  BFLOAT16_PLATFORMS = ("tpu", "gpu")
  BACKEND = "jax"

  def __init__(self, settings, print_fn=print):
    super().__init__(settings, print_fn)
    hide_accelerators_from_tensorflow()
    self.manager = None
    self.state = None
    self.distribution = None
    self.train_step = None
    self.predict_step = None
    self._step = 0
    self._stop = threading.Event()

  @classmethod
  def has_checkpoint(cls, model_dir):
    return jax_checkpoints.has_checkpoint(model_dir)

  def is_lock_holder(self):
    # A TPU pod's processes learn their index only when they join (no
    # KERAS_DISTRIBUTION_PROCESS_ID is set).
    initialize_multi_host()
    return run_lock.chief_process(backend="jax",
                                  process_index=jax.process_index())

  def start(self, mode, model_kwargs):
    s = self.settings
    self.num_processes = initialize_multi_host()
    self.chief = jax.process_index() == 0
    self.distribution = jax_step.data_parallel()
    keras.distribution.set_distribution(self.distribution)
    self.num_replicas = 1  # The global batch is one SPMD computation.
    self.batch_parts = (jax.device_count(), "devices")
    self.use_bfloat16 = settings_lib.use_bfloat16(s, jax.default_backend(),
                                                  self.BFLOAT16_PLATFORMS)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if self.use_bfloat16 else "float32")
    self.model = factory.build_shapemask_model(**model_kwargs)
    self.optimizer = optimizers.build_momentum_optimizer()
    self.train_step = jax_step.TrainStep(
        self.model, self.optimizer, gradient_clip_norm=s.gradient_clip_norm,
        distribution=self.distribution)
    self.predict_step = jax_step.PredictStep(self.model, self.distribution)
    self.manager = jax_checkpoints.CheckpointManager(
        s.model_dir, self.train_step, max_to_keep=s.max_checkpoints,
        read_only=mode == "eval")
    self.state = self.train_step.state()
    self.print_fn(
        f"JAX engine: {jax.device_count()} {jax.default_backend()} device(s) "
        f"in {self.num_processes} process(es), "
        f"{'mixed_bfloat16' if self.use_bfloat16 else 'float32'}")

  # ----------------------------------------------------------- checkpoints
  def restore_newest(self, move_unreadable):
    # Damaged newer steps are named and, by the chief, moved into
    # model_dir/unreadable (the other processes only skip them).
    restored = self.manager.restore_newest_readable(
        move_unreadable=move_unreadable and self.chief,
        print_fn=self.print_fn)
    if restored is None:
      return None
    state, self._step = restored
    self.state = self.train_step.place(state)
    return self.manager.path(self._step)

  def restore(self, path):
    step = int(os.path.basename(os.path.normpath(path)))
    state, self._step = self.manager.restore(step)
    self.state = self.train_step.place(state)
    return self._step

  def adopt_keras_state(self, step):
    self._step = step
    self.state = self.train_step.state()

  def initialize_from(self, checkpoint, modules, prefix=None):
    """Fine-tuning init through TensorFlow's readers (`init_weights_tf`)."""
    with tempfile.TemporaryDirectory() as scratch:
      config = os.path.join(scratch, "config.gin")
      with open(config, "w") as f:
        f.write(gin.config_str())
      weights = os.path.join(scratch, "init.weights.h5")
      env = dict(os.environ, KERAS_BACKEND="tensorflow",
                 CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2",
                 PYTHONPATH=os.pathsep.join(
                     [_PACKAGE_ROOT] + [p for p in [os.environ.get(
                         "PYTHONPATH")] if p]))
      proc = subprocess.run(
          [sys.executable, "-m", "official_shapemask.training.init_weights_tf",
           config, checkpoint, modules, prefix or "", weights],
          env=env, capture_output=True, text=True, check=False)
      if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [
            f"exit status {proc.returncode}"]
        raise settings_lib.InvalidInputError(lines[-1])
      if proc.stdout.strip():
        self.print_fn(proc.stdout.rstrip())
      self.model.load_weights(weights)
    self.state = self.train_step.state()

  def checkpoints(self):
    return [(step, self.manager.path(step))
            for step in self.manager.all_steps()]

  def latest_checkpoint(self):
    return self.manager.latest_checkpoint

  def save(self, step):
    self.manager.save(step, self.state)
    return self.manager.path(step)

  def wait_for_saves(self):
    self.manager.wait()

  def export_weights(self, step):
    self.train_step.assign(self.state)
    return jax_checkpoints.write_keras_weights(
        self.model, paths.model_weights_path(self.settings.model_dir, step))

  # -------------------------------------------------------------- training
  def train_iterator(self, dataset_fn):
    context = tf.distribute.InputContext(
        num_input_pipelines=self.num_processes,
        input_pipeline_id=jax.process_index(),
        num_replicas_in_sync=self.num_processes)
    return dataset_fn(context).as_numpy_iterator()

  def run_steps(self, iterator, num_steps, stop_above=float("inf")):
    del stop_above  # Reading a loss before the round ends would sync.
    history = []
    for _ in range(num_steps):
      images, labels = next(iterator)
      batch = jax_step.shard_batch((images, labels), self.distribution)
      self.state, losses = self.train_step(self.state, *batch)
      history.append(losses)
      if len(history) > 1:
        # At most one step ahead of the device: the next batch is placed
        # while a step runs, and a stop request ends the round after the
        # step that is running (the one dispatched just now) instead of
        # after a round's worth of queued steps.
        jax.block_until_ready(history[-2])
      if self._stop.is_set() and self.num_processes == 1:
        break
    history = jax.device_get(history)  # Waits for the round's last step.
    self._step += len(history)
    return [{k: float(v) for k, v in h.items()} for h in history]

  @property
  def step(self):
    return self._step

  def weights_finite(self):
    return all(bool(np.isfinite(np.asarray(v)).all()) for v in self.state[0])

  def request_stop(self):
    self._stop.set()

  def any_process(self, flag):
    if self.num_processes == 1:
      return bool(flag)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(bool(flag)))
    return bool(np.any(flags))

  # ------------------------------------------------------------ evaluation
  def predict(self, images, image_info):
    batch = jax_step.replicate_batch((images, image_info), self.distribution)
    return jax.device_get(self.predict_step(self.state, *batch))

  def close(self):
    if self.manager is not None:
      self.manager.close()
