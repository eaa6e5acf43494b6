"""`KERAS_BACKEND=jax python train.py`: the JAX engine end to end.

One module fixture runs `--mode=train_and_eval` on coco_tiny160 (tiny_cpu.gin
shrunk further, two virtual CPU devices, so `DataParallel` shards every
batch): the first process is killed with SIGKILL as soon as an Orbax
checkpoint exists, the same command then resumes, trains to the end and
evaluates; then `--mode=eval` evaluates the last checkpoint again. The tests
read the output lines, checkpoints, eval results, config.gin, TensorBoard
events and the weights file the TensorFlow export reads.
"""
import json
import os
import pathlib
import re
import shutil
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
TOTAL, EVERY, EVAL_EVERY = 20, 5, 10
TIMEOUT = 1500
SMALL = [  # A smaller model than tiny_cpu.gin's, for compile time.
    "IMAGE_SIZE=64", "build_shapemask_model.backbone_width_multiplier=0.25",
    "build_shapemask_model.fpn_num_filters=16",
    "build_shapemask_model.head_num_convs=1",
    "build_shapemask_model.head_num_filters=16",
    "build_shapemask_model.num_downsample_channels=8",
    "build_shapemask_model.mask_num_convs=1",
    "build_shapemask_model.mask_num_filters=8",
    "build_shapemask_model.pre_nms_num_boxes=100",
    "build_shapemask_model.max_num_detections=20",
    "Experiment.eval_samples=8",
]


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
  return [LINE.match(line) for line in text.splitlines() if LINE.match(line)]


