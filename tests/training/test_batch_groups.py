"""Per-replica groups: one device computes what the TF loop's replicas do.

`Experiment.per_replica_batch_size` makes both engines take batch-norm
statistics and loss normalisers over groups of that many images
(`ShapeMaskModel.set_batch_groups`). From the same weights (a micro
ShapeMask: quarter-width ResNet-10, 64 px, levels 3-5) and the same batch
of 4 real coco_tiny160 images, two float32 steps of

- the TensorFlow loop on two `MirroredStrategy` replicas of 2 images
  (two logical CPUs, a subprocess; one group per replica),
- the JAX engine's step with 2 groups of 2 on one device and, data parallel,
  on two virtual CPU devices (a `KERAS_BACKEND=jax` subprocess), and
- the TensorFlow loop on one device with 2 groups of 2

give the same losses and updated variables (trainable, BN moving statistics,
optimizer slots). The same step with one group (the whole batch) gives other
ones, so the setting cannot be silently ignored. The engines' wiring (group
counts and the one-line errors) and the model's inference and `fit`, which
do not depend on it, are checked too.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MICRO = dict(num_classes=91, image_size=64, backbone_depth=10,
             backbone_width_multiplier=0.25, max_level=5, fpn_num_filters=16,
             head_num_convs=1, head_num_filters=16, num_downsample_channels=8,
             mask_num_convs=1, mask_num_filters=8, pre_nms_num_boxes=100,
             max_num_detections=20, num_clusters=2)
SCHEDULE = dict(warmup_learning_rate=0.01, warmup_steps=10,
                init_learning_rate=0.1, learning_rate_levels=[0.01],
                learning_rate_steps=[20])
STEPS = 2
BATCH = 4
GROUPS = 2
# float32; the engines and replica layouts sum in other orders only
# (the tolerances of test_jax_step.py).
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5
WEIGHT_RTOL = 1e-4
TIMEOUT = 1500


def _flat(labels, prefix="labels/"):
  out = {}
  for k, v in labels.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out


def _unflat(arrays):
  labels = {}
  for key, value in arrays.items():
    if key.startswith("labels/"):
      node = labels
      *parents, leaf = key[len("labels/"):].split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = value
  return arrays["images"], labels


def _save_state(path, state, losses):
  np.savez(str(path) + ".npz", **{
      f"{group}/{i}": np.asarray(x) for group, values in state.items()
      for i, x in enumerate(values)})
  with open(str(path) + ".json", "w") as f:
    json.dump(losses, f)


def _load_state(path):
  arrays = np.load(str(path) + ".npz")
  state = {g: [arrays[f"{g}/{i}"] for i in range(
      sum(k.startswith(g + "/") for k in arrays.files))]
           for g in ("trainable", "non_trainable", "optimizer")}
  with open(str(path) + ".json") as f:
    return json.load(f), state


# ---------------------------------------------- the TensorFlow side (shared)
def tf_model_and_optimizer(work, strategy, replica_state=False):
  """The micro model with the saved weights, and SGD, in `strategy`."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  from official_shapemask.modeling import factory  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import schedules  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import strategies  # pylint: disable=g-import-not-at-top
  with strategy.scope():
    with (strategies.replica_consistent_state() if replica_state else
          contextlib.nullcontext()):
      model = factory.build_shapemask_model(**MICRO)
    model.prior_head.set_shape_priors(np.load(f"{work}/priors.npy"))
    model.load_weights(f"{work}/init.weights.h5")
    optimizer = keras.optimizers.SGD(
        schedules.StepDecayWithWarmup(**SCHEDULE), momentum=0.9)
    optimizer.build(model.trainable_variables)
  return model, optimizer


def tf_train(strategy, model, optimizer, dataset_fn):
  """`STEPS` steps of the TF loop; returns (losses, state)."""
  from official_shapemask.training import train_loop  # pylint: disable=g-import-not-at-top
  loop = train_loop.TrainLoop(strategy, model, optimizer)
  iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
  losses = [loop.run(iterator, 1)[0] for _ in range(STEPS)]
  state = {"trainable": [v.numpy() for v in model.trainable_variables],
           "non_trainable": [v.numpy() for v in model.non_trainable_variables],
           "optimizer": [v.numpy() for v in optimizer.variables]}
  return losses, state


