"""The custom loop under tf.distribute: replica consistency and equal losses.

Keras 3's tf.distribute support is thin (keras-team/keras#20601, #20568), so
these tests run a real run (controller and TensorFlow engine) under
MirroredStrategy over two logical
CPU devices and under a two-process MultiWorkerMirroredStrategy on
127.0.0.1, and compare with one device and the same global batch.

The loss of a replica is normalised by its own positives (+1) and mask
pixels (the reference's per-core normalisation), so two replicas do not
compute the loss of the whole batch on one device (it differs by the +1 in
`sum(num_positives) + 1`, ~0.5 % here). The one-device reference therefore
computes the losses of each replica's half of the global batch and averages
them (`run_fixed(virtual_replicas=2)`); its batch norm sees the whole batch,
which sync BN gives the replicas. Every global batch is two halves of real
coco_tiny160 images with the same labels (those of the first half), so the
replicas see other images and compute other gradients and statistics.

This file is also the worker script of its subprocesses
(`python test_distributed.py --role=...`).
"""
import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 3
GLOBAL_BATCH = 4
SEED = 11
# Loss agreement with one device: float32 sums in another order. The
# losses move by far more than this per step (checked below).
RTOL = 5e-4
WORKER_TIMEOUT = 900


def _parse_tiny(train_pattern, sync_bn, steps):
  import gin  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import gin_utils  # pylint: disable=g-import-not-at-top
  with gin.unlock_config():
    gin.clear_config()
  gin_utils.parse_config(["tiny_cpu.gin"], [
      f"TRAIN_FILE_PATTERN='{train_pattern}'", f"TOTAL_STEPS={steps}",
      "STEPS_PER_LOOP=1", f"CHECKPOINT_EVERY={steps}",
      f"TRAIN_BATCH_SIZE={GLOBAL_BATCH}", "WARMUP_STEPS=0", "INIT_LR=0.02",
      f"build_shapemask_model.use_sync_bn={sync_bn}",
      "Experiment.deterministic_input=True"])


def _fixed_batch_controller_class():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import controller  # pylint: disable=g-import-not-at-top

  class FixedBatchController(controller.Controller):
    """Serves the global batches of an .npz: replica g gets slice g."""

    def train_dataset_fn(self):
      data = dict(np.load(self.settings.train_file_pattern))
      global_batch = self.settings.train_batch_size

      def dataset_fn(ctx):
        replicas = ctx.num_replicas_in_sync
        local = replicas // ctx.num_input_pipelines
        per = global_batch // replicas
        # A worker's dataset feeds its local replicas round robin.
        order = [(s, ctx.input_pipeline_id * local + r)
                 for s in range(data["images"].shape[0]) for r in range(local)]

        def take(array):
          return np.stack([array[s, g * per:(g + 1) * per] for s, g in order])

        labels = {k.split("/", 1)[1]: take(v) for k, v in data.items()
                  if k.startswith("labels/")}
        return tf.data.Dataset.from_tensor_slices(
            (take(data["images"]), labels)).repeat()

      return dataset_fn

  return FixedBatchController


def _replica_report(exp):
  """Per-replica differences of every model and optimizer variable."""
  from official_shapemask.training import strategies  # pylint: disable=g-import-not-at-top
  kinds = {"trainable": 0, "bn_moving": 0, "optimizer": 0}
  differ = {}
  model, optimizer = exp.engine.model, exp.engine.optimizer
  trainable = {id(v) for v in model.trainable_variables}
  for group, variables in (("model", model.variables),
                           ("optimizer", optimizer.variables)):
    for v in variables:
      copies = [c.numpy() for c in strategies.per_replica_values(v)]
      if len(copies) < 2:
        continue
      if group == "optimizer":
        kinds["optimizer"] += 1
      elif id(v) in trainable:
        kinds["trainable"] += 1
      elif "moving_" in v.path:
        kinds["bn_moving"] += 1
      worst = max(float(np.max(np.abs(copies[0].astype(np.float64) - c)))
                  for c in copies[1:])
      if worst != 0.0:
        differ[f"{group}:{v.path}"] = worst
  return {"mirrored": kinds, "differ": differ}


def _checksums(exp):
  variables = exp.engine.model.variables + exp.engine.optimizer.variables
  return [float(np.sum(np.abs(v.numpy().astype(np.float64))))
          for v in variables]


def _bn_moving_moved(exp):
  """Fraction of BN moving means that left their zero initialisation."""
  means = [v for v in exp.engine.model.variables
           if v.path.endswith("moving_mean")]
  return float(np.mean([np.any(v.numpy() != 0) for v in means]))


