"""The run's operative gin config, written into its model directory.

Kept apart from `gin_utils` (parsing), which imports every configurable
module, `experiment` included, to register them: `experiment` writes the
operative config through this module, so neither imports the other.
"""

import os
import uuid

import gin
import tensorflow as tf


def write_operative_config(model_dir):
  """Writes gin's operative config to `model_dir/config.gin` atomically."""
  tf.io.gfile.makedirs(model_dir)
  final = os.path.join(model_dir, "config.gin")
  tmp = os.path.join(model_dir, f".config.gin.{uuid.uuid4().hex}.tmp")
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(gin.operative_config_str())
  tf.io.gfile.rename(tmp, final, overwrite=True)
  return final