def per_replica_dataset_fn(work):
  """Replica r of R gets rows [r B/R, (r+1) B/R) of the batch, every step."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images, labels = _unflat(dict(np.load(f"{work}/batch.npz")))

  def dataset_fn(ctx):
    replicas = ctx.num_replicas_in_sync
    per = BATCH // replicas
    # One input pipeline feeds its replicas round robin.
    parts = [tf.nest.map_structure(lambda t, r=r: t[r * per:(r + 1) * per],
                                   (images, labels)) for r in range(replicas)]
    dataset = tf.data.Dataset.from_tensors(parts[0])
    for part in parts[1:]:
      dataset = dataset.concatenate(tf.data.Dataset.from_tensors(part))
    return dataset.repeat()

  return dataset_fn


# ------------------------------------------------ the Mirrored subprocess
def _mirrored_main(work, out, records):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cpu = tf.config.list_physical_devices("CPU")[0]
  tf.config.set_logical_device_configuration(
      cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
  from official_shapemask.training import controller  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import settings as settings_lib  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import strategies  # pylint: disable=g-import-not-at-top
  # The wiring first (before any strategy, one per process): a per-replica
  # batch that is not a multiple fails before the strategy starts.
  exp = controller.build(
      f"{work}/mirrored_run", strategy_name="mirrored",
      train_file_pattern=records, train_batch_size=BATCH,
      per_replica_batch_size=BATCH, print_fn=lambda *a, **k: None)
  try:
    exp.start("train")
  except settings_lib.InvalidInputError as e:
    message = str(e)
  else:
    raise AssertionError("no error")
  assert exp.engine.strategy is None, "the strategy started"
  strategy = tf.distribute.MirroredStrategy(strategies.mirrored_devices())
  assert strategy.num_replicas_in_sync == 2
  model, optimizer = tf_model_and_optimizer(work, strategy, replica_state=True)
  # What the controller sets with per_replica_batch_size=2.
  settings = settings_lib.Settings(f"{work}/unused", train_batch_size=BATCH,
                                   per_replica_batch_size=2)
  groups = settings_lib.replica_groups(settings,
                                       strategy.num_replicas_in_sync)
  model.set_batch_groups(groups)
  losses, state = tf_train(strategy, model, optimizer,
                           per_replica_dataset_fn(work))
  _save_state(out, state, {"losses": losses, "groups": groups,
                           "message": message})


# --------------------------------------------------- the JAX subprocess
_JAX_SCRIPT = textwrap.dedent("""
    import json
    import sys
    import gin
    import jax
    import keras
    import numpy as np
    from official_shapemask.modeling import factory
    from official_shapemask.training import controller
    from official_shapemask.training import gin_utils
    from official_shapemask.training import jax_step
    from official_shapemask.training import settings
    from official_shapemask.training import schedules
    sys.path.insert(0, sys.argv[4])
    import test_batch_groups as t

    work, records = sys.argv[1], sys.argv[2]
    groups = int(sys.argv[3])
    model = factory.build_shapemask_model(**t.MICRO)
    model.prior_head.set_shape_priors(np.load(f"{work}/priors.npy"))
    model.load_weights(f"{work}/init.weights.h5")
    model.set_batch_groups(groups)
    init = [[np.asarray(v.value) for v in group] for group in (
        model.trainable_variables, model.non_trainable_variables)]
    images, labels = t._unflat(dict(np.load(f"{work}/batch.npz")))
    for mode in ("one", "all"):
      used = jax.devices()[:1] if mode == "one" else jax.devices()
      distribution = jax_step.data_parallel(used)
      optimizer = keras.optimizers.SGD(
          schedules.StepDecayWithWarmup(**t.SCHEDULE), momentum=0.9)
      step = jax_step.TrainStep(model, optimizer, distribution=distribution)
      batch = jax_step.shard_batch((images, labels), distribution)
      state = step.place(init + [[np.asarray(v.value)
                                  for v in optimizer.variables]])
      losses = []
      for _ in range(t.STEPS):
        state, values = step(state, *batch)
        losses.append({k: float(v) for k, v in values.items()})
      assert len(state[0][0].sharding.device_set) == len(used)
      t._save_state(f"{work}/jax_{mode}", dict(zip(
          ("trainable", "non_trainable", "optimizer"), state)),
          {"losses": losses, "devices": len(used)})

    # The engine's wiring: global batch / per_replica_batch_size groups.
    def start(per_replica):
      with gin.unlock_config():
        gin.clear_config()
      gin_utils.parse_config(["tiny_cpu.gin"], [
          f"TRAIN_FILE_PATTERN='{records}'", f"TRAIN_BATCH_SIZE={t.BATCH}",
          f"Experiment.per_replica_batch_size={per_replica}"])
      exp = controller.build(f"{work}/jax_run_{per_replica}",
                             print_fn=lambda *a, **k: None)
      return exp, exp.start("train")

    exp, _ = start(2)
    wired = exp.engine.model.batch_groups
    exp.close()
    try:
      start(3)
    except settings.InvalidInputError as e:
      message = str(e)
    else:
      raise AssertionError("no error")
    with open(f"{work}/jax_wiring.json", "w") as f:
      json.dump({"groups": wired, "message": message}, f)
    print("OK")
