"""The JAX engine's train step against the TensorFlow loop and across devices.

A micro ShapeMask (quarter-width ResNet-10, 64 px, levels 3-5, frozen stem
and conv2_x kernels) and one real batch of coco_tiny160 (our training
parser, deterministic). From the same weights and batch:

- the TensorFlow loop's `TrainLoop` and `jax_step.TrainStep` give the same
  losses for two steps and the same updated variables (float32);
- (slow) `keras.distribution.DataParallel` over two virtual CPU devices gives
  the losses and variables of one device with the same global batch;
- (slow) two processes joined by `keras.distribution.initialize` on
  127.0.0.1 (gloo CPU collectives), each feeding its half of the batch, give
  the losses and variables of one process.

The JAX runs are subprocesses (`KERAS_BACKEND=jax`).
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

MICRO = dict(num_classes=91, image_size=64, backbone_depth=10,
             backbone_width_multiplier=0.25, max_level=5, fpn_num_filters=16,
             head_num_convs=1, head_num_filters=16, num_downsample_channels=8,
             mask_num_convs=1, mask_num_filters=8, pre_nms_num_boxes=100,
             max_num_detections=20, num_clusters=2)
SCHEDULE = dict(warmup_learning_rate=0.01, warmup_steps=10,
                init_learning_rate=0.1, learning_rate_levels=[0.01],
                learning_rate_steps=[20])
STEPS = 2
BATCH = 2
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Tolerances (float32). TensorFlow (oneDNN) vs XLA:CPU, and one device vs
# the same global batch partitioned over two devices or processes, sum in
# other orders only. Measured (2 devices vs 1): losses within 1.7e-5
# relative (the coarse mask loss; the others <= 5e-6), variables within
# 5.5e-7 absolute.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5
DEVICES_LOSS_RTOL = 1e-4
DEVICES_WEIGHT_ATOL = 2e-6


def _flat(labels, prefix="labels/"):
  out = {}
  for k, v in labels.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


@pytest.fixture(scope="module")
def inputs(tiny_train_records, tmp_path_factory):
  """Weights, priors and one batch (npz), and the TensorFlow loop's result."""
  import keras
  import tensorflow as tf
  from official_shapemask.dataloaders import input_reader
  from official_shapemask.dataloaders import shapemask_parser
  from official_shapemask.modeling import factory
  from official_shapemask.training import datasets
  from official_shapemask.training import schedules
  from official_shapemask.training import train_loop
  if keras.backend.backend() != "tensorflow":
    pytest.skip("the TensorFlow side runs under the TensorFlow backend")
  keras.mixed_precision.set_global_policy("float32")
  out = tmp_path_factory.mktemp("jax_step")
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  keras.utils.set_random_seed(3)
  with strategy.scope():
    model = factory.build_shapemask_model(**MICRO)
    priors = np.random.default_rng(0).uniform(
        size=(91, 2, 32, 32)).astype(np.float32)
    model.prior_head.set_shape_priors(priors)
    optimizer = keras.optimizers.SGD(
        schedules.StepDecayWithWarmup(**SCHEDULE), momentum=0.9)
    optimizer.build(model.trainable_variables)
  np.save(out / "priors.npy", priors)
  model.save_weights(str(out / "init.weights.h5"))
  parser = shapemask_parser.Parser(
      mode="train", seed=0, **datasets.model_input_settings(model))
  dataset = input_reader.build_dataset(tiny_train_records, parser, BATCH,
                                       is_training=True, deterministic=True)
  images, labels = next(iter(dataset))
  batch = {"images": images.numpy(),
           **{k: v.numpy() for k, v in _flat(labels).items()}}
  np.savez(out / "batch.npz", **batch)
  frozen = {v.path: v.numpy() for v in model.non_trainable_variables
            if "kernel" in v.path}
  assert frozen, "the micro model has frozen kernels"

  init = [v.numpy() for v in model.trainable_variables]
  loop = train_loop.TrainLoop(strategy, model, optimizer)
  iterator = iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors((images, labels)).repeat()))
  losses = [loop.run(iterator, 1)[0] for _ in range(STEPS)]
  state = {"trainable": [v.numpy() for v in model.trainable_variables],
           "non_trainable": [v.numpy() for v in model.non_trainable_variables],
           "optimizer": [v.numpy() for v in optimizer.variables]}
  for v in model.non_trainable_variables:
    if v.path in frozen:
      np.testing.assert_array_equal(v.numpy(), frozen[v.path])
  return {"dir": out, "losses": losses, "state": state, "init": init}


