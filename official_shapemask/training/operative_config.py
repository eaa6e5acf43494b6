"""The run's operative gin config, kept in its model directory.

`model_dir/config.gin` is the operative config of the training that wrote
the directory's checkpoints (the file to export or predict with). The rule,
the same for every training engine (`TrainingConfigRecorder`):

* a fresh run (no checkpoint in `model_dir`) writes it when training begins;
* a resumed run writes it just before it saves its first checkpoint, so a
  run that saves nothing (a failed start, a resume already at its total
  steps, a run that diverges before its first checkpoint) leaves it alone;
* an existing `config.gin` that differs from the new one is kept as
  `config-<step>.gin` (`<step>`: the step the new config trains from, 0
  for a fresh run; `config-<step>-2.gin`, ... when taken);
* an evaluation writes `eval_config.gin` instead, after it restored a
  checkpoint.

Kept apart from `gin_utils` (parsing), which imports every configurable
module to register them; the controller writes the operative config
through this module.
"""

import os
import uuid

import gin
import tensorflow as tf

CONFIG_FILE = "config.gin"
EVAL_CONFIG_FILE = "eval_config.gin"


def _read(path):
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def _write_atomic(path, text):
  directory = os.path.dirname(path)
  tmp = os.path.join(directory,
                     f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path


def _free_name(model_dir, step):
  path = os.path.join(model_dir, f"config-{step}.gin")
  n = 1
  while tf.io.gfile.exists(path):
    n += 1
    path = os.path.join(model_dir, f"config-{step}-{n}.gin")
  return path


def write_training_config(model_dir, step):
  """Makes `config.gin` gin's operative config, keeping a different old one.

  Args:
    model_dir: the run's directory (created if missing).
    step: int, the step the training continues from (names the kept file).

  Returns:
    `(path, kept)`: the `config.gin` path and the path the earlier, different
    `config.gin` was renamed to (None when there was none or it was equal).
  """
  tf.io.gfile.makedirs(model_dir)
  final = os.path.join(model_dir, CONFIG_FILE)
  text = gin.operative_config_str()
  old = _read(final)
  if old == text:
    return final, None
  kept = None
  if old is not None:
    kept = _write_atomic(_free_name(model_dir, int(step)), old)
  _write_atomic(final, text)  # config.gin never goes missing.
  return final, kept


def write_eval_config(model_dir):
  """Writes gin's operative config to `model_dir/eval_config.gin`."""
  tf.io.gfile.makedirs(model_dir)
  return _write_atomic(os.path.join(model_dir, EVAL_CONFIG_FILE),
                       gin.operative_config_str())


class TrainingConfigRecorder:
  """Applies the module's rule for one training process.

  Call `training_begins` once the training input and model are configured
  (gin's operative config then holds every setting used), and
  `before_save()` before each checkpoint save.

  Args:
    model_dir: the run's directory.
    enabled: False on workers that do not write (multi-worker non-chief).
    print_fn: reports a kept earlier config (None = silent).
  """

  def __init__(self, model_dir, enabled=True, print_fn=print):
    self.model_dir = model_dir
    self.enabled = bool(enabled)
    self.print_fn = print_fn
    self._pending = False
    self._step = 0

  def training_begins(self, resumed, step=0):
    """Writes now for a fresh run, or waits for the first save (resumed).

    Args:
      resumed: bool, the run restored a checkpoint of `model_dir`.
      step: int, the step training continues from.
    """
    if not self.enabled:
      return
    self._step = int(step)
    if resumed:
      self._pending = True
    else:
      self._write()

  def before_save(self):
    """Writes the deferred config of a resumed run before its first save."""
    if self.enabled and self._pending:
      self._write()
      self._pending = False

  def _write(self):
    path, kept = write_training_config(self.model_dir, self._step)
    if kept and self.print_fn is not None:
      self.print_fn(f"{path} now holds this run's config; the earlier one "
                    f"is kept as {kept}")