""")


def _jax_env(**extra):
  return dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
              TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(REPO_ROOT), **extra)


def _finish(proc, log):
  try:
    proc.wait(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()
  text = pathlib.Path(log.name).read_text()
  assert proc.returncode == 0, text[-5000:]
  return text


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def runs(tiny_train_records, tmp_path_factory):
  """Weights, priors and the batch; every engine's two steps."""
  import keras
  import tensorflow as tf
  from official_shapemask.dataloaders import input_reader
  from official_shapemask.dataloaders import shapemask_parser
  from official_shapemask.modeling import factory
  from official_shapemask.training import datasets
  if keras.backend.backend() != "tensorflow":
    pytest.skip("the TensorFlow side runs under the TensorFlow backend")
  pytest.importorskip("jax")
  keras.mixed_precision.set_global_policy("float32")
  work = tmp_path_factory.mktemp("batch_groups")
  keras.utils.set_random_seed(3)
  model = factory.build_shapemask_model(**MICRO)
  priors = np.random.default_rng(0).uniform(
      size=(91, 2, 32, 32)).astype(np.float32)
  model.prior_head.set_shape_priors(priors)
  np.save(work / "priors.npy", priors)
  model.save_weights(str(work / "init.weights.h5"))
  parser = shapemask_parser.Parser(
      mode="train", seed=0, **datasets.model_input_settings(model))
  dataset = input_reader.build_dataset(tiny_train_records, parser, BATCH,
                                       is_training=True, deterministic=True)
  images, labels = next(iter(dataset))
  np.savez(work / "batch.npz", images=images.numpy(),
           **{k: v.numpy() for k, v in _flat(labels).items()})
  # The halves differ in their counts, so per-group normalisers matter.
  positives = labels["num_positives"].numpy()
  assert positives[:2].sum() != positives[2:].sum(), positives

  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO_ROOT),
             CUDA_VISIBLE_DEVICES="")
  logs = [open(work / f"{name}.log", "w") for name in ("mirrored", "jax")]  # pylint: disable=consider-using-with
  procs = [
      subprocess.Popen(
          [sys.executable, __file__, str(work), str(work / "mirrored"),
           tiny_train_records], cwd=REPO_ROOT, env=env, stdout=logs[0],
          stderr=subprocess.STDOUT),
      subprocess.Popen(
          [sys.executable, "-c", _JAX_SCRIPT, str(work), tiny_train_records,
           str(GROUPS), str(pathlib.Path(__file__).parent)],
          cwd=REPO_ROOT, env=_jax_env(JAX_NUM_CPU_DEVICES="2"),
          stdout=logs[1], stderr=subprocess.STDOUT)]
  try:
    # Meanwhile, the TF loop on one device, with 2 groups and with 1.
    results = {}
    for groups in (GROUPS, 1):
      strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
      model, optimizer = tf_model_and_optimizer(work, strategy)
      model.set_batch_groups(groups)
      losses, state = tf_train(strategy, model, optimizer,
                               per_replica_dataset_fn(work))
      results[f"tf_one_{groups}"] = ({"losses": losses}, state)
  finally:
    texts = [_finish(proc, log) for proc, log in zip(procs, logs)]
  assert "OK" in texts[1], texts[1][-3000:]
  for name in ("mirrored", "jax_one", "jax_all"):
    results[name] = _load_state(work / name)
  with open(work / "jax_wiring.json") as f:
    results["jax_wiring"] = json.load(f)
  return results


def _differences(got, want):
  """Worst relative loss and absolute variable differences."""
  (meta, state), (ref_meta, ref_state) = got, want
  loss = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12)
             for a, b in zip(meta["losses"], ref_meta["losses"]) for k in b)
  weight = max(float(np.max(np.abs(a - b), initial=0.0))
               for g in ref_state for a, b in zip(state[g], ref_state[g]))
  return loss, weight


