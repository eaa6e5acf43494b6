"""A run in-process (controller + TensorFlow engine): fail-fast input checks,
fine-tuning, NaN stop, background COCO evaluation.

Real data: coco_tiny160 records (conftest) and the synthetic shapes dataset
(6 classes) for fine-tuning a 91-class checkpoint into a 7-class model.
"""
import json
import os
import re
import warnings

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.modeling import factory
from official_shapemask.weights import checkpoints
from official_shapemask.weights import restore_report
from official_shapemask.training import controller
from official_shapemask.training import gin_utils
from official_shapemask.training import settings
from official_shapemask.training import train_loop

# The tiny_cpu.gin model as plain keyword arguments (for models built outside
# gin); test_tiny_kwargs_match_tiny_cpu_gin keeps the two in step.
TINY = dict(image_size=128, backbone_depth=10, backbone_width_multiplier=0.5,
            freeze_early_convs=False, min_level=3, max_level=5,
            fpn_num_filters=64, head_num_convs=2, head_num_filters=64,
            num_downsample_channels=32, mask_num_convs=2, mask_num_filters=32,
            pre_nms_num_boxes=1000, norm_momentum=0.9, l2_weight_decay=1e-5)


@pytest.fixture
def clean_gin():
  with gin.unlock_config():
    gin.clear_config()
  yield
  with gin.unlock_config():
    gin.clear_config()
  keras.mixed_precision.set_global_policy("float32")


def _parse(*bindings):
  gin_utils.parse_config(["tiny_cpu.gin"], list(bindings))


def _lines(captured):
  return "\n".join(str(x) for x in captured)


@pytest.fixture(scope="module")
def synthetic_records(tmp_path_factory):
  """8 train images of the 6-class synthetic dataset as TFRecords."""
  from official_shapemask.data_prep import coco_tfrecord
  from official_shapemask.cli import make_synthetic_coco
  root = tmp_path_factory.mktemp("synthetic")
  info = make_synthetic_coco.make_synthetic_coco(
      str(root / "coco"), num_train=8, num_val=1, image_size=128, seed=3)
  prefix = str(root / "train")
  coco_tfrecord.convert_coco_to_tfrecords(
      image_dir=info["train"]["image_dir"],
      object_annotations_file=info["train"]["annotation_file"],
      output_file_prefix=prefix, num_shards=2, num_workers=1,
      show_progress=False)
  return prefix + "-*"


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
  """A 91-class tiny model and its training checkpoint (model + optimizer)."""
  keras.utils.set_random_seed(5)
  model = factory.build_shapemask_model(num_classes=91, num_clusters=4, **TINY)
  # Non-default values everywhere, so a restored value is recognisable.
  for v in model.variables:
    v.assign(np.random.default_rng(len(v.path)).uniform(
        0.1, 0.9, v.shape).astype(np.float32))
  optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
  optimizer.build(model.trainable_variables)
  path = tf.train.Checkpoint(model=model, optimizer=optimizer).save(
      str(tmp_path_factory.mktemp("ckpt91") / "ckpt"))
  return model, path


def _values(model):
  return {p: v.numpy() for p, v in
          restore_report.model_variable_paths(model).items()}


# ------------------------------------------------------------ configuration
def test_tiny_kwargs_match_tiny_cpu_gin(clean_gin):
  _parse("TRAIN_FILE_PATTERN='x'")
  bound = gin.get_bindings(factory.build_shapemask_model)
  for key, value in TINY.items():
    assert bound[key] == value, key


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize("binding,named", [
    ("TRAIN_FILE_PATTERN='{tmp}/nothing-*'", "{tmp}/nothing-*"),
    ("SHAPE_PRIOR_PATH='{tmp}/missing_priors.npy'",
     "{tmp}/missing_priors.npy"),
    ("RESNET_CHECKPOINT='{tmp}/no_ckpt/ckpt-7'", "{tmp}/no_ckpt/ckpt-7"),
    ("RESNET_CHECKPOINT='{tmp}/resnet.weights.h5'", "{tmp}/resnet.weights.h5"),
    ("build_momentum_optimizer.momentum_form='tf2'", "momentum_form='tf2'"),
    ("build_shapemask_model.l2_variables='seed'", "l2_variables='seed'"),
])
def test_bad_input_fails_before_the_strategy_starts(
    clean_gin, tiny_train_records, tmp_path, binding, named):
  tmp = str(tmp_path)
  bindings = [f"TRAIN_FILE_PATTERN='{tiny_train_records}'",
              binding.format(tmp=tmp)]
  _parse(*bindings)
  exp = controller.build(str(tmp_path / "run"))
  with pytest.raises(settings.InvalidInputError) as err:
    exp.start("train")
  assert named.format(tmp=tmp) in str(err.value)
  assert exp.engine.strategy is None  # Nothing started.
  assert not (tmp_path / "run").exists()