def _normalise_per_virtual_replica(model, num):
  """One device, the losses of `num` equal batch slices averaged."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  whole_batch_losses = model.compute_losses

  def compute_losses(labels, outputs):
    parts = []
    for r in range(num):
      def piece(t, r=r):
        per = t.shape[0] // num
        return t[r * per:(r + 1) * per]
      parts.append(whole_batch_losses(tf.nest.map_structure(piece, labels),
                                      tf.nest.map_structure(piece, outputs)))
    return {k: tf.add_n([p[k] for p in parts]) / num for k in parts[0]}

  model.compute_losses = compute_losses


def run_fixed(strategy_name, npz, model_dir, steps=STEPS, jit_compile=False,
              virtual_replicas=1):
  """Trains `steps` steps on the fixed batches (sync BN); returns results."""
  import keras  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import settings  # pylint: disable=g-import-not-at-top
  from official_shapemask.training.engines import tensorflow_engine  # pylint: disable=g-import-not-at-top
  _parse_tiny(npz, sync_bn=True, steps=steps)
  keras.utils.set_random_seed(SEED)
  run_settings = settings.Settings(str(model_dir), strategy_name=strategy_name,
                                   jit_compile=jit_compile)
  quiet = lambda *a, **k: None  # noqa: E731
  exp = _fixed_batch_controller_class()(
      run_settings, tensorflow_engine.Engine(run_settings, quiet),
      print_fn=quiet)
  exp.start("train")
  if virtual_replicas > 1:
    _normalise_per_virtual_replica(exp.engine.model, virtual_replicas)
  try:
    out = {"init": _checksums(exp)[:len(exp.engine.model.variables)],
           "replicas": exp.engine.strategy.num_replicas_in_sync,
           "losses": []}
    for step in range(1, steps + 1):
      out["losses"].append(exp.train(step))
    out.update(step=exp.step, checksums=_checksums(exp),
               report=_replica_report(exp))
  finally:
    exp.close()
  return out


def run_real_data(records, model_dir, steps=2):
  """The default pipeline and default (per-replica) BN, under mirrored."""
  import keras  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import controller  # pylint: disable=g-import-not-at-top
  _parse_tiny(records, sync_bn=False, steps=steps)
  keras.utils.set_random_seed(SEED)
  exp = controller.build(str(model_dir), strategy_name="mirrored",
                         print_fn=lambda *a, **k: None)
  exp.start("train")
  try:
    losses = exp.train()
    return {"replicas": exp.engine.strategy.num_replicas_in_sync,
            "losses": losses,
            "step": exp.step, "report": _replica_report(exp),
            "bn_moved": _bn_moving_moved(exp)}
  finally:
    exp.close()


# ------------------------------------------------------------- subprocesses
def _worker_main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--role", choices=["mirrored", "mirrored_default_bn",
                                         "multi_worker"])
  parser.add_argument("--data")
  parser.add_argument("--records")
  parser.add_argument("--model_dir")
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if args.role.startswith("mirrored"):  # Before TensorFlow initialises.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  # One strategy per process: a second MirroredStrategy in the same process
  # reuses collective instance keys of the first and fails ("Shape mismatch
  # in the collective instance"); train.py builds one.
  if args.role == "mirrored_default_bn":
    results = run_real_data(args.records, args.model_dir)
  else:
    results = run_fixed(args.role, args.data, args.model_dir)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f)
  os.replace(tmp, args.out)


def _start_worker(role, out, env_extra=None, **kwargs):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO_ROOT),
             CUDA_VISIBLE_DEVICES="", **(env_extra or {}))
  args = [sys.executable, __file__, f"--role={role}", f"--out={out}"]
  args += [f"--{k}={v}" for k, v in kwargs.items()]
  log = open(str(out) + ".log", "w")  # pylint: disable=consider-using-with
  return subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT), log


def _wait(procs, timeout):
  try:
    for proc, _ in procs:
      proc.wait(timeout=timeout)
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()


def _read(out, proc):
  log = pathlib.Path(str(out) + ".log").read_text()
  assert proc.returncode == 0 and out.exists(), log[-5000:]
  return json.loads(out.read_text())


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fixed_batches(tiny_train_records, tmp_path_factory):
  """STEPS global batches: [images A, images B] with labels [L_A, L_A]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_shapemask.dataloaders import input_reader
  from official_shapemask.dataloaders import shapemask_parser
  from official_shapemask.modeling import factory
  from official_shapemask.training import datasets
  _parse_tiny(tiny_train_records, sync_bn=True, steps=STEPS)
  settings = datasets.model_input_settings(factory.build_shapemask_model())
  per = GLOBAL_BATCH // 2
  dataset = input_reader.build_dataset(
      tiny_train_records, shapemask_parser.Parser(mode="train", **settings),
      per, is_training=True, deterministic=True, seed=7)
  batches = [tf.nest.map_structure(lambda t: t.numpy(), b)
             for b in dataset.take(2 * STEPS)]
  images, labels = [], {}
  for s in range(STEPS):
    (images_a, labels_a), (images_b, _) = batches[2 * s], batches[2 * s + 1]
    assert not np.array_equal(images_a, images_b)
    images.append(np.concatenate([images_a, images_b]))
    for k, v in labels_a.items():
      labels.setdefault(k, []).append(np.concatenate([v, v]))
  path = tmp_path_factory.mktemp("fixed") / "batches.npz"
  np.savez(path, images=np.stack(images),
           **{f"labels/{k}": np.stack(v) for k, v in labels.items()})
  assert labels["num_positives"][0].sum() > 0
  return path