def _assert_same(got, want):
  (meta, state), (ref_meta, ref_state) = got, want
  assert len(meta["losses"]) == len(ref_meta["losses"]) == STEPS
  for step, (ours, theirs) in enumerate(
      zip(meta["losses"], ref_meta["losses"]), start=1):
    for key in theirs:
      assert ours[key] == pytest.approx(theirs[key], rel=LOSS_RTOL,
                                        abs=1e-7), f"{key} at step {step}"
  for group in ref_state:
    assert len(state[group]) == len(ref_state[group]), group
    for i, (a, b) in enumerate(zip(state[group], ref_state[group])):
      np.testing.assert_allclose(a, b, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                 err_msg=f"{group}/{i}")


# --------------------------------------------------------------------- tests
@pytest.mark.slow
def test_jax_groups_equal_tf_mirrored_replicas(runs):
  mirrored = runs["mirrored"]
  assert mirrored[0]["groups"] == 1  # Two replicas of 2 = the groups of 2.
  for name, devices in (("jax_one", 1), ("jax_all", 2)):
    assert runs[name][0]["devices"] == devices
    _assert_same(runs[name], mirrored)
    print(name, "vs mirrored: loss rel %.2g, variables abs %.2g" %
          _differences(runs[name], mirrored))


@pytest.mark.slow
def test_tf_one_device_groups_equal_mirrored_replicas(runs):
  _assert_same(runs[f"tf_one_{GROUPS}"], runs["mirrored"])
  print("tf one device vs mirrored: loss rel %.2g, variables abs %.2g" %
        _differences(runs[f"tf_one_{GROUPS}"], runs["mirrored"]))


@pytest.mark.slow
def test_groups_change_the_step(runs):
  grouped, whole = runs[f"tf_one_{GROUPS}"], runs["tf_one_1"]
  loss, weight = _differences(whole, grouped)
  # Far outside the tolerances the equalities above hold.
  assert loss > 100 * LOSS_RTOL and weight > 100 * WEIGHT_ATOL, (loss, weight)
  # The moving statistics too (BN variances over 2 images, not 4).
  moving = [np.max(np.abs(a - b)) for a, b in zip(
      grouped[1]["non_trainable"], whole[1]["non_trainable"])]
  assert sum(m > 1e-4 for m in moving) > 10, moving


@pytest.mark.slow
def test_engines_wire_the_group_count(runs):
  assert runs["jax_wiring"]["groups"] == BATCH // 2
  assert runs["jax_wiring"]["message"] == (
      f"train_batch_size={BATCH} is not a multiple of "
      "Experiment.per_replica_batch_size=3")
  assert runs["mirrored"][0]["message"] == (
      f"the per-replica batch of {BATCH // 2} images (train_batch_size="
      f"{BATCH} over 2 replicas) is not a multiple of "
      f"Experiment.per_replica_batch_size={BATCH}")


# -------------------------------------------- in process (TensorFlow loop)
@pytest.fixture
def clean_gin():
  import gin
  import keras
  with gin.unlock_config():
    gin.clear_config()
  yield
  with gin.unlock_config():
    gin.clear_config()
  keras.mixed_precision.set_global_policy("float32")


def _parse_tiny(records, *bindings):
  from official_shapemask.training import gin_utils
  gin_utils.parse_config(["tiny_cpu.gin"], [
      f"TRAIN_FILE_PATTERN='{records}'", f"TRAIN_BATCH_SIZE={BATCH}",
      *bindings])


