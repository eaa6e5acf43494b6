"""What a training run prints and logs per round, for every engine.

`ProgressLogger` prints one line per round (step, losses, learning rate,
images/s, ETA) and writes the same numbers as TensorBoard scalars under
`model_dir/train`; `Timer` is the seed's measure of a run (strategy start to
shutdown).
"""

import time

import numpy as np
import tensorflow as tf

from official_shapemask.modeling import shapemask_model

LOSS_KEYS = shapemask_model.LOSS_KEYS


def format_losses(losses):
  """`total_loss=... model_loss=... ...` in the order of `LOSS_KEYS`."""
  return " ".join(f"{k}={losses[k]:.4f}" for k in LOSS_KEYS if k in losses)


def mean_losses(history):
  """The mean of each loss over a round's per-step loss dicts."""
  return {k: float(np.mean([float(h[k]) for h in history]))
          for k in LOSS_KEYS if k in history[0]}


class ProgressLogger:
  """One line per round: step, losses, LR, images/s and ETA; TensorBoard.

  Args:
    total_steps: the run's last step (for the ETA).
    global_batch_size: images per step (for images/s).
    summary_dir: where the `train/*` scalars go (None: nowhere, e.g. a
      process that is not the chief).
    print_fn: where the line goes.
  """

  def __init__(self, total_steps, global_batch_size, summary_dir=None,
               print_fn=print):
    self.total_steps = int(total_steps)
    self.global_batch_size = int(global_batch_size)
    self.print_fn = print_fn
    self.writer = (tf.summary.create_file_writer(summary_dir)
                   if summary_dir else None)
    self._history = []

  def log(self, step, losses, learning_rate, seconds, num_steps):
    """Prints and records one round of `num_steps` steps ending at `step`."""
    images_per_s = self.global_batch_size * num_steps / max(seconds, 1e-9)
    self._history.append(seconds / max(num_steps, 1))
    per_step = float(np.median(self._history[-20:]))
    eta = per_step * max(self.total_steps - step, 0)
    parts = format_losses(losses)
    self.print_fn(
        f"step {step}/{self.total_steps} {parts} lr={learning_rate:.5g} "
        f"{images_per_s:.2f} img/s eta {_format_seconds(eta)}", flush=True)
    if self.writer is not None:
      with self.writer.as_default(step=step):
        for k, v in losses.items():
          tf.summary.scalar(f"train/{k}", v)
        tf.summary.scalar("train/learning_rate", learning_rate)
        tf.summary.scalar("train/images_per_second", images_per_s)
      self.writer.flush()
    return images_per_s


def _format_seconds(seconds):
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Timer:
  """Wall time from strategy start to shutdown (the seed's measure)."""

  def __init__(self):
    self.start = time.time()

  def elapsed(self):
    return time.time() - self.start
