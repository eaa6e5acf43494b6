"""SIGTERM / SIGINT: the run stops after the running step, saved; the same
command resumes from that step (issue 18, preemption).

Three levels: `interrupt.SignalStop` alone (real signals to this process),
the controller with the TensorFlow engine in-process (the stop path and the
loop's in-graph stop, deterministic), and `train.py` in a subprocess for each
engine (a real SIGTERM once training runs, then the same command again) on
coco_tiny160 with a shrunken tiny_cpu.gin model.
"""
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import gin
import keras
import pytest
import tensorflow as tf

from official_shapemask.training import controller
from official_shapemask.training import gin_utils
from official_shapemask.training import interrupt
from official_shapemask.training import train_loop
from tests.training import test_train_cli_jax as cli_jax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 900
# test_train_cli_jax.py's smaller model (compile time), its own eval size.
SMALL = [b for b in cli_jax.SMALL if "eval_samples" not in b]
PROGRESS = re.compile(r"^step (\d+)/(\d+) total_loss=", re.M)


# ----------------------------------------------------------- SignalStop
def _wait_for(predicate, seconds=10.0):
  deadline = time.time() + seconds
  while not predicate():
    assert time.time() < deadline, "timed out"
    time.sleep(0.01)


def test_first_signal_calls_on_signal_once_then_handlers_come_back():
  calls, lines = [], []
  before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
  with interrupt.SignalStop(calls.append,
                            print_fn=lambda *a, **k: lines.append(a[0])) as stop:
    assert stop.active
    os.kill(os.getpid(), signal.SIGTERM)  # Would end pytest without it.
    _wait_for(lambda: calls)
    os.kill(os.getpid(), signal.SIGINT)  # Would raise KeyboardInterrupt.
    _wait_for(lambda: len(lines) == 2)
    watcher = stop._thread  # pylint: disable=protected-access
  assert calls == [signal.SIGTERM]
  assert stop.signum == signal.SIGTERM
  assert lines == [
      "Received SIGTERM: finishing the current step, then saving a "
      "checkpoint and exiting",
      "Received SIGINT while stopping: ignored (the current step finishes "
      "and its checkpoint is being written)"]
  # Afterwards: the handlers and the wakeup fd of before, no watcher.
  assert {s: signal.getsignal(s) for s in interrupt.SIGNALS} == before
  assert signal.set_wakeup_fd(-1) == -1
  assert not watcher.is_alive() and not stop.active


def test_off_the_main_thread_it_installs_nothing():
  before = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
  seen = {}

  def body():
    with interrupt.SignalStop(lambda signum: None) as stop:
      seen["active"] = stop.active
      seen["handlers"] = {s: signal.getsignal(s) for s in interrupt.SIGNALS}

  thread = threading.Thread(target=body)
  thread.start()
  thread.join()
  assert seen == {"active": False, "handlers": before}


def test_exit_status_and_the_one_line():
  assert interrupt.exit_status(signal.SIGTERM) == 143
  assert interrupt.exit_status(signal.SIGINT) == 130
  stop = interrupt.StopRequested(signal.SIGINT, 7, "/runs/a/ckpt-7")
  assert stop.exit_status == 130
  assert str(stop) == ("Stopped by SIGINT after step 7: saved in "
                       "/runs/a/ckpt-7; the same command resumes from that "
                       "step")
  assert str(interrupt.StopRequested(signal.SIGTERM, 0, None)) == (
      "Stopped by SIGTERM at step 0, before any step was trained: nothing to "
      "save; the same command starts the run")
  other = interrupt.StopRequested(None, 4, "/runs/a/ckpt-4")
  assert other.exit_status == 143
  assert str(other).startswith("Stopped with the other processes (one "
                               "received a signal) after step 4")


# ------------------------------------------- controller, TensorFlow engine
@pytest.fixture
def clean_gin():
  with gin.unlock_config():
    gin.clear_config()
  yield
  with gin.unlock_config():
    gin.clear_config()
  keras.mixed_precision.set_global_policy("float32")