def test_tf_experiment_sets_groups_per_replica_batch(clean_gin,
                                                     tiny_train_records,
                                                     tmp_path):
  from official_shapemask.training import controller
  _parse_tiny(tiny_train_records, "Experiment.per_replica_batch_size=2")
  exp = controller.build(str(tmp_path / "run"),
                         print_fn=lambda *a, **k: None)
  try:
    exp.start("train")
    assert exp.settings.per_replica_batch_size == 2
    model = exp.engine.model
    assert model.batch_groups == BATCH // 2
    norms = [layer.num_groups for layer in model._flatten_layers()  # pylint: disable=protected-access
             if hasattr(layer, "num_groups")]
    assert len(norms) > 20 and set(norms) == {BATCH // 2}
  finally:
    exp.close()


@pytest.mark.parametrize("bindings,message", [
    (["Experiment.per_replica_batch_size=3"],
     f"train_batch_size={BATCH} is not a multiple of "
     "Experiment.per_replica_batch_size=3"),
    (["Experiment.per_replica_batch_size=0"],
     "Experiment.per_replica_batch_size=0 is not a positive integer (or "
     "None)"),
    (["Experiment.per_replica_batch_size=2",
      "build_shapemask_model.use_sync_bn=True"],
     "Experiment.per_replica_batch_size=2 asks for batch-norm statistics "
     "over groups of that many images, but build_shapemask_model."
     "use_sync_bn=True takes them over all replicas: unset one of the two"),
])
def test_bad_per_replica_batch_size_fails_before_the_strategy(
    clean_gin, tiny_train_records, tmp_path, bindings, message):
  from official_shapemask.training import controller
  from official_shapemask.training import settings
  _parse_tiny(tiny_train_records, *bindings)
  exp = controller.build(str(tmp_path / "run"))
  with pytest.raises(settings.InvalidInputError) as err:
    exp.start("train")
  assert str(err.value) == message
  assert exp.engine.strategy is None
  assert not (tmp_path / "run").exists()


def test_seed_configs_normalise_per_8_images(clean_gin, tiny_train_records):
  import gin
  from official_shapemask.training import gin_utils
  from official_shapemask.training import settings
  gin_dir = REPO_ROOT / "gin"
  for path in sorted(gin_dir.rglob("*.gin")):
    name = str(path.relative_to(gin_dir))
    with gin.unlock_config():
      gin.clear_config()
    gin_utils.parse_config([name], [f"TRAIN_FILE_PATTERN='{tiny_train_records}'",
                                    "SHAPE_PRIOR_PATH=None"])
    exp = settings.Settings("unused")
    # The CPU-sized configs keep each engine's own batch; the seed's: 8.
    want = None if name in ("tiny_cpu.gin", "demo.gin") else 8
    assert exp.per_replica_batch_size == want, name
    if want:
      assert exp.train_batch_size % want == 0, name


def test_inference_and_default_fit_do_not_depend_on_groups(runs_inputs):
  """A fresh model trains in one group; inference ignores the setting."""
  import keras
  import tensorflow as tf
  from official_shapemask.modeling import factory
  work, images, labels = runs_inputs
  model = factory.build_shapemask_model(**MICRO)
  model.prior_head.set_shape_priors(np.load(f"{work}/priors.npy"))
  model.load_weights(f"{work}/init.weights.h5")
  assert model.batch_groups == 1
  before = model(images, training=False)
  model.set_batch_groups(GROUPS)
  after = model(images, training=False)
  for key in before:
    np.testing.assert_array_equal(np.asarray(after[key]),
                                  np.asarray(before[key]), err_msg=key)
  # `fit` trains with the model's setting: one group unless set.
  model.set_batch_groups(1)
  outputs = model(model.pack_inputs(images, labels), training=True)
  whole = model.compute_losses(labels, outputs)
  model.set_batch_groups(GROUPS)
  grouped = model.compute_losses(labels, outputs)
  model.set_batch_groups(1)
  model.compile(optimizer=keras.optimizers.SGD(0.01))
  history = model.fit(
      tf.data.Dataset.from_tensors((images, labels)).repeat(), epochs=1,
      steps_per_epoch=1, verbose=0)
  logged = history.history["cls_loss"][0]
  assert logged == pytest.approx(float(whole["cls_loss"]), rel=1e-4)
  assert logged != pytest.approx(float(grouped["cls_loss"]), rel=1e-2)


@pytest.fixture(scope="module")
def runs_inputs(tiny_train_records, tmp_path_factory):
  """Weights, priors and a batch of 4 for the in-process checks."""
  import keras
  from official_shapemask.dataloaders import input_reader
  from official_shapemask.dataloaders import shapemask_parser
  from official_shapemask.modeling import factory
  from official_shapemask.training import datasets
  keras.mixed_precision.set_global_policy("float32")
  work = tmp_path_factory.mktemp("groups_inference")
  keras.utils.set_random_seed(4)
  model = factory.build_shapemask_model(**MICRO)
  np.save(work / "priors.npy", np.random.default_rng(1).uniform(
      size=(91, 2, 32, 32)).astype(np.float32))
  model.save_weights(str(work / "init.weights.h5"))
  parser = shapemask_parser.Parser(
      mode="train", seed=0, **datasets.model_input_settings(model))
  dataset = input_reader.build_dataset(tiny_train_records, parser, BATCH,
                                       is_training=True, deterministic=True)
  images, labels = next(iter(dataset))
  return str(work), images, labels


if __name__ == "__main__":
  sys.path.insert(0, str(REPO_ROOT))
  _mirrored_main(*sys.argv[1:4])
