"""The TensorFlow engine: a `tf.distribute` strategy and its training loop.

`--strategy` picks the strategy (`training/strategies.py`: `tpu`,
`mirrored`, `multi_worker`, `one_device`); model and optimizer are built in
its scope, with batch-norm moving statistics MEAN-aggregated over the
replicas. `train_loop.TrainLoop` runs a round of steps per `tf.function`
call; the per-replica batch is `global / replicas`, each replica
normalising its own. Checkpoints are `tf.train.CheckpointManager`'s
`model_dir/ckpt-<step>` (a multi-worker run's other workers write to
`model_dir/workers/<task>`, the MWMS pattern). Evaluation batches are split
over the replicas and their outputs gathered.
"""

import os
import re

import keras
import tensorflow as tf

from official_shapemask.modeling import factory
from official_shapemask.training import optimizers
from official_shapemask.training import run_lock
from official_shapemask.training import settings as settings_lib
from official_shapemask.training import strategies
from official_shapemask.training import train_loop
from official_shapemask.training.engines import base
from official_shapemask.weights import checkpoints
from official_shapemask.weights import init_checkpoint as init_ckpt

_STEP = re.compile(r"-(\d+)$")


class Engine(base.Engine):
  """`KERAS_BACKEND=tensorflow` (the default): see the module."""

  BFLOAT16_PLATFORMS = ("tpu",)
  BACKEND = "tensorflow"

  def __init__(self, settings, print_fn=print):
    super().__init__(settings, print_fn)
    self.strategy = None
    self.checkpoint = None
    self.ckpt_dir = settings.model_dir
    self._manager = None
    self._loop = None
    self._predict = None
    self._any = None

  @classmethod
  def has_checkpoint(cls, model_dir):
    return tf.train.get_checkpoint_state(model_dir) is not None

  def is_lock_holder(self):
    return run_lock.chief_process(self.settings.strategy_name, "tensorflow")

  def known_replicas(self):
    return strategies.known_num_replicas(self.settings.strategy_name)

  def _platform(self):
    if self.settings.strategy_name == "tpu":
      return "tpu"
    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"

  def start(self, mode, model_kwargs):
    s = self.settings
    self.use_bfloat16 = settings_lib.use_bfloat16(s, self._platform(),
                                                  self.BFLOAT16_PLATFORMS)
    self.strategy = strategies.build_strategy(s.strategy_name, tpu=s.tpu)
    self.chief = strategies.is_chief(self.strategy)
    self.num_replicas = self.strategy.num_replicas_in_sync
    self.batch_parts = (self.num_replicas, "replicas")
    self.num_processes = _num_workers(self.strategy)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if self.use_bfloat16 else "float32")
    with self.strategy.scope():
      # MEAN-aggregated BN moving statistics: identical on every replica.
      with strategies.replica_consistent_state():
        self.model = factory.build_shapemask_model(**model_kwargs)
      self.optimizer = optimizers.build_momentum_optimizer()
      self.optimizer.build(self.model.trainable_variables)
      self.checkpoint = tf.train.Checkpoint(model=self.model,
                                            optimizer=self.optimizer)
    if not self.chief and mode != "eval":
      # Non-chief workers write to a scratch directory (the MWMS pattern).
      self.ckpt_dir = os.path.join(
          s.model_dir, "workers", str(self.strategy.cluster_resolver.task_id))
    on_tpu = s.strategy_name == "tpu"
    self._loop = train_loop.TrainLoop(
        self.strategy, self.model, self.optimizer,
        gradient_clip_norm=s.gradient_clip_norm,
        jit_compile=on_tpu if s.jit_compile is None else bool(s.jit_compile),
        stop_checks=self.num_processes == 1)

  # ----------------------------------------------------------- checkpoints
  def remove_interrupted_saves(self):
    return checkpoints.remove_interrupted_saves(self.ckpt_dir)

  def restore_newest(self, move_unreadable):
    return checkpoints.restore_newest_readable(
        self.checkpoint, self.ckpt_dir, move_unreadable=move_unreadable,
        print_fn=self.print_fn)

  def restore(self, path):
    checkpoints.restore_checkpoint(self.checkpoint, path)
    return self.step

  def initialize_from(self, checkpoint, modules, prefix=None):
    init_ckpt.restore(self.model, checkpoint, modules, prefix=prefix,
                      print_fn=self.print_fn)

  def checkpoints(self):
    state = tf.train.get_checkpoint_state(self.ckpt_dir)
    if state is None:
      return []
    found = []
    for path in state.all_model_checkpoint_paths:
      match = _STEP.search(path)
      if match:
        found.append((int(match.group(1)), path))
    return sorted(found)

  def save(self, step):
    if self._manager is None:
      # Made after the restore, which may have moved checkpoints aside.
      self._manager = tf.train.CheckpointManager(
          self.checkpoint, self.ckpt_dir,
          max_to_keep=self.settings.max_checkpoints)
    return self._manager.save(checkpoint_number=step)

  # -------------------------------------------------------------- training
  def train_iterator(self, dataset_fn):
    return iter(self.strategy.distribute_datasets_from_function(dataset_fn))

  def run_steps(self, iterator, num_steps, stop_above=float("inf")):
    return self._loop.run(iterator, num_steps, stop_above)

  @property
  def step(self):
    return int(self.optimizer.iterations.numpy())

  def weights_finite(self):
    return all(bool(tf.reduce_all(tf.math.is_finite(v.value)))
               for v in self.model.trainable_variables)

  def request_stop(self):
    if self._loop is not None:
      self._loop.request_stop()

  def any_process(self, flag):
    if self.num_processes == 1:
      return bool(flag)
    if self._any is None:
      strategy = self.strategy

      @tf.function
      def any_true(value):
        counts = strategy.run(lambda: tf.identity(value))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, counts, axis=None)

      self._any = any_true
    return float(self._any(tf.constant(float(bool(flag))))) > 0

  # ------------------------------------------------------------ evaluation
  def _predict_fn(self):
    """Distributed inference: the batch is split over the replicas."""
    strategy, model = self.strategy, self.model

    def replica_fn(images, image_info):
      return model({"images": images, "image_info": image_info},
                   training=False)

    @tf.function
    def predict(images, image_info):
      n = strategy.num_replicas_in_sync
      if n == 1:
        return strategy.run(replica_fn, args=(images, image_info))
      per = images.shape[0] // n

      def split(tensor):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tensor[ctx.replica_id_in_sync_group * per:
                               (ctx.replica_id_in_sync_group + 1) * per])

      outputs = strategy.run(replica_fn,
                             args=(split(images), split(image_info)))
      return tf.nest.map_structure(lambda t: strategy.gather(t, axis=0),
                                   outputs)

    return predict

  def predict(self, images, image_info):
    if self._predict is None:
      self._predict = self._predict_fn()
    outputs = self._predict(tf.convert_to_tensor(images),
                            tf.convert_to_tensor(image_info))
    return {k: v.numpy() for k, v in outputs.items()}

  def close(self):
    if self.strategy is not None:
      strategies.shutdown(self.strategy)


def _num_workers(strategy):
  """Processes of a multi-worker strategy (1 for every other)."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1
  cluster = strategy.cluster_resolver.cluster_spec().as_dict()
  return max(1, sum(len(tasks) for job, tasks in cluster.items()
                    if job in ("chief", "worker")))
