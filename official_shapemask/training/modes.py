"""`train.py --mode=train|eval|train_and_eval`."""

import keras

from official_shapemask.training import experiment
from official_shapemask.training import run_lock


def _report_time(exp, print_fn):
  wall = exp.close()
  print_fn(f"Training time (strategy start to shutdown): {wall / 60:.2f} min "
           f"({wall:.1f} s); {exp.trained_steps} steps trained at "
           f"{exp.train_images_per_second:.2f} images/s")
  return wall


def train(exp, print_fn=print):
  """Trains to total_steps, checkpointing; prints the seed's timing."""
  try:
    exp.start("train")
    losses = exp.train()
  except BaseException:
    exp.close()
    raise
  wall = _report_time(exp, print_fn)
  return {"step": exp.step, "losses": losses, "wall_seconds": wall,
          "images_per_second": exp.train_images_per_second,
          "checkpoint": exp.manager.latest_checkpoint}


def train_and_eval(exp, print_fn=print):
  """Alternates training and evaluation every `eval_every` steps."""
  try:
    exp.start("train_and_eval")
    metrics = None
    while exp.step < exp.total_steps:
      boundary = (exp.step // exp.eval_every + 1) * exp.eval_every
      exp.train(min(boundary, exp.total_steps))
      if exp.step < exp.total_steps:
        exp.evaluate()
    metrics = exp.evaluate()  # Once more at the end.
  except BaseException:
    exp.close()
    raise
  wall = _report_time(exp, print_fn)
  return {"step": exp.step, "metrics": metrics, "wall_seconds": wall}


def evaluate(exp, eval_timeout=0, print_fn=print):
  """Evaluates the latest checkpoint, or each new one until the timeout."""
  results = []
  if not eval_timeout and not exp.has_checkpoint():
    # Before anything starts, so a mistyped --model_dir stays uncreated.
    raise experiment.InvalidInputError(
        f"--mode=eval: no checkpoint in {exp.model_dir} (give the "
        "--model_dir of a training run, or --eval_timeout to wait for one)")
  try:
    exp.start("eval")
    if not eval_timeout:
      exp.restore_latest()
      results.append(exp.evaluate())
    else:
      for path in exp.checkpoints_iterator(eval_timeout):
        exp.restore(path)
        results.append(exp.evaluate())
        if exp.step >= exp.total_steps:
          break
      if not results:
        print_fn(f"no checkpoint appeared in {exp.model_dir} within "
                 f"{eval_timeout} s")
  finally:
    exp.close()
  return results


def run(mode, model_dir, strategy_name="one_device", tpu=None, eval_timeout=0,
        print_fn=print):
  """Runs one mode of train.py with the parsed gin configuration.

  The Keras backend picks the engine: TensorFlow (default) runs the
  tf.distribute loop, `KERAS_BACKEND=jax` the JAX engine; both take their
  settings from the same gin-configured `Experiment`.

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
  backend = keras.backend.backend()
  exp = experiment.create(model_dir, strategy_name=strategy_name, tpu=tpu,
                          print_fn=print_fn)
  if backend == "jax":
    from official_shapemask.training import jax_engine  # pylint: disable=g-import-not-at-top
    exp = jax_engine.JaxExperiment(exp)
  if mode == "eval":
    return evaluate(exp, eval_timeout, print_fn)
  # A JAX process learns its index when it joins the others (a TPU pod
  # sets no KERAS_DISTRIBUTION_PROCESS_ID).
  chief = run_lock.chief_process(
      strategy_name, backend,
      process_index=exp.join_processes() if backend == "jax" else None)
  with run_lock.hold(model_dir, chief=chief, print_fn=print_fn):
    if mode == "train":
      return train(exp, print_fn)
    return train_and_eval(exp, print_fn)
