"""train.py end to end: kill -9 after the first checkpoint, resume, outputs.

One module fixture runs the command twice on coco_tiny160 (tiny_cpu.gin):
the first process is killed with SIGKILL as soon as a checkpoint exists,
the same command then resumes and finishes. The tests read its output lines,
checkpoints, config.gin and TensorBoard events.
"""
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.training import train_loop

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TOTAL, EVERY = 20, 5
TIMEOUT = 900


def expected_lr(step):
  """The bound schedule: 0.002 -> 0.02 over 10 steps, 0.004 from 15."""
  if step < 10:
    return 0.002 + step / 10 * (0.02 - 0.002)
  return 0.02 if step < 15 else 0.004


LINE = re.compile(
    r"^step (\d+)/(\d+) " +
    " ".join(rf"{k}=(-?[\d.]+(?:e[+-]?\d+)?)" for k in train_loop.LOSS_KEYS) +
    r" lr=([\d.e+-]+) ([\d.]+) img/s eta (\d+:\d\d(?::\d\d)?)$")
FINAL = re.compile(
    r"^Training time \(strategy start to shutdown\): ([\d.]+) min "
    r"\(([\d.]+) s\); (\d+) steps trained at ([\d.]+) images/s$")


def _progress(text):
  return [LINE.match(line) for line in text.splitlines()
          if LINE.match(line)]


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_train_records, tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("cli") / "run"
  cmd = [sys.executable, str(REPO_ROOT / "train.py"), "--gin_file=tiny_cpu.gin",
         f"--gin_bindings=TRAIN_FILE_PATTERN='{tiny_train_records}'",
         f"--gin_bindings=TOTAL_STEPS={TOTAL}",
         f"--gin_bindings=STEPS_PER_LOOP={EVERY}",
         f"--gin_bindings=CHECKPOINT_EVERY={EVERY}",
         "--gin_bindings=WARMUP_STEPS=10", "--gin_bindings=WARMUP_LR=0.002",
         "--gin_bindings=INIT_LR=0.02", "--gin_bindings=LR_STEPS=[15]",
         "--gin_bindings=LR_LEVELS=[0.004]", f"--model_dir={model_dir}",
         "--mode=train"]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
             CUDA_VISIBLE_DEVICES="")
  log_path = model_dir.parent / "first.log"
  with open(log_path, "w") as log:
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + TIMEOUT
      while not (model_dir / "checkpoint").exists():
        assert first.poll() is None, log_path.read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
      first.send_signal(signal.SIGKILL)
      first.wait(timeout=60)
    finally:
      if first.poll() is None:
        first.kill()
        first.wait()
  killed_checkpoint = tf.train.latest_checkpoint(str(model_dir))
  start = time.time()
  second = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
  return dict(model_dir=model_dir, first_rc=first.returncode,
              first_pid=first.pid,
              first_log=log_path.read_text(), killed=killed_checkpoint,
              second=second, second_wall=time.time() - start)


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_and_finishes(killed_and_resumed):
  run = killed_and_resumed
  assert run["first_rc"] == -signal.SIGKILL
  assert run["killed"] is not None
  resumed_at = int(run["killed"].rsplit("-", 1)[1])
  assert resumed_at % EVERY == 0 and resumed_at < TOTAL
  second = run["second"]
  assert second.returncode == 0, second.stderr[-5000:]
  out = second.stdout
  assert f"Resumed from {run['killed']} at step {resumed_at}" in out
  # The killed run's lock file is taken over, saying so, and released.
  lock = run["model_dir"] / "train.lock"
  assert (f"Took over {lock} from a training run that is no longer running "
          f"(host {socket.gethostname()}, pid {run['first_pid']}, started "
          ) in out
  assert not lock.exists()
  steps = [int(m.group(1)) for m in _progress(out)]
  assert steps == list(range(resumed_at + EVERY, TOTAL + 1, EVERY))
  # The final checkpoint holds the total step count.
  final = tf.train.latest_checkpoint(str(run["model_dir"]))
  assert final.endswith(f"ckpt-{TOTAL}")
  reader = tf.train.load_checkpoint(final)
  iterations = [k for k in reader.get_variable_to_shape_map()
                if k.startswith("optimizer/") and "iterations" in k]
  assert len(iterations) == 1, iterations
  assert int(reader.get_tensor(iterations[0])) == TOTAL


@pytest.mark.slow
def test_learning_rate_continues_with_the_step(killed_and_resumed):
  run = killed_and_resumed
  lines = _progress(run["first_log"]) + _progress(run["second"].stdout)
  assert lines
  for m in lines:
    step, lr = int(m.group(1)), float(m.group(len(train_loop.LOSS_KEYS) + 3))
    assert lr == pytest.approx(expected_lr(step), rel=1e-4), step
  assert int(lines[-1].group(1)) == TOTAL
  assert float(lines[-1].group(len(train_loop.LOSS_KEYS) + 3)) == (
      pytest.approx(0.004))


@pytest.mark.slow
def test_progress_lines_and_final_timing(killed_and_resumed):
  run = killed_and_resumed
  out = run["second"].stdout
  lines = _progress(out)
  for m in lines:
    assert int(m.group(2)) == TOTAL
    losses = [float(x) for x in m.groups()[2:2 + len(train_loop.LOSS_KEYS)]]
    assert all(np.isfinite(losses)) and losses[0] > 0
    assert float(m.group(len(train_loop.LOSS_KEYS) + 4)) > 0  # img/s
  assert lines[-1].group(len(train_loop.LOSS_KEYS) + 5) == "0:00"  # eta
  finals = [FINAL.match(line) for line in out.splitlines() if
            FINAL.match(line)]
  assert len(finals) == 1 and out.rstrip().endswith(finals[0].group(0))
  minutes, seconds, trained, images_per_s = finals[0].groups()
  resumed_at = int(run["killed"].rsplit("-", 1)[1])
  assert int(trained) == TOTAL - resumed_at
  assert 0 < float(seconds) < run["second_wall"]
  assert float(minutes) == pytest.approx(float(seconds) / 60, abs=0.01)
  assert float(images_per_s) > 0


@pytest.mark.slow
def test_operative_config_and_tensorboard_events(killed_and_resumed,
                                                 tiny_train_records):
  model_dir = killed_and_resumed["model_dir"]
  config = (model_dir / "config.gin").read_text()
  assert f"TOTAL_STEPS = {TOTAL}" in config
  assert f"TRAIN_FILE_PATTERN = '{tiny_train_records}'" in config
  assert "build_shapemask_model.image_size = %IMAGE_SIZE" in config
  assert re.search(r"^Parser\.\w+ = ", config, re.M)  # Input settings too.
  assert not list(model_dir.glob(".config.gin.*"))  # No temp files left.
  tags, steps = set(), set()
  for path in (model_dir / "train").glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        tags.add(value.tag)
        steps.add(event.step)
        assert np.isfinite(tf.make_ndarray(value.tensor))
  assert {f"train/{k}" for k in train_loop.LOSS_KEYS} <= tags
  assert {"train/learning_rate", "train/images_per_second"} <= tags
  assert TOTAL in steps