def test_controller_saves_the_step_it_stopped_after_and_resumes(
    clean_gin, tiny_train_records, tmp_path):
  """A stop requested while round 1 (steps 1-3) is reported: the run saves
  step 3 although no checkpoint is due before step 100, says so in one
  line and raises; the training loop, asked to stop, ends a round after
  one step; a new run resumes from step 3 and trains to the end."""
  gin_utils.parse_config(["tiny_cpu.gin"], [
      f"TRAIN_FILE_PATTERN='{tiny_train_records}'", "TOTAL_STEPS=6",
      "STEPS_PER_LOOP=3", "CHECKPOINT_EVERY=100", *SMALL])
  model_dir = tmp_path / "run"
  printed = []

  def print_fn(*args, **kwargs):
    del kwargs
    printed.append(str(args[0]))
    if printed[-1].startswith("step 3/6 "):  # From the round's end.
      run.request_stop(signal.SIGTERM)

  run = controller.build(str(model_dir), print_fn=print_fn)
  try:
    run.start("train")
    with pytest.raises(interrupt.StopRequested) as err:
      run.train()
    assert run.step == 3
    checkpoint = str(model_dir / "ckpt-3")
    assert (err.value.signum, err.value.step, err.value.checkpoint) == (
        signal.SIGTERM, 3, checkpoint)
    assert printed[-1] == str(err.value)
    assert tf.train.latest_checkpoint(str(model_dir)) == checkpoint
    # The loop reads the stop variable after every step.
    assert len(run.engine.run_steps(run._iterator, 3)) == 1  # pylint: disable=protected-access
    assert run.step == 4
  finally:
    run.close()

  with gin.unlock_config():
    gin.clear_config()
  gin_utils.parse_config(["tiny_cpu.gin"], [
      f"TRAIN_FILE_PATTERN='{tiny_train_records}'", "TOTAL_STEPS=6",
      "STEPS_PER_LOOP=3", "CHECKPOINT_EVERY=100", *SMALL])
  printed.clear()
  again = controller.build(str(model_dir),
                           print_fn=lambda *a, **k: printed.append(str(a[0])))
  try:
    again.start("train")
    again.train()
  finally:
    again.close()
  assert f"Resumed from {checkpoint} at step 3" in printed
  assert [m.group(1) for m in map(PROGRESS.match, printed) if m] == ["6"]
  assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-6")


def test_a_stop_during_an_evaluation_abandons_it(
    clean_gin, tiny_train_records, tiny_val_records, tmp_path):
  """train_and_eval: a stop requested before an evaluation ends it after
  its first batch (nothing published); the step, saved at the evaluation
  boundary already, is not saved again."""
  gin_utils.parse_config(["tiny_cpu.gin"], [
      f"TRAIN_FILE_PATTERN='{tiny_train_records}'",
      f"EVAL_FILE_PATTERN='{tiny_val_records}'", "TOTAL_STEPS=4",
      "STEPS_PER_LOOP=2", "CHECKPOINT_EVERY=2", "EVAL_EVERY=2",
      "EVAL_SAMPLES=8", "EVAL_BATCH_SIZE=4", *SMALL])
  model_dir = tmp_path / "run"
  printed = []
  run = controller.build(str(model_dir),
                         print_fn=lambda *a, **k: printed.append(str(a[0])))
  try:
    run.start("train_and_eval")
    run.train(2)
    run.request_stop(signal.SIGINT)
    assert run.evaluate() is None
    assert run.evaluations.pending == 0
    with pytest.raises(interrupt.StopRequested) as err:
      run.check_stop()
  finally:
    run.close()
  assert (err.value.step, err.value.checkpoint, err.value.exit_status) == (
      2, str(model_dir / "ckpt-2"), 130)
  assert _checkpoint_steps(model_dir, "tensorflow") == [2]
  assert not list(model_dir.glob("eval_*.json"))
  assert not any(line.startswith("Evaluation at step") for line in printed)


def test_a_stop_requested_from_another_thread_ends_a_long_round():
  """The in-graph check, with the request coming from another thread
  while the loop's `tf.function` runs (as the signal watcher's does)."""
  inputs = keras.Input((4,))
  model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  with strategy.scope():
    optimizer = keras.optimizers.SGD(0.0)
    optimizer.build(model.trainable_variables)
  loop = train_loop.TrainLoop(strategy, model, optimizer)

  def replica_step(images, labels):
    del labels
    loss = tf.reduce_mean(model(images)) * 0.0 + 1.0
    optimizer.iterations.assign_add(1)
    return {k: loss for k in train_loop.LOSS_KEYS}

  loop.replica_step = replica_step
  dataset = tf.data.Dataset.from_tensors(
      (tf.ones((2, 4)), tf.zeros((2,)))).repeat()
  iterator = iter(strategy.experimental_distribute_dataset(dataset))
  assert len(loop.run(iterator, 2)) == 2  # Traced; no stop requested.
  many = 200_000  # Minutes of steps; the request comes after a second.
  timer = threading.Timer(1.0, loop.request_stop)
  timer.start()
  history = loop.run(iterator, many)
  timer.join()
  assert 1 <= len(history) < many
  assert int(optimizer.iterations.numpy()) == 2 + len(history)


