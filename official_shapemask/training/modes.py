"""`train.py --mode=train|eval|train_and_eval`, for every engine."""

from official_shapemask.training import controller as controller_lib
from official_shapemask.training import run_lock
from official_shapemask.training import settings as settings_lib


def _report_time(run, print_fn):
  wall = run.close()
  print_fn(f"Training time (strategy start to shutdown): {wall / 60:.2f} min "
           f"({wall:.1f} s); {run.trained_steps} steps trained at "
           f"{run.train_images_per_second:.2f} images/s")
  return wall


def train(run, print_fn=print):
  """Trains to total_steps, checkpointing; prints the seed's timing."""
  try:
    run.start("train")
    losses = run.train()
  except BaseException:
    run.close()
    raise
  wall = _report_time(run, print_fn)
  return {"step": run.step, "losses": losses, "wall_seconds": wall,
          "images_per_second": run.train_images_per_second,
          "checkpoint": run.latest_checkpoint()}


def train_and_eval(run, print_fn=print):
  """Alternates training and evaluation every `eval_every` steps."""
  try:
    run.start("train_and_eval")
    while run.step < run.total_steps:
      boundary = (run.step // run.eval_every + 1) * run.eval_every
      run.train(min(boundary, run.total_steps))
      if run.step < run.total_steps:
        run.evaluate()
    metrics = run.evaluate()  # Once more at the end.
  except BaseException:
    run.close()
    raise
  wall = _report_time(run, print_fn)
  return {"step": run.step, "metrics": metrics, "wall_seconds": wall}


def evaluate(run, eval_timeout=0, print_fn=print):
  """Evaluates the latest checkpoint, or each new one until the timeout."""
  results = []
  if not eval_timeout and not run.has_checkpoint():
    # Before anything starts, so a mistyped --model_dir stays uncreated.
    raise settings_lib.InvalidInputError(
        f"--mode=eval: no checkpoint in {run.model_dir} (give the "
        "--model_dir of a training run, or --eval_timeout to wait for one)")
  try:
    run.start("eval")
    if not eval_timeout:
      run.restore_latest()
      results.append(run.evaluate())
    else:
      for path in run.checkpoints_iterator(eval_timeout):
        run.restore(path)
        results.append(run.evaluate())
        if run.step >= run.total_steps:
          break
      if not results:
        print_fn(f"no checkpoint appeared in {run.model_dir} within "
                 f"{eval_timeout} s")
  finally:
    run.close()
  return results


def run(mode, model_dir, strategy_name="one_device", tpu=None, eval_timeout=0,
        print_fn=print):
  """Runs one mode of train.py with the parsed gin configuration.

  The Keras backend picks the engine (`engines.load`): TensorFlow (default)
  runs the `tf.distribute` loop, `KERAS_BACKEND=jax` the JAX engine; one
  `controller.Controller` drives either, with the settings of the same
  gin-configured `Experiment`.

  The training modes hold `model_dir` for their whole run
  (`run_lock.hold`: the directory is writable and no other training run
  uses it, checked before anything is restored or written); `eval` only
  reads, without the lock.

  Raises:
    run_lock.RunDirError: `model_dir` is a file, cannot be written, or
      another training run holds it (named).
  """
  run_lock.check_model_dir(model_dir)
  if mode not in ("train", "train_and_eval", "eval"):
    raise ValueError(f"unknown mode {mode!r}")
  controller = controller_lib.build(model_dir, strategy_name=strategy_name,
                                    tpu=tpu, print_fn=print_fn)
  if mode == "eval":
    return evaluate(controller, eval_timeout, print_fn)
  chief = controller.engine.is_lock_holder()
  with run_lock.hold(model_dir, chief=chief, print_fn=print_fn):
    if mode == "train":
      return train(controller, print_fn)
    return train_and_eval(controller, print_fn)