def _steps(model_dir):
  folder = model_dir / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def jax_run(tiny_train_records, tiny_val_records, tmp_path_factory):
  pytest.importorskip("jax")
  pytest.importorskip("orbax.checkpoint")
  model_dir = tmp_path_factory.mktemp("cli_jax") / "run"
  bindings = [
      f"TRAIN_FILE_PATTERN='{tiny_train_records}'",
      f"EVAL_FILE_PATTERN='{tiny_val_records}'", f"TOTAL_STEPS={TOTAL}",
      f"STEPS_PER_LOOP={EVERY}", f"CHECKPOINT_EVERY={EVERY}",
      f"EVAL_EVERY={EVAL_EVERY}", "WARMUP_STEPS=10", "WARMUP_LR=0.002",
      "INIT_LR=0.02", "LR_STEPS=[15]", "LR_LEVELS=[0.004]"] + SMALL
  cmd = [sys.executable, str(REPO_ROOT / "train.py"), "--gin_file=tiny_cpu.gin",
         *[f"--gin_bindings={b}" for b in bindings], f"--model_dir={model_dir}"]
  env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
             JAX_NUM_CPU_DEVICES="2", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
  log_path = model_dir.parent / "first.log"
  with open(log_path, "w") as log:
    first = subprocess.Popen(cmd + ["--mode=train_and_eval"], cwd=REPO_ROOT,
                             env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + TIMEOUT
      while not _steps(model_dir):
        assert first.poll() is None, log_path.read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
      first.send_signal(signal.SIGKILL)
      first.wait(timeout=60)
    finally:
      if first.poll() is None:
        first.kill()
        first.wait()
  killed = _steps(model_dir)[-1]
  start = time.time()
  second = subprocess.run(cmd + ["--mode=train_and_eval"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
  second_wall = time.time() - start
  final_eval = model_dir / f"eval_{TOTAL}.json"
  trained_metrics = (json.loads(final_eval.read_text())
                     if final_eval.exists() else None)
  third = subprocess.run(cmd + ["--mode=eval"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=TIMEOUT,
                         check=False)
  return dict(model_dir=model_dir, cmd=cmd, env=env,
              first_rc=first.returncode, first_pid=first.pid,
              first_log=log_path.read_text(), killed=killed, second=second,
              second_wall=second_wall, third=third,
              trained_metrics=trained_metrics)


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_and_finishes(jax_run):
  run = jax_run
  assert run["first_rc"] == -signal.SIGKILL
  resumed_at = run["killed"]
  assert resumed_at % EVERY == 0 and resumed_at < TOTAL
  second = run["second"]
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
  out = second.stdout
  checkpoints = run["model_dir"] / "checkpoints"
  assert (f"Resumed from {checkpoints / str(resumed_at)} at step "
          f"{resumed_at}") in out
  assert "JAX engine: 2 cpu device(s) in 1 process(es), float32" in out
  # The killed run's lock file is taken over, saying so, and released.
  lock = run["model_dir"] / "train.lock"
  assert (f"Took over {lock} from a training run that is no longer running "
          f"(host {socket.gethostname()}, pid {run['first_pid']}, started "
          ) in out
  assert not lock.exists()
  steps = [int(m.group(1)) for m in _progress(out)]
  assert steps == list(range(resumed_at + EVERY, TOTAL + 1, EVERY))
  assert _steps(run["model_dir"])[-1] == TOTAL
  assert not [p for p in checkpoints.iterdir() if "tmp" in p.name]


@pytest.mark.slow
def test_learning_rate_and_progress_continue(jax_run):
  run = jax_run
  lines = _progress(run["first_log"]) + _progress(run["second"].stdout)
  for m in lines:
    step, lr = int(m.group(1)), float(m.group(len(train_loop.LOSS_KEYS) + 3))
    assert lr == pytest.approx(expected_lr(step), rel=1e-4), step
    assert int(m.group(2)) == TOTAL
    losses = [float(x) for x in m.groups()[2:2 + len(train_loop.LOSS_KEYS)]]
    assert all(np.isfinite(losses)) and losses[0] > 0
  out = run["second"].stdout
  finals = [FINAL.match(line) for line in out.splitlines()
            if FINAL.match(line)]
  assert len(finals) == 1 and out.rstrip().endswith(finals[0].group(0))
  _, seconds, trained, images_per_s = finals[0].groups()
  assert int(trained) == TOTAL - run["killed"]
  assert 0 < float(seconds) < run["second_wall"]
  assert float(images_per_s) > 0


@pytest.mark.slow
def test_evaluations_and_outputs(jax_run, tiny_train_records):
  run = jax_run
  model_dir = run["model_dir"]
  out = run["second"].stdout
  evals = [int(s) for s in re.findall(r"^Evaluation at step (\d+) \(8 images",
                                      out, re.M)]
  expected = [s for s in (EVAL_EVERY,) if s > run["killed"]] + [TOTAL]
  assert evals == expected
  for step in expected:
    metrics = json.loads((model_dir / f"eval_{step}.json").read_text())
    assert metrics["step"] == step and metrics["num_images"] == 8
    assert {"AP", "mask_AP", "ARmax100", "mask_ARmax100"} <= set(metrics)
  config = (model_dir / "config.gin").read_text()
  assert f"TOTAL_STEPS = {TOTAL}" in config
  assert f"TRAIN_FILE_PATTERN = '{tiny_train_records}'" in config
  assert re.search(r"^Parser\.\w+ = ", config, re.M)
  tags, steps = set(), set()
  for path in (model_dir / "train").glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        tags.add(value.tag)
        steps.add(event.step)
  assert {f"train/{k}" for k in train_loop.LOSS_KEYS} <= tags
  assert {"train/learning_rate", "train/images_per_second"} <= tags
  assert TOTAL in steps
  assert list((model_dir / "eval").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_eval_mode_restores_the_last_checkpoint_exactly(jax_run):
  third = jax_run["third"]
  assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-5000:]
  assert f"Evaluation at step {TOTAL} (8 images" in third.stdout
  again = json.loads((jax_run["model_dir"] / f"eval_{TOTAL}.json").read_text())
  # --mode=eval rewrote eval_20.json from the restored checkpoint: the same
  # detections as at the end of training, so the same metrics.
  before = jax_run["trained_metrics"]
  assert before is not None
  timing = ("eval_seconds", "predict_seconds")
  assert {k: v for k, v in again.items() if k not in timing} == {
      k: v for k, v in before.items() if k not in timing}


@pytest.mark.slow
def test_tensorflow_export_reads_the_jax_weights(jax_run):
  import gin
  import keras
  from official_shapemask.modeling import factory
  from official_shapemask.serving import export
  from official_shapemask.training import gin_utils
  if keras.backend.backend() != "tensorflow":
    pytest.skip("the export side runs under the TensorFlow backend")
  model_dir = jax_run["model_dir"]
  weights = model_dir / f"shapemask-{TOTAL}.weights.h5"
  assert weights.is_file()
  try:
    gin_utils.parse_config([str(model_dir / "config.gin")])
    keras.mixed_precision.set_global_policy("float32")
    model = factory.build_shapemask_model()
    fresh = [v.numpy().copy() for v in model.trainable_variables]
    assert export.restore_model(model, str(model_dir)) == str(weights)
  finally:
    gin.clear_config()
  changed = [not np.array_equal(a, v.numpy())
             for a, v in zip(fresh, model.trainable_variables)]
  assert sum(changed) > 0.8 * len(changed)
  outputs = model(np.zeros((1, 64, 64, 3), np.float32), training=False)
  assert outputs["detection_masks"].shape[:2] == (1, 20)


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_in_one_line(jax_run, tmp_path):
  """Its largest file cut in half: eval and training fall back to the step
  before (training moves it aside), each saying so in one line."""
  model_dir = tmp_path / "run"
  shutil.copytree(jax_run["model_dir"], model_dir)
  checkpoints = model_dir / "checkpoints"
  newest, before = checkpoints / str(TOTAL), checkpoints / str(TOTAL - EVERY)
  largest = max((p for p in newest.rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = largest.read_bytes()
  largest.write_bytes(data[:len(data) // 2])
  cmd = [a for a in jax_run["cmd"] if not a.startswith("--model_dir=")] + [
      f"--model_dir={model_dir}"]

  def run(mode):
    return subprocess.run(cmd + [f"--mode={mode}"], cwd=REPO_ROOT,
                          env=jax_run["env"], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)

  def reported(out):
    lines = [line for line in out.splitlines()
             if line.startswith(f"Checkpoint {newest} cannot be read (")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]

  evaluate = run("eval")
  assert evaluate.returncode == 0, (evaluate.stdout[-3000:] +
                                    evaluate.stderr[-3000:])
  assert reported(evaluate.stdout).endswith(f"; using {before} instead")
  assert f"Evaluation at step {TOTAL - EVERY} (8 images" in evaluate.stdout
  assert newest.is_dir() and not (model_dir / "unreadable").exists()
  train = run("train")
  assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
  moved = model_dir / "unreadable" / f"checkpoints-{TOTAL}"
  assert reported(train.stdout).endswith(
      f"; moved to {moved}; using {before} instead")
  assert f"Resumed from {before} at step {TOTAL - EVERY}" in train.stdout
  assert [int(m.group(1)) for m in _progress(train.stdout)] == [TOTAL]
  assert _steps(model_dir)[-1] == TOTAL  # Saved again.
  assert (moved / largest.relative_to(newest)).read_bytes() == (
      data[:len(data) // 2])
  # No TensorStore traceback: a handful of lines on stderr at most.
  for result in (evaluate, train):
    for text in (result.stdout, result.stderr):
      assert "Traceback" not in text and "tensorstore_spec" not in text, (
          text[-3000:])
    assert len(result.stderr.splitlines()) < 20, result.stderr[-3000:]