def test_eval_pattern_checked_for_train_and_eval(clean_gin, tiny_train_records,
                                                 tmp_path):
  _parse(f"TRAIN_FILE_PATTERN='{tiny_train_records}'",
         f"EVAL_FILE_PATTERN='{tmp_path}/val-*'")
  exp = controller.build(str(tmp_path / "run"))
  with pytest.raises(settings.InvalidInputError, match="eval_file_pattern"):
    exp.start("train_and_eval")
  assert exp.engine.strategy is None


def test_priors_with_another_class_count_fail_with_both_numbers(
    clean_gin, tiny_train_records, tmp_path):
  priors = tmp_path / "priors_91.npy"
  np.save(priors, np.full((91, 20, 32, 32), 0.5, np.float32))
  _parse(f"TRAIN_FILE_PATTERN='{tiny_train_records}'",
         f"SHAPE_PRIOR_PATH='{priors}'", "NUM_CLASSES=7")
  exp = controller.build(str(tmp_path / "run"))
  with pytest.raises(settings.InvalidInputError) as err:
    exp.start("train")
  message = str(err.value)
  assert str(priors) in message
  assert "91" in message and "7" in message, message
  assert exp.engine.strategy is None


def test_priors_of_another_size_fail_with_both_sizes(clean_gin,
                                                     tiny_train_records,
                                                     tmp_path):
  priors = tmp_path / "priors_16px.npy"
  np.save(priors, np.full((91, 4, 16, 16), 0.5, np.float32))
  _parse(f"TRAIN_FILE_PATTERN='{tiny_train_records}'",
         f"SHAPE_PRIOR_PATH='{priors}'")
  exp = controller.build(str(tmp_path / "run"))
  with pytest.raises(settings.InvalidInputError) as err:
    exp.start("train")
  message = str(err.value)
  assert str(priors) in message and "16x16" in message, message
  assert "mask_crop_size is 32" in message, message
  assert exp.engine.strategy is None
  assert not (tmp_path / "run").exists()


# -------------------------------------------------------------- fine-tuning
def test_restore_all_into_another_class_count(coco_checkpoint):
  source, path = coco_checkpoint
  target = factory.build_shapemask_model(num_classes=7, num_clusters=4, **TINY)
  before = _values(target)
  printed = []
  report = checkpoints.restore_partial(target, path, "all",
                                       print_fn=printed.append)
  src, after = _values(source), _values(target)
  differ = {p for p in src if src[p].shape != after[p].shape}
  # The class-dependent variables: class logits, priors, mask class columns.
  assert any(p.startswith("model/head/") for p in differ)
  assert any(p.startswith("model/prior_head/") for p in differ)
  assert any(p.startswith("model/coarse_head/") for p in differ)
  assert any(p.startswith("model/fine_head/") for p in differ)
  skipped = dict(report.skipped)
  assert set(skipped) == differ
  for p in differ:
    assert skipped[p].startswith("shape differs"), skipped[p]
    assert str(tuple(src[p].shape)) in skipped[p]
    np.testing.assert_array_equal(after[p], before[p])  # Untouched.
  restored = {p for p, _ in report.restored}
  assert restored == set(after) - differ
  for p in restored:
    np.testing.assert_array_equal(after[p], src[p])
  table = printed[0]
  assert path in table
  assert f"{len(restored)} restored, {len(differ)} skipped" in table
  for p in differ:
    assert re.search(rf"skipped\s+{re.escape(p)}\s+shape differs", table)