@pytest.fixture(scope="module")
def one_device(fixed_batches, tmp_path_factory):
  """The reference: one device, the same global batches, in this process;
  losses normalised per half as two replicas do."""
  import gin
  import keras
  try:
    return run_fixed("one_device", str(fixed_batches),
                     tmp_path_factory.mktemp("one_device"),
                     virtual_replicas=2)
  finally:
    with gin.unlock_config():
      gin.clear_config()
    keras.mixed_precision.set_global_policy("float32")


def _assert_same_losses(got, reference):
  assert len(got) == len(reference) == STEPS
  for step, (a, b) in enumerate(zip(got, reference), start=1):
    for key in b:
      np.testing.assert_allclose(a[key], b[key], rtol=RTOL, atol=1e-6,
                                 err_msg=f"{key} at step {step}")


def _assert_consistent(report):
  kinds = report["mirrored"]
  assert kinds["trainable"] > 50 and kinds["bn_moving"] > 20, kinds
  assert kinds["optimizer"] > 50, kinds  # Momentum slots and iterations.
  assert not report["differ"], sorted(report["differ"].items())[:10]


def test_reference_losses_move_more_than_the_tolerance(one_device):
  totals = [step["total_loss"] for step in one_device["losses"]]
  assert one_device["step"] == STEPS and one_device["replicas"] == 1
  assert all(np.isfinite(totals))
  # The comparisons below could not miss a wrong update: each step changes
  # the loss by much more than RTOL.
  assert abs(totals[2] - totals[0]) > 50 * RTOL * abs(totals[0]), totals


@pytest.mark.slow
def test_mirrored_two_logical_cpus(fixed_batches, one_device,
                                   tiny_train_records, tmp_path):
  out = tmp_path / "mirrored.json"
  out_default = tmp_path / "mirrored_default_bn.json"
  procs = [_start_worker("mirrored", out, data=fixed_batches,
                         model_dir=tmp_path / "sync_bn"),
           _start_worker("mirrored_default_bn", out_default,
                         records=tiny_train_records,
                         model_dir=tmp_path / "default_bn")]
  _wait(procs, WORKER_TIMEOUT)
  sync = _read(out, procs[0][0])
  assert sync["replicas"] == 2 and sync["step"] == STEPS
  np.testing.assert_allclose(sync["init"], one_device["init"], rtol=1e-7)
  _assert_same_losses(sync["losses"], one_device["losses"])
  _assert_consistent(sync["report"])
  # Per-replica BN (the default), the real input pipeline: the replicas see
  # other images, yet hold identical moving statistics.
  default = _read(out_default, procs[1][0])
  assert default["replicas"] == 2 and default["step"] == 2
  assert np.isfinite(default["losses"]["total_loss"])
  assert default["bn_moved"] > 0.9
  _assert_consistent(default["report"])


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


@pytest.mark.slow
def test_multi_worker_two_processes(fixed_batches, one_device, tmp_path):
  workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
  procs, outs = [], []
  for index in range(2):
    tf_config = json.dumps({"cluster": {"worker": workers},
                            "task": {"type": "worker", "index": index}})
    out = tmp_path / f"worker{index}.json"
    outs.append(out)
    procs.append(_start_worker(
        "multi_worker", out, env_extra={"TF_CONFIG": tf_config},
        data=fixed_batches, model_dir=tmp_path / "run"))
  _wait(procs, WORKER_TIMEOUT)
  results = [_read(out, proc) for out, (proc, _) in zip(outs, procs)]
  for result in results:
    assert result["replicas"] == 2 and result["step"] == STEPS
    np.testing.assert_allclose(result["init"], one_device["init"], rtol=1e-7)
    _assert_same_losses(result["losses"], one_device["losses"])
  # Both workers hold the same weights, BN statistics and optimizer slots.
  np.testing.assert_allclose(results[0]["checksums"], results[1]["checksums"],
                             rtol=1e-6)
  # Only the chief writes into model_dir; the other worker to a scratch dir.
  assert (tmp_path / "run" / "ckpt-3.index").exists()
  assert (tmp_path / "run" / "config.gin").exists()
  assert (tmp_path / "run" / "workers" / "1").is_dir()


@pytest.mark.slow
def test_jit_compile_gives_the_same_losses(fixed_batches, one_device,
                                           tmp_path):
  import gin
  try:
    jit = run_fixed("one_device", str(fixed_batches), tmp_path,
                    jit_compile=True, virtual_replicas=2)
  finally:
    with gin.unlock_config():
      gin.clear_config()
  # XLA fuses and reorders float32 arithmetic.
  for step, (a, b) in enumerate(zip(jit["losses"], one_device["losses"]), 1):
    for key in b:
      np.testing.assert_allclose(a[key], b[key], rtol=2e-3, atol=1e-5,
                                 err_msg=f"{key} at step {step}")


if __name__ == "__main__":
  _worker_main(sys.argv[1:])
