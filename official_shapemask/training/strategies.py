"""tf.distribute strategy factory.

`tpu` initialises the TPU system (the seed's training time starts there);
`mirrored` uses the local GPUs (or the CPU); `multi_worker` reads TF_CONFIG;
`one_device` runs on one device.
"""

import json
import os

import tensorflow as tf

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
    return tf.distribute.MirroredStrategy()
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
  task_type, task_id = resolver.task_type, resolver.task_id
  return task_type in (None, "chief") or (task_type == "worker" and
                                          task_id == 0)