@pytest.mark.parametrize("modules,tops", [("backbone", {"backbone"}),
                                          ("backbone_fpn",
                                           {"backbone", "decoder"})])
def test_restore_modules(coco_checkpoint, modules, tops):
  source, path = coco_checkpoint
  target = factory.build_shapemask_model(num_classes=91, num_clusters=4,
                                         **TINY)
  before = _values(target)
  report = checkpoints.restore_partial(target, path, modules, print_fn=None)
  src, after = _values(source), _values(target)
  assert not report.skipped
  restored = {p for p, _ in report.restored}
  assert restored == {p for p in src if p.split("/")[1] in tops}
  for p in after:
    expected = src[p] if p in restored else before[p]
    np.testing.assert_array_equal(after[p], expected, err_msg=p)


def test_keras_resnet_weights_file(coco_checkpoint, tmp_path):
  source, _ = coco_checkpoint
  path = checkpoints.save_backbone_weights(
      source, str(tmp_path / "resnet10.weights.h5"))
  assert sorted(os.listdir(tmp_path)) == ["resnet10.weights.h5"]
  target = factory.build_shapemask_model(num_classes=7, num_clusters=4, **TINY)
  before = _values(target)
  printed = []
  report = checkpoints.restore_partial(target, path, "backbone",
                                       print_fn=printed.append)
  src, after = _values(source), _values(target)
  backbone = {p for p in src if p.startswith("model/backbone/")}
  assert {p for p, _ in report.restored} == backbone
  for p in after:
    np.testing.assert_array_equal(
        after[p], src[p] if p in backbone else before[p], err_msg=p)
  assert f"{len(backbone)} restored, 0 skipped" in printed[0]

  # A whole model's Keras weights file serves backbone_fpn as well.
  whole = str(tmp_path / "shapemask.weights.h5")
  source.save_weights(whole)
  target2 = factory.build_shapemask_model(num_classes=7, num_clusters=4,
                                          **TINY)
  report = checkpoints.restore_partial(target2, whole, "backbone_fpn",
                                       print_fn=None)
  fpn = {p for p in src if p.split("/")[1] in ("backbone", "decoder")}
  assert {p for p, _ in report.restored} == fpn
  for p in fpn:
    np.testing.assert_array_equal(_values(target2)[p], src[p])

  # Another depth does not fit: named error; 'all' is refused.
  deeper = factory.build_shapemask_model(
      num_classes=7, num_clusters=4, **dict(TINY, backbone_depth=18))
  with pytest.raises(ValueError, match=re.escape(path)), \
      warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Keras warns about each missing group.
    checkpoints.restore_partial(deeper, path, "backbone", print_fn=None)
  with pytest.raises(ValueError, match="'all'"):
    checkpoints.restore_partial(target, path, "all", print_fn=None)


def test_finetune_91_class_checkpoint_on_7_classes(
    clean_gin, coco_checkpoint, synthetic_records, tmp_path):
  _, path = coco_checkpoint
  _parse(f"TRAIN_FILE_PATTERN='{synthetic_records}'", "NUM_CLASSES=7",
         f"RESNET_CHECKPOINT='{path}'", "INIT_CHECKPOINT_MODULES='all'",
         "TOTAL_STEPS=2", "STEPS_PER_LOOP=2", "CHECKPOINT_EVERY=2")
  printed = []
  exp = controller.build(str(tmp_path / "run"),
                              print_fn=lambda *a, **k: printed.append(a[0]))
  try:
    exp.start("train")
    losses = exp.train()
  finally:
    exp.close()
  text = _lines(printed)
  assert f"Restored from {path} (modules=all)" in text
  assert re.search(r"skipped\s+model/head/\S+\s+shape differs", text)
  assert re.search(r"restored\s+model/backbone/\S+", text)
  assert exp.step == 2
  assert all(np.isfinite(v) for v in losses.values())
  assert tf.train.latest_checkpoint(str(tmp_path / "run")).endswith("ckpt-2")


