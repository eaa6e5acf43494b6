"""RESNET_CHECKPOINT in train.py: TF1 files, the seed's defaults, scratch.

The seed's configs point at its public ImageNet files on gs://; without a
network train.py must stop before the strategy starts, in one line that
says what to do. With no checkpoint nothing stays frozen.
"""
import os
import pathlib
import subprocess
import sys
import time

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from official_shapemask.modeling import factory
from official_shapemask.weights import checkpoints
from official_shapemask.training import controller
from official_shapemask.training import gin_utils
from official_shapemask.training import settings
from official_shapemask.weights import init_checkpoint
from official_shapemask.weights import tf1_names

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# An object that does not exist in the seed's public bucket: unreadable with
# or without a network.
MISSING_GS = "gs://cloud-tpu-checkpoints/retinanet/no-such-checkpoint-for-tests"


@pytest.fixture
def clean_gin():
  with gin.unlock_config():
    gin.clear_config()
  yield
  with gin.unlock_config():
    gin.clear_config()
  keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def train_pattern(tmp_path_factory):
  """A train pattern that matches a file (start() reads no data)."""
  tmp = tmp_path_factory.mktemp("data")
  (tmp / "train-00000-of-00001").write_bytes(b"")
  return str(tmp / "train-*")


def _write_name_based(prefix, tensors):
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names,
                    shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])
  return str(prefix)


def _lines(printed):
  return "\n".join(str(x) for x in printed)


@pytest.mark.parametrize("name,path,prefix", [
    ("shapemask_r50.gin",
     "gs://cloud-tpu-checkpoints/retinanet/resnet50-checkpoint-2018-02-07",
     "resnet50/"),
    ("shapemask_r101.gin",
     "gs://cloud-tpu-checkpoints/shapemask/retinanet/"
     "resnet101-checkpoint-2018-02-24", "resnet101/"),
    ("benchmarks/shapemask_r101_b256.gin",
     "gs://cloud-tpu-checkpoints/shapemask/retinanet/"
     "resnet101-checkpoint-2018-02-24", "resnet101/"),
    ("shapemask_base.gin", None, None),
    ("tiny_cpu.gin", None, None),
])
def test_configs_default_to_the_seeds_imagenet_files(clean_gin, train_pattern,
                                                     name, path, prefix):
  gin_utils.parse_config([name], [f"TRAIN_FILE_PATTERN='{train_pattern}'",
                                  "SHAPE_PRIOR_PATH=None"])
  exp = settings.Settings("unused")
  assert exp.init_checkpoint == path
  assert exp.init_checkpoint_prefix == prefix
  assert exp.init_checkpoint_modules == "backbone"


def test_unreadable_remote_file_stops_before_start_with_what_to_do(
    clean_gin, train_pattern, tmp_path):
  gin_utils.parse_config(["shapemask_r101.gin"], [
      f"TRAIN_FILE_PATTERN='{train_pattern}'", "SHAPE_PRIOR_PATH=None",
      "build_shapemask_model.num_clusters=20",
      f"RESNET_CHECKPOINT='{MISSING_GS}'"])
  exp = controller.build(str(tmp_path / "run"))
  start = time.time()
  with pytest.raises(settings.InvalidInputError) as err:
    exp.start("train")
  seconds = time.time() - start
  message = str(err.value)
  assert exp.engine.strategy is None and not (tmp_path / "run").exists()
  assert "\n" not in message
  assert f"RESNET_CHECKPOINT='{MISSING_GS}' cannot be read" in message
  assert "local copy" in message
  assert "keras_hub:resnet_101_imagenet" in message
  assert "RESNET_CHECKPOINT=None" in message
  assert seconds < 65, seconds  # Bounded by OPEN_TIMEOUT_S, not minutes.


def test_train_py_with_the_seeds_config_stops_in_one_line(train_pattern,
                                                          tmp_path):
  model_dir = tmp_path / "run"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  start = time.time()
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "train.py"),
       "--gin_file=shapemask_r50.gin",
       f"--gin_bindings=TRAIN_FILE_PATTERN='{train_pattern}'",
       "--gin_bindings=SHAPE_PRIOR_PATH=None",
       "--gin_bindings=build_shapemask_model.num_clusters=20",
       f"--gin_bindings=RESNET_CHECKPOINT='{MISSING_GS}'",
       f"--model_dir={model_dir}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False)
  seconds = time.time() - start
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines()
            if l.startswith("train.py: error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert "cannot be read" in errors[0] and "keras_hub:resnet_50_imagenet" in (
      errors[0])
  assert "Traceback" not in result.stderr
  assert not model_dir.exists()
  print(f"train.py stopped after {seconds:.1f} s")


