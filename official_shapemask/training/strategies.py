"""tf.distribute strategy factory and replica-consistent model state.

`tpu` initialises the TPU system (the seed's training time starts there);
`mirrored` uses the local GPUs, or every logical CPU device when there is no
GPU; `multi_worker` reads TF_CONFIG; `one_device` runs on one device.

Keras 3 creates its non-trainable state (BatchNorm moving mean and variance)
with `aggregation="none"`. Under a multi-replica strategy such a
`MirroredVariable` assigned in replica context updates only the copy of the
replica that computed the value, so after one step every replica holds other
moving statistics (keras-team/keras#20601), and the checkpoint keeps replica
0's. `replica_consistent_state()` gives those variables `MEAN` aggregation:
each assignment is averaged over the replicas and written to every copy, as
tf_keras did.
"""

import contextlib
import json
import os

import keras
import tensorflow as tf

from official_shapemask.training import run_lock

STRATEGIES = ("tpu", "mirrored", "multi_worker", "one_device")


def build_strategy(name="one_device", tpu=None, device=None):
  """Builds a `tf.distribute.Strategy`.

  Args:
    name: one of `tpu`, `mirrored`, `multi_worker`, `one_device`.
    tpu: TPU name or address for `tpu` (None or '' = local TPU VM).
    device: device for `one_device` (default: first GPU if any, else CPU).

  Returns:
    the strategy.
  """
  if name not in STRATEGIES:
    raise ValueError(f"--strategy={name!r} is not one of {STRATEGIES}")
  if name == "tpu":
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
    if tpu not in (None, "", "local"):
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  if name == "mirrored":
    return tf.distribute.MirroredStrategy(mirrored_devices())
  if name == "multi_worker":
    if "TF_CONFIG" not in os.environ:
      raise ValueError("--strategy=multi_worker needs the TF_CONFIG "
                       "environment variable (cluster and task)")
    try:
      json.loads(os.environ["TF_CONFIG"])
    except json.JSONDecodeError as e:
      raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from e
    return tf.distribute.MultiWorkerMirroredStrategy()
  if device is None:
    device = "/gpu:0" if tf.config.list_logical_devices("GPU") else "/cpu:0"
  return tf.distribute.OneDeviceStrategy(device)


def mirrored_devices():
  """The devices of `mirrored`: the local GPUs, else the logical CPUs."""
  devices = [d.name for d in tf.config.list_logical_devices("GPU")]
  if not devices:  # Several logical CPUs only when configured so.
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
  return devices


def known_num_replicas(name):
  """Replicas of strategy `name` if known without starting it, else None.

  `one_device`: 1; `mirrored`: its local devices; `tpu` and `multi_worker`
  learn theirs when they start (None).
  """
  if name == "one_device":
    return 1
  if name == "mirrored":
    return len(mirrored_devices())
  return None


@contextlib.contextmanager
def replica_consistent_state():
  """Variables created here: non-trainable float state gets MEAN aggregation.

  Use inside `strategy.scope()` around the model build. Trainable variables
  (updated by the optimizer from all-reduced gradients) and variables that
  already name an aggregation are left alone.
  """

  def creator(next_creator, **kwargs):
    dtype = kwargs.get("dtype")
    floating = dtype is None or tf.as_dtype(dtype).is_floating
    aggregation = kwargs.get("aggregation")
    if (not kwargs.get("trainable", True) and floating and
        aggregation in (None, tf.VariableAggregation.NONE)):
      kwargs["aggregation"] = tf.VariableAggregation.MEAN
    return next_creator(**kwargs)

  with tf.variable_creator_scope(creator):
    yield


def per_replica_values(variable):
  """The copies of a (Keras or tf) variable, one per local replica."""
  if isinstance(variable, keras.Variable):
    variable = variable.value  # The backing tf.Variable.
  values = getattr(variable, "values", None)
  return list(values) if values is not None else [variable]


def shutdown(strategy):
  """Releases the accelerators (the seed's training time ends here)."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    tf.tpu.experimental.shutdown_tpu_system(
        strategy.cluster_resolver)


def is_chief(strategy):
  """True on the worker that writes checkpoints, summaries and configs."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not isinstance(
      strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  # Worker 0 only when the cluster has no chief job (the run lock's rule).
  return run_lock.is_chief_task(resolver.task_type, resolver.task_id,
                                resolver.cluster_spec().as_dict())
