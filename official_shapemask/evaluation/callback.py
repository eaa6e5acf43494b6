"""Keras callback: COCO box/mask evaluation during `model.fit`.

Every `every_n_epochs` epochs the callback runs the model over the eval
`tf.data` dataset (`(images, labels)` batches of the eval parser), feeds a
`COCOEvaluator`, and puts the metrics into the epoch's `logs`, so that
callbacks placed after it (`ModelCheckpoint(monitor='mask_AP', mode='max')`,
`EarlyStopping`) and `History` see them; optionally it writes them to
TensorBoard and prints a compact table.

The ground truth (`labels['groundtruths']`, with `tf.string` PNG masks) is
converted to numpy on the host and never given to the model.
"""
import keras
import numpy as np
import tensorflow as tf

from official_shapemask.evaluation import coco_evaluator


def _to_numpy(value):
  return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


class COCOEvalCallback(keras.callbacks.Callback):
  """Evaluates COCO box and mask AP at the end of every n-th epoch.

  Place it before `ModelCheckpoint` / `EarlyStopping` in the callback list.

  Args:
    eval_dataset: `tf.data.Dataset` of `(images [B, S, S, 3], labels)` from
      the eval parser; `labels` has `image_info` [B, 4, 2] and
      `groundtruths` (docs/contracts.md).
    every_n_epochs: int, evaluate after epochs n, 2n, ... (default 1).
    annotation_file: str or None; COCO JSON of the eval set. None: ground
      truth from the batches' `groundtruths` (needs their `masks_png`).
    log_dir: str or None; TensorBoard directory for the metric scalars (at
      the optimizer's iteration count).
    mask_eval_class: 'all' | 'voc' | 'nonvoc' (adds `novel_mask_*` metrics).
    max_batches: int or None; evaluate only the first batches (smoke runs).
    verbose: int, 1 prints the metrics table.
    include_mask: bool, evaluate masks too (default True).
    per_category_metrics: bool, add per-category APs.
    run_in_background: False (default), 'thread', 'process' or True
      ('process'). When set, COCOeval of epoch e runs in the background and
      its metrics are added to the logs of the first epoch end after it has
      finished (so monitors lag by at least one evaluation); the last one is
      waited for in `on_train_end` (printed and written to TensorBoard only).
  """

  def __init__(self,
               eval_dataset,
               every_n_epochs=1,
               annotation_file=None,
               log_dir=None,
               mask_eval_class="all",
               max_batches=None,
               verbose=1,
               include_mask=True,
               per_category_metrics=False,
               run_in_background=False):
    super().__init__()
    if int(every_n_epochs) < 1:
      raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}.")
    if max_batches is not None and int(max_batches) < 1:
      raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}.")
    self._dataset = eval_dataset
    self._every_n_epochs = int(every_n_epochs)
    self._log_dir = log_dir
    self._max_batches = None if max_batches is None else int(max_batches)
    self._verbose = verbose
    self._background = bool(run_in_background)
    self._evaluator = coco_evaluator.COCOEvaluator(
        annotation_file=annotation_file,
        include_mask=include_mask,
        per_category_metrics=per_category_metrics,
        mask_eval_class=mask_eval_class,
        run_in_background=run_in_background)
    self._writer = None
    self._pending = []  # (epoch, step, num_images, Future)
    # (epoch, metrics dict) of every finished evaluation, in order.
    self.results = []

  # ----------------------------------------------------------- evaluation
  def _accumulate(self):
    """Runs the model over the eval dataset and feeds the evaluator."""
    self._evaluator.reset()
    for i, (images, labels) in enumerate(self._dataset):
      if self._max_batches is not None and i >= self._max_batches:
        break
      if isinstance(images, dict):
        images = images["images"]
      outputs = self.model.predict_on_batch(_to_numpy(images))
      predictions = {k: np.asarray(keras.ops.convert_to_numpy(v))
                     for k, v in outputs.items()}
      predictions["image_info"] = _to_numpy(labels["image_info"])
      groundtruths = {k: _to_numpy(v)
                      for k, v in labels["groundtruths"].items()}
      self._evaluator.update(predictions, groundtruths)
    if not self._evaluator.num_images:
      raise ValueError("COCOEvalCallback: the eval dataset yielded no image.")

  def _step(self, epoch):
    optimizer = getattr(self.model, "optimizer", None)
    if optimizer is not None and hasattr(optimizer, "iterations"):
      return int(keras.ops.convert_to_numpy(optimizer.iterations))
    return epoch + 1

  def _report(self, epoch, step, num_images, metrics, logs):
    self.results.append((epoch, metrics))
    if logs is not None:
      logs.update(metrics)
    if self._log_dir:
      if self._writer is None:
        self._writer = tf.summary.create_file_writer(self._log_dir)
      with self._writer.as_default(step=step):
        for name, value in metrics.items():
          tf.summary.scalar(name, value)
      self._writer.flush()
    if self._verbose:
      print(f"\nCOCO evaluation after epoch {epoch + 1} (step {step}, "
            f"{num_images} images):\n"
            + coco_evaluator.format_metrics_table(metrics))

  def _collect_finished(self, logs, wait=False):
    still_pending = []
    for epoch, step, num_images, future in self._pending:
      if wait or future.done():
        self._report(epoch, step, num_images, future.result(), logs)
      else:
        still_pending.append((epoch, step, num_images, future))
    self._pending = still_pending

  # ------------------------------------------------------------- callbacks
  def on_epoch_end(self, epoch, logs=None):
    if self._pending:
      self._collect_finished(logs)
    if (epoch + 1) % self._every_n_epochs:
      return
    self._accumulate()
    step = self._step(epoch)
    num_images = self._evaluator.num_images
    if self._background:
      self._pending.append(
          (epoch, step, num_images, self._evaluator.evaluate_async()))
    else:
      self._report(epoch, step, num_images, self._evaluator.evaluate(), logs)

  def on_train_end(self, logs=None):
    try:
      self._collect_finished(None, wait=True)
    finally:
      self._evaluator.close()
      if self._writer is not None:
        self._writer.flush()