def _tiny_model_and_backbone_file(tmp_path, seed=3):
  """The tiny_cpu.gin model and an ImageNet-style TF1 file for it."""
  model = factory.build_shapemask_model()
  rng = np.random.default_rng(seed)
  scope = tf1_names.backbone_scope(model.backbone.get_config()["depth"])
  tensors = {}
  for entry in tf1_names.tf1_variables(model):
    if entry.module == "backbone":
      tensors[entry.name[len(scope):]] = rng.uniform(
          0.5, 1.0, tuple(entry.variable.shape)).astype(np.float32)
  tensors["dense/kernel"] = np.zeros((32, 10), np.float32)
  tensors["global_step"] = np.array(5, np.int64)
  return scope, _write_name_based(tmp_path / "resnet" / "model.ckpt-5",
                                  tensors), tensors


def test_tf1_backbone_file_initialises_training_and_keeps_freezing(
    clean_gin, train_pattern, tmp_path):
  gin_utils.parse_config(["tiny_cpu.gin"], [
      f"TRAIN_FILE_PATTERN='{train_pattern}'",
      "build_shapemask_model.freeze_early_convs=True"])
  scope, path, tensors = _tiny_model_and_backbone_file(tmp_path)
  # Without the prefix: refused before the strategy starts, with the hint.
  exp = controller.build(str(tmp_path / "run0"))
  exp.settings.init_checkpoint = path
  with pytest.raises(settings.InvalidInputError,
                     match=f"prefix '{scope}'"):
    exp.start("train")
  assert exp.engine.strategy is None

  printed = []
  exp = controller.build(str(tmp_path / "run"),
                              print_fn=lambda *a, **k: printed.append(a[0]))
  exp.settings.init_checkpoint, exp.settings.init_checkpoint_prefix = path, scope
  try:
    exp.start("train")
    stem = exp.engine.model.backbone.stem.conv.kernel
    np.testing.assert_array_equal(ops.convert_to_numpy(stem),
                                  tensors["conv2d/kernel"])
    assert not stem.trainable
    assert exp.engine.model.backbone.groups[1][0].convs[0].conv.kernel.trainable
  finally:
    exp.close()
  text = _lines(printed)
  assert f"Restored from TF1 checkpoint {path} (prefix={scope!r}" in text
  assert "stay frozen" in text
  assert "1 global_step" in text and "1 classifier" in text


def test_from_scratch_nothing_stays_frozen(clean_gin, train_pattern,
                                           tmp_path):
  gin_utils.parse_config(["tiny_cpu.gin"], [
      f"TRAIN_FILE_PATTERN='{train_pattern}'",
      "build_shapemask_model.freeze_early_convs=True",
      "build_shapemask_model.freeze_early_norms=True"])
  printed = []
  exp = controller.build(str(tmp_path / "run"),
                              print_fn=lambda *a, **k: printed.append(a[0]))
  try:
    exp.start("train")
    backbone = exp.engine.model.backbone
    assert backbone.stem.conv.kernel.trainable
    assert backbone.stem.bn.gamma.trainable
    assert all(v.trainable for v in backbone.groups[0][0].convs[0].weights
               if "moving" not in v.path)
    trainable = {id(v) for v in exp.engine.model.trainable_variables}
    assert id(backbone.stem.conv.kernel) in trainable
  finally:
    exp.close()
  text = _lines(printed)
  assert "No RESNET_CHECKPOINT: training from scratch" in text
  assert "freeze_early_convs and freeze_early_norms set to False" in text


def test_dispatch_tells_the_kinds_apart(clean_gin, tmp_path):
  gin_utils.parse_config(["tiny_cpu.gin"], ["TRAIN_FILE_PATTERN='unused'"])
  scope, path, _ = _tiny_model_and_backbone_file(tmp_path)
  model = factory.build_shapemask_model()
  assert init_checkpoint.checkpoint_kind(path) == init_checkpoint.TF1
  assert init_checkpoint.validate(path, prefix=scope, depth=10) == "tf1"
  with pytest.raises(ValueError, match="ResNet-18"):
    init_checkpoint.validate(path, prefix="resnet18/", depth=18)
  ours = tf.train.Checkpoint(model=model).write(str(tmp_path / "ours"))
  assert init_checkpoint.checkpoint_kind(ours) == init_checkpoint.TF2
  weights = checkpoints.save_backbone_weights(
      model, str(tmp_path / "b.weights.h5"))
  assert init_checkpoint.checkpoint_kind(weights) == (
      init_checkpoint.KERAS_WEIGHTS)
  lines = []
  init_checkpoint.restore(factory.build_shapemask_model(), weights,
                          "backbone", prefix=scope, print_fn=lines.append)
  assert f"RESNET_CHECKPOINT_PREFIX={scope!r} is not used" in lines[0]
  report = init_checkpoint.restore(factory.build_shapemask_model(), path,
                                   "backbone", prefix=scope, print_fn=None)
  assert {p.split("/")[1] for p, _ in report.restored} == {"backbone"}
  report = init_checkpoint.restore(factory.build_shapemask_model(), ours,
                                   "all", print_fn=None)
  assert not report.skipped
