"""COCO evaluation of a run's current weights, in the foreground or not.

`Evaluations.run` predicts the evaluation batches with the engine's
`predict` and gives the outputs to one `COCOEvaluator` (on the chief only).
Inside `train_and_eval`, before the last step, COCOeval then runs in the
background (a spawned process by default) while training goes on;
`collect` publishes the evaluations that finished (`eval_results.publish`:
the table, `eval_<step>.json`, the `eval/` scalars), and `close` waits for
the rest. Every engine evaluates through this.
"""

from official_shapemask.evaluation import coco_evaluator
from official_shapemask.training import eval_results
from official_shapemask.training import progress


class Evaluations:
  """The evaluations of one run.

  Args:
    model_dir: where results go.
    settings: the run's `Settings` (`val_json_file`, `mask_eval_class`,
      `eval_samples`).
    background: how background COCOeval runs: 'process', 'thread' or False
      (always on the calling thread).
    print_fn: where the tables go.
  """

  def __init__(self, model_dir, settings, background="process",
               print_fn=print):
    self.model_dir = model_dir
    self.settings = settings
    self.background = background
    self.print_fn = print_fn
    self._evaluator = None
    self._pending = []

  @property
  def pending(self):
    """Evaluations whose COCOeval has not been published yet."""
    return len(self._pending)

  def run(self, predict, batches, step, chief=True, in_background=False,
          should_stop=None):
    """Evaluates the weights behind `predict` at `step`.

    Args:
      predict: `(images, image_info) -> outputs` (numpy).
      batches: iterable of `(images, {'image_info', 'groundtruths'})`.
      step: the training step of the weights.
      chief: whether this process scores and writes (others only predict,
        which may be a collective step).
      in_background: COCOeval off this thread (when `background` allows);
        then this returns None and `collect` publishes the result.
      should_stop: optional `() -> bool`; True abandons the evaluation
        (nothing is published) after the current batch.

    Returns:
      the metrics, or None (in the background, not the chief, abandoned).
    """
    s = self.settings
    if self._evaluator is None:
      self._evaluator = coco_evaluator.COCOEvaluator(
          annotation_file=s.val_json_file, mask_eval_class=s.mask_eval_class,
          run_in_background=self.background or False)
    evaluator = self._evaluator
    evaluator.reset()
    timer = progress.Timer()
    seen = 0
    for images, labels in batches:
      outputs = predict(images, labels["image_info"])
      if chief:
        evaluator.update(outputs, labels["groundtruths"])
      seen += int((labels["groundtruths"]["source_id"] >= 0).sum())
      if should_stop is not None and should_stop():
        evaluator.reset()
        return None
      if s.eval_samples and seen >= s.eval_samples:
        break
    predict_seconds = timer.elapsed()
    if not chief:
      return None
    extra = {"predict_seconds": predict_seconds,
             "num_images": evaluator.num_images, "step": step}
    if in_background and self.background:
      self._pending.append((extra, evaluator.evaluate_async()))
      return None
    self.collect(wait=True)
    metrics = evaluator.evaluate()
    metrics.update(extra)
    return eval_results.publish(self.model_dir, metrics,
                                print_fn=self.print_fn)

  def collect(self, wait):
    """Publishes the background evaluations that finished (or all)."""
    while self._pending:
      extra, future = self._pending[0]
      if not wait and not future.done():
        return
      self._pending.pop(0)
      metrics = future.result()
      metrics.update(extra)
      eval_results.publish(self.model_dir, metrics, print_fn=self.print_fn)

  def close(self):
    """Waits for the background evaluations, publishes them, shuts down."""
    try:
      self.collect(wait=True)
    finally:
      if self._evaluator is not None:
        self._evaluator.close()
        self._evaluator = None