# --------------------------------------------- NaN / inf / explosion
def test_divergence_stops_with_the_step_and_keeps_last_good_checkpoint(
    clean_gin, tiny_train_records, tmp_path):
  # A real cause: the learning rate jumps to 1e10 from step 3 on; the loss
  # overflows a few steps later.
  _parse(f"TRAIN_FILE_PATTERN='{tiny_train_records}'", "WARMUP_STEPS=1",
         "WARMUP_LR=0.01", "INIT_LR=0.01", "LR_LEVELS=[1e10]",
         "LR_STEPS=[3]", "TOTAL_STEPS=12", "STEPS_PER_LOOP=3",
         "CHECKPOINT_EVERY=3")
  model_dir = tmp_path / "run"
  exp = controller.build(str(model_dir), print_fn=lambda *a, **k: None)
  try:
    exp.start("train")
    with pytest.raises(train_loop.DivergenceError) as err:
      exp.train()
  finally:
    exp.close()
  message = str(err.value)
  # Caught as an explosion (finite) or as NaN / inf, whichever comes first.
  match = re.search(
      r"(loss explosion at|non-finite loss at|non-finite weights after) "
      r"step (\d+)", message)
  assert match, message
  bad_step = int(match.group(2))
  assert 4 <= bad_step < 12
  if match.group(1) != "non-finite weights after":  # Stopped at the step.
    assert exp.step == bad_step
  last = tf.train.latest_checkpoint(str(model_dir))
  assert last is not None and last in message
  last_step = int(last.rsplit("-", 1)[1])
  assert 3 <= last_step < bad_step
  reader = tf.train.load_checkpoint(last)
  for name in reader.get_variable_to_shape_map():
    value = reader.get_tensor(name)
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
      assert np.all(np.isfinite(value)), name


# ------------------------------------------------ background COCO evaluation
@pytest.mark.slow
def test_train_and_eval_scores_in_the_background(
    clean_gin, tiny_train_records, tiny_val_records, tmp_path):
  """The TensorFlow engine's evaluations inside train_and_eval run COCOeval
  in a spawned process while training goes on; the result is the one a
  foreground evaluation of the same checkpoint gives."""
  _parse(f"TRAIN_FILE_PATTERN='{tiny_train_records}'",
         f"EVAL_FILE_PATTERN='{tiny_val_records}'", "TOTAL_STEPS=4",
         "STEPS_PER_LOOP=2", "CHECKPOINT_EVERY=2", "EVAL_EVERY=2",
         "EVAL_SAMPLES=8", "EVAL_BATCH_SIZE=4")
  model_dir = tmp_path / "run"
  printed = []
  run = controller.build(str(model_dir),
                         print_fn=lambda *a, **k: printed.append(a[0]))
  try:
    run.start("train_and_eval")
    run.train(2)
    assert run.evaluate() is None  # Scored in the background.
    assert run.evaluations.pending == 1
    run.train(4)  # Training goes on meanwhile.
    final = run.evaluate()  # The last step: in the foreground.
  finally:
    run.close()
  assert run.evaluations.pending == 0
  assert final["step"] == 4
  background = json.loads((model_dir / "eval_2.json").read_text())
  assert background["step"] == 2 and background["num_images"] == 8
  text = _lines(printed)
  assert text.count("Evaluation at step 2 (8 images") == 1
  assert text.count("Evaluation at step 4 (8 images") == 1
  assert text.index("step 4/4 ") < text.index("Evaluation at step 4")

  # The same checkpoint evaluated in the foreground (--mode=eval's path).
  (model_dir / "eval_2.json").unlink()
  evaluation = controller.build(str(model_dir), print_fn=lambda *a, **k: None)
  try:
    evaluation.start("eval")
    assert evaluation.restore(str(model_dir / "ckpt-2")) == 2
    evaluation.evaluate()
  finally:
    evaluation.close()
  again = json.loads((model_dir / "eval_2.json").read_text())
  timing = ("eval_seconds", "predict_seconds")
  assert {k: v for k, v in again.items() if k not in timing} == {
      k: v for k, v in background.items() if k not in timing}