# ------------------------------------------------ train.py, both engines
def _env(backend):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
             CUDA_VISIBLE_DEVICES="", KERAS_BACKEND=backend)
  if backend == "jax":
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _checkpoint_steps(model_dir, backend):
  if backend == "jax":
    folder = model_dir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isdigit()) if folder.is_dir() else []
  state = tf.train.get_checkpoint_state(str(model_dir))
  return sorted(int(p.rsplit("-", 1)[1])
                for p in state.all_model_checkpoint_paths) if state else []


@pytest.mark.parametrize("backend,mode", [
    ("tensorflow", "train_and_eval"),  # About a minute here.
    pytest.param("jax", "train", marks=pytest.mark.slow),  # Compiles.
])
def test_sigterm_saves_the_last_step_and_the_same_command_resumes(
    backend, mode, tiny_train_records, tiny_val_records, tmp_path):
  """SIGTERM once a progress line is out (then SIGINT, ignored): exit
  status 143, the step of the last progress line is saved and named in one
  line; the same command resumes from that step and finishes (and, in
  train_and_eval, evaluates the last step)."""
  if backend == "jax":
    pytest.importorskip("jax")
    pytest.importorskip("orbax.checkpoint")
  total = 30  # Far more steps than the signal needs to arrive.
  model_dir = tmp_path / "run"
  cmd = [sys.executable, str(REPO_ROOT / "train.py"),
         "--gin_file=tiny_cpu.gin", f"--model_dir={model_dir}",
         f"--mode={mode}",
         *[f"--gin_bindings={b}" for b in [
             f"TRAIN_FILE_PATTERN='{tiny_train_records}'",
             f"EVAL_FILE_PATTERN='{tiny_val_records}'", "EVAL_SAMPLES=8",
             f"TOTAL_STEPS={total}", "STEPS_PER_LOOP=2",
             "CHECKPOINT_EVERY=100", "EVAL_EVERY=100", *SMALL]]]
  log_path = tmp_path / "first.log"
  with open(log_path, "w") as log:
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(backend),
                             stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + TIMEOUT
      while not PROGRESS.search(log_path.read_text()):
        assert first.poll() is None, log_path.read_text()[-3000:]
        assert time.time() < deadline, "no progress line"
        time.sleep(0.05)
      time.sleep(0.3)  # Into the next round (not asserted: timing).
      first.send_signal(signal.SIGTERM)
      time.sleep(0.1)
      first.send_signal(signal.SIGINT)
      first.wait(timeout=TIMEOUT)
    finally:
      if first.poll() is None:
        first.kill()
        first.wait()
  text = log_path.read_text()
  assert first.returncode == 143, text[-3000:]
  assert "Traceback" not in text, text[-3000:]
  assert ("Received SIGTERM: finishing the current step, then saving a "
          "checkpoint and exiting") in text
  assert "Received SIGINT while stopping: ignored" in text
  # No completed step is lost: the last step reported is the one saved.
  steps = [int(m.group(1)) for m in PROGRESS.finditer(text)]
  last = steps[-1]
  assert 2 <= last < total, steps
  saved = _checkpoint_steps(model_dir, backend)
  assert saved == [last], saved
  path = (model_dir / "checkpoints" / str(last) if backend == "jax" else
          model_dir / f"ckpt-{last}")
  (line,) = [x for x in text.splitlines() if x.startswith("Stopped by")]
  assert line == (f"Stopped by SIGTERM after step {last}: saved in {path}; "
                  "the same command resumes from that step")

  second = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(backend),
                          capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)
  assert second.returncode == 0, second.stderr[-3000:]
  out = second.stdout
  assert f"Resumed from {path} at step {last}" in out
  resumed = [int(m.group(1)) for m in PROGRESS.finditer(out)]
  # Rounds of 2 steps from the saved step on: none trained twice.
  assert resumed == list(range(last + 2, total, 2)) + [total], resumed
  assert _checkpoint_steps(model_dir, backend)[-1] == total
  assert (model_dir / f"eval_{total}.json").exists() == (
      mode == "train_and_eval")