_JAX_SCRIPT = textwrap.dedent("""
    import json
    import sys
    import numpy as np
    import keras
    import jax
    from official_shapemask.modeling import factory
    from official_shapemask.training.engines import jax_engine
    from official_shapemask.training import jax_step
    from official_shapemask.training import schedules

    work, prefix, modes = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    micro, schedule, steps = json.loads(sys.argv[4])
    nproc = jax_engine.initialize_multi_host()
    rank = jax.process_index()
    model = factory.build_shapemask_model(**micro)
    model.prior_head.set_shape_priors(np.load(f"{work}/priors.npy"))
    model.load_weights(f"{work}/init.weights.h5")
    init = [[np.asarray(v.value) for v in group] for group in (
        model.trainable_variables, model.non_trainable_variables)]
    data = dict(np.load(f"{work}/batch.npz"))
    rows = len(data["images"]) // nproc
    local = {k: v[rank * rows:(rank + 1) * rows] for k, v in data.items()}
    labels = {}
    for key, value in local.items():
      if key.startswith("labels/"):
        node = labels
        *parents, leaf = key[len("labels/"):].split("/")
        for p in parents:
          node = node.setdefault(p, {})
        node[leaf] = value
    for mode in modes:
      used = jax.devices()[:1] if mode == "one" else jax.devices()
      distribution = jax_step.data_parallel(used)
      optimizer = keras.optimizers.SGD(
          schedules.StepDecayWithWarmup(**schedule), momentum=0.9)
      step = jax_step.TrainStep(model, optimizer, distribution=distribution)
      batch = jax_step.shard_batch((local["images"], labels), distribution)
      state = step.place(init + [[np.asarray(v.value)
                                  for v in optimizer.variables]])
      losses = []
      for _ in range(steps):
        state, values = step(state, *batch)
        losses.append({k: float(v) for k, v in values.items()})
      assert len(state[0][0].sharding.device_set) == len(used)
      if rank == 0:
        name = f"{prefix}_{mode}"
        np.savez(f"{work}/{name}.npz", **{
            f"{group}/{i}": np.asarray(x) for group, values in
            zip(("trainable", "non_trainable", "optimizer"), state)
            for i, x in enumerate(values)})
        with open(f"{work}/{name}.json", "w") as f:
          json.dump({"losses": losses, "devices": len(used),
                     "processes": nproc}, f)
    print("OK", rank)
""")


def _jax_env(**extra):
  return dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
              TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO_ROOT), **extra)


def _start(work, prefix, modes, env):
  return subprocess.Popen(
      [sys.executable, "-c", _JAX_SCRIPT, str(work), prefix, modes,
       json.dumps([MICRO, SCHEDULE, STEPS])], env=env, cwd=REPO_ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=1500):
  try:
    out, err = proc.communicate(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0 and "OK" in out, out[-2000:] + err[-5000:]


@pytest.fixture(scope="module")
def jax_runs(inputs):
  """One JAX process with two CPU devices: the step on one, then on both."""
  pytest.importorskip("jax")
  work = inputs["dir"]
  _finish(_start(work, "jax", "one,all",
                 _jax_env(JAX_NUM_CPU_DEVICES="2")))
  return _load(work, "jax_one"), _load(work, "jax_all")


def _load(work, name):
  with open(work / f"{name}.json") as f:
    meta = json.load(f)
  arrays = np.load(work / f"{name}.npz")
  state = {g: [arrays[f"{g}/{i}"] for i in range(
      sum(k.startswith(g + "/") for k in arrays.files))]
           for g in ("trainable", "non_trainable", "optimizer")}
  return meta, state


def _assert_same(losses, state, ref_losses, ref_state, rtol, atol):
  assert len(losses) == len(ref_losses) == STEPS
  for ours, theirs in zip(losses, ref_losses):
    for key in theirs:
      assert ours[key] == pytest.approx(theirs[key], rel=rtol, abs=1e-7), key
  for group in ref_state:
    assert len(state[group]) == len(ref_state[group]), group
    for a, b in zip(state[group], ref_state[group]):
      np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=group)


@pytest.mark.slow
def test_tf_loop_and_jax_step_agree(inputs, jax_runs):
  (meta, state), _ = jax_runs
  assert meta["devices"] == 1
  _assert_same(meta["losses"], state, inputs["losses"], inputs["state"],
               LOSS_RTOL, WEIGHT_ATOL)
  assert int(state["optimizer"][0]) == STEPS
  # Most variables moved (zero-initialised biases of layers without a
  # gradient from this batch, e.g. unused classes' mask channels, may not).
  moved = [not np.array_equal(a, b) for a, b in zip(state["trainable"],
                                                    inputs["init"])]
  assert sum(moved) > 0.8 * len(moved), f"{moved.count(False)} did not move"


@pytest.mark.slow
def test_two_devices_match_one_device(jax_runs):
  (meta1, state1), (meta2, state2) = jax_runs
  assert meta1["devices"] == 1 and meta2["devices"] == 2
  _assert_same(meta2["losses"], state2, meta1["losses"], state1,
               DEVICES_LOSS_RTOL, DEVICES_WEIGHT_ATOL)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(inputs, jax_runs):
  work = inputs["dir"]
  port = _free_port()
  procs = [_start(work, "procs", "all", _jax_env(
      KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
      KERAS_DISTRIBUTION_NUM_PROCESSES="2",
      KERAS_DISTRIBUTION_PROCESS_ID=str(rank))) for rank in range(2)]
  try:
    for proc in procs:
      _finish(proc)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  meta, state = _load(work, "procs_all")
  assert meta["processes"] == 2 and meta["devices"] == 2
  (meta1, state1), _ = jax_runs
  _assert_same(meta["losses"], state, meta1["losses"], state1,
               DEVICES_LOSS_RTOL, DEVICES_WEIGHT_ATOL)
