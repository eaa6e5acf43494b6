"""TF1 name-based checkpoints: prefix semantics, reports and errors.

Small synthetic files written with `tf.raw_ops.SaveV2` (name-based, as a
TF1 `Saver` writes them) under the names of `tf1_names`; that those names
are the reference's is shown by tests/reference/test_tf1_parity.py, which
reads files written by the seed's own code.
"""
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from official_shapemask.modeling import factory
from official_shapemask.weights import checkpoints
from official_shapemask.weights import errors
from official_shapemask.weights import init_checkpoint
from official_shapemask.weights import tf1_checkpoints
from official_shapemask.weights import tf1_names

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = dict(image_size=64, backbone_depth=10, backbone_width_multiplier=0.25,
             min_level=3, max_level=5, fpn_num_filters=16, head_num_convs=1,
             head_num_filters=16, num_downsample_channels=8, mask_num_convs=1,
             mask_num_filters=8, pre_nms_num_boxes=100)


def _small_model(num_classes=5, **overrides):
  return factory.build_shapemask_model(
      num_classes=num_classes, num_clusters=2, **dict(SMALL, **overrides))


def write_name_based(prefix, tensors):
  """Writes `{name: array}` as a TF1 (name-based) checkpoint at `prefix`."""
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names,
                    shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(tensors[n]) for n in names])
  return str(prefix)


def _tf1_values(model, seed=0):
  """Random values under the reference's names for every TF1 variable."""
  rng = np.random.default_rng(seed)
  out = {}
  for entry in tf1_names.tf1_variables(model):
    shape = tuple(entry.variable.shape)
    if entry.dense_to_conv:
      shape = shape[2:]
    out[entry.name] = rng.uniform(0.1, 0.9, shape).astype(np.float32)
  return out


def _value(variable):
  return ops.convert_to_numpy(variable)


@pytest.fixture(scope="module")
def model():
  return _small_model()


@pytest.fixture(scope="module")
def whole_file(model, tmp_path_factory):
  """A whole-model TF1 checkpoint: graph names, global_step, slots."""
  values = _tf1_values(model)
  tensors = dict(values)
  tensors["global_step"] = np.array(900, np.int64)
  tensors.update({f"{n}/Momentum": v for n, v in values.items()
                  if n.startswith("fpn/")})
  path = write_name_based(tmp_path_factory.mktemp("whole") / "model.ckpt-9",
                          tensors)
  return path, values


@pytest.fixture(scope="module")
def imagenet_file(model, tmp_path_factory):
  """The seed's ImageNet layout: root-level names, classifier, slots."""
  values = {n[len("resnet10/"):]: v
            for n, v in _tf1_values(model, seed=1).items()
            if n.startswith("resnet10/")}
  tensors = dict(values)
  tensors["dense/kernel"] = np.ones((16, 1000), np.float32)
  tensors["dense/bias"] = np.ones((1000,), np.float32)
  tensors["global_step"] = np.array(112603, np.int64)
  tensors.update({f"{n}/Momentum": v for n, v in values.items()})
  path = write_name_based(tmp_path_factory.mktemp("imagenet") / "ckpt",
                          tensors)
  return path, values


def test_names_follow_the_references_creation_order(model):
  names = [e.name for e in tf1_names.tf1_variables(model)]
  # ResNet-10: stem + 4 blocks of (projection, conv1, conv2).
  assert tf1_names.resnet_conv_count(10) == 13
  assert names[:5] == ["resnet10/conv2d/kernel",
                       "resnet10/batch_normalization/gamma",
                       "resnet10/batch_normalization/beta",
                       "resnet10/batch_normalization/moving_mean",
                       "resnet10/batch_normalization/moving_variance"]
  block = model.backbone.groups[0][0]
  entries = {e.name: e.variable for e in tf1_names.tf1_variables(model)}
  assert entries["resnet10/conv2d_1/kernel"] is block.shortcut.conv.kernel
  assert entries["resnet10/conv2d_3/kernel"] is block.convs[1].conv.kernel
  assert entries["resnet10/batch_normalization_12/moving_variance"] is (
      model.backbone.groups[3][0].convs[1].bn.moving_variance)
  assert entries["retinanet/class_net/class-0-4/beta"] is (
      model.head.class_norms["0-4"].beta)
  assert entries["fine_mask/conv2d_transpose/kernel"] is (
      model.fine_head.upsample.kernel)
  assert len(names) == len(set(names))
  covered = {id(e.variable) for e in tf1_names.tf1_variables(model)}
  left = [v.path for v in model.weights if id(v) not in covered]
  assert left == [model.prior_head.shape_priors.path]
  # The conv counts of the reference's ResNets.
  assert {d: tf1_names.resnet_conv_count(d) for d in (50, 101, 152)} == {
      50: 53, 101: 104, 152: 155}


def test_whole_model_file_restores_every_variable(model, whole_file):
  path, values = whole_file
  target = _small_model()
  lines = []
  report = checkpoints.restore_tf1_checkpoint(target, path, modules="all",
                                              print_fn=lines.append)
  for entry in tf1_names.tf1_variables(target):
    np.testing.assert_array_equal(
        _value(entry.variable),
        values[entry.name].reshape(entry.variable.shape), err_msg=entry.name)
  assert len(report.restored) == len(values)
  assert [p for p, _ in report.skipped] == ["model/prior_head/shape_priors"]
  fpn_slots = sum(n.startswith("fpn/") for n in values)
  assert report.ignored == {"global_step": 1, "optimizer slots": fpn_slots,
                            "classifier": 0, "other": 0}
  assert f"{len(values)} restored, 1 skipped" in lines[0]
  # A directory with a `checkpoint` file resolves to its latest prefix,
  # and modules select what is read.
  directory = os.path.dirname(path)
  tf.compat.v1.train.update_checkpoint_state(directory, path)
  fresh = _small_model()
  report = checkpoints.restore_tf1_checkpoint(
      fresh, directory, modules="backbone_fpn", print_fn=None)
  assert {p.split("/")[1] for p, _ in report.restored} == {"backbone",
                                                           "decoder"}
  assert report.ignored["other"] > 0  # The heads' names, not selected.


def test_imagenet_file_needs_the_seeds_prefix(model, imagenet_file):
  path, values = imagenet_file
  with pytest.raises(ValueError) as err:
    checkpoints.restore_tf1_checkpoint(model, path, print_fn=None)
  message = str(err.value)
  assert path in message and "root-level names" in message
  assert "prefix 'resnet10/'" in message and "conv2d/kernel" in message

  target = _small_model()
  report = checkpoints.restore_tf1_checkpoint(
      target, path, prefix="resnet10/", modules="backbone", print_fn=None)
  assert len(report.restored) == len(values) == 13 * 5
  assert report.ignored == {"global_step": 1,
                            "optimizer slots": len(values),
                            "classifier": 2, "other": 0}
  np.testing.assert_array_equal(
      _value(target.backbone.groups[1][0].convs[1].bn.moving_mean),
      values["batch_normalization_6/moving_mean"])
  # backbone_fpn with the prefix: the FPN is outside it, listed as skipped.
  report = checkpoints.restore_tf1_checkpoint(
      target, path, prefix="resnet10/", modules="backbone_fpn",
      print_fn=None)
  outside = [r for p, r in report.skipped if p.startswith("model/decoder")]
  assert outside and all("outside prefix 'resnet10/'" in r for r in outside)


@pytest.mark.parametrize("prefix,expected", [
    ("resnet10/", "whole-model checkpoint"),
    ("resnet101/", "prefix 'resnet101/' matches none"),
    ("fpn/", "prefix 'fpn/' matches none"),
])
def test_prefixes_that_restore_nothing_fail(model, whole_file, prefix,
                                            expected):
  path, _ = whole_file
  with pytest.raises(ValueError, match=expected) as err:
    checkpoints.restore_tf1_checkpoint(model, path, prefix=prefix,
                                       print_fn=None)
  assert "ResNet-10" in str(err.value)


def _root_names(depth):
  count = tf1_names.resnet_conv_count(depth)
  shapes = {"dense/kernel": [2048, 1000], "global_step": []}
  for i in range(count):
    suffix = "" if i == 0 else f"_{i}"
    shapes[f"conv2d{suffix}/kernel"] = [1, 1, 8, 8]
    shapes[f"batch_normalization{suffix}/gamma"] = [8]
  return shapes


@pytest.mark.parametrize("file_depth,model_depth", [(50, 101), (101, 50),
                                                    (18, 10)])
def test_another_depth_fails_naming_both(file_depth, model_depth):
  shapes = _root_names(file_depth)
  with pytest.raises(ValueError) as err:
    tf1_checkpoints.check_backbone("the_file", shapes, f"resnet{model_depth}/",
                                   model_depth)
  message = str(err.value)
  assert f"ResNet-{file_depth}" in message, message
  assert f"ResNet-{model_depth}" in message, message
  # A whole-model file of another depth (names under resnet{D}/).
  scoped = {f"resnet{file_depth}/{n}": s for n, s in shapes.items()}
  with pytest.raises(ValueError) as err:
    tf1_checkpoints.check_backbone("the_file", scoped, None, model_depth)
  assert f"ResNet-{file_depth}" in str(err.value)
  assert f"ResNet-{model_depth}" in str(err.value)


def test_another_class_count_skips_and_lists_the_predictors(whole_file):
  path, _ = whole_file
  seven = _small_model(num_classes=7)
  report = checkpoints.restore_tf1_checkpoint(seven, path, modules="all",
                                              print_fn=None)
  skipped = {p: r for p, r in report.skipped}
  class_dependent = [p for p, r in skipped.items() if "class-dependent" in r]
  # Class predictor (kernel, bias) of the RetinaNet head, the prior
  # classifier, the coarse and fine heads.
  assert len(class_dependent) == 8, skipped
  assert any("retinanet/class_net/class-predict/kernel" in skipped[p]
             for p in class_dependent)
  assert len(report.restored) == len(tf1_names.tf1_variables(seven)) - 8


def test_another_width_fails_naming_the_tensor(whole_file):
  path, _ = whole_file
  wider = _small_model(fpn_num_filters=24)
  with pytest.raises(ValueError, match=r"fpn/l3/kernel .* vs model/decoder"):
    checkpoints.restore_tf1_checkpoint(wider, path, modules="all",
                                       print_fn=None)


def test_a_module_held_in_part_fails(model, whole_file, tmp_path):
  _, values = whole_file
  partial = dict(values)
  del partial["fpn/post_hoc_d4/kernel"]
  path = write_name_based(tmp_path / "partial", partial)
  with pytest.raises(ValueError, match="decoder only in part.*post_hoc_d4"):
    checkpoints.restore_tf1_checkpoint(model, path, modules="all",
                                       print_fn=None)
  # A file without the mask heads (a RetinaNet run) restores the rest.
  retinanet = {n: v for n, v in values.items()
               if not n.split("/")[0].endswith("_mask")}
  path = write_name_based(tmp_path / "retinanet", retinanet)
  report = checkpoints.restore_tf1_checkpoint(_small_model(), path,
                                              modules="all", print_fn=None)
  assert len(report.restored) == len(retinanet)
  assert all("not in checkpoint" in r or "shape_prior_path" in r
             for _, r in report.skipped)


def test_saved_model_directory_reads_its_variables(whole_file, tmp_path):
  _, values = whole_file
  saved = tmp_path / "1571767330"
  (saved / "variables").mkdir(parents=True)
  (saved / "saved_model.pb").write_bytes(b"")
  write_name_based(saved / "variables" / "variables", values)
  target = _small_model()
  report = checkpoints.restore_tf1_checkpoint(target, str(saved),
                                              modules="all", print_fn=None)
  assert len(report.restored) == len(values)
  assert init_checkpoint.checkpoint_kind(str(saved)) == init_checkpoint.TF1


def test_missing_and_unreadable_paths_fail_naming_them(model, tmp_path):
  missing = str(tmp_path / "nothing" / "model.ckpt-1")
  with pytest.raises(FileNotFoundError, match=missing):
    checkpoints.restore_tf1_checkpoint(model, missing, print_fn=None)
  broken = tmp_path / "broken.ckpt"
  (tmp_path / "broken.ckpt.index").write_bytes(b"not a checkpoint index")
  with pytest.raises(OSError, match=str(broken)):
    checkpoints.restore_tf1_checkpoint(model, str(broken), print_fn=None)


def test_a_hanging_read_times_out(monkeypatch):
  def hang(path):
    time.sleep(30)
    return path

  monkeypatch.setattr(tf1_checkpoints, "_open", hang)
  start = time.time()
  with pytest.raises(errors.CheckpointTimeoutError,
                     match="gs://bucket/ckpt.*within 0.5 s"):
    tf1_checkpoints.open_checkpoint("gs://bucket/ckpt", timeout_s=0.5)
  assert time.time() - start < 5


_JAX_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
import keras
from official_shapemask.modeling import factory
from official_shapemask.weights import checkpoints, tf1_names
assert keras.backend.backend() == "jax"
model = factory.build_shapemask_model(
    num_classes=5, num_clusters=2, image_size=64, backbone_depth=10,
    backbone_width_multiplier=0.25, min_level=3, max_level=5,
    fpn_num_filters=16, head_num_convs=1, head_num_filters=16,
    num_downsample_channels=8, mask_num_convs=1, mask_num_filters=8,
    pre_nms_num_boxes=100)
rng = np.random.default_rng(0)
values = {}
for e in tf1_names.tf1_variables(model):
  shape = tuple(e.variable.shape)[2:] if e.dense_to_conv else tuple(
      e.variable.shape)
  values[e.name] = rng.uniform(0.1, 0.9, shape).astype(np.float32)
names = sorted(values)
tf.raw_ops.SaveV2(prefix=sys.argv[1], tensor_names=names,
                  shape_and_slices=[""] * len(names),
                  tensors=[tf.constant(values[n]) for n in names])
report = checkpoints.restore_tf1_checkpoint(model, sys.argv[1], modules="all",
                                            print_fn=None)
kernel = keras.ops.convert_to_numpy(model.prior_head.shape_prior_fc.kernel)
assert np.array_equal(kernel[0, 0], values["prior_mask/dense/kernel"])
print("RESTORED", len(report.restored), len(values))
"""


@pytest.mark.slow  # A JAX subprocess: about 30 s on a quiet machine.
def test_restores_under_the_jax_backend(run_under_jax, tmp_path):
  result = run_under_jax(_JAX_SCRIPT, str(tmp_path / "tf1.ckpt"), timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESTORED")]
  assert line and line[0].split()[1] == line[0].split()[2], result.stdout


_HANG_SCRIPT = """
import time
from official_shapemask.weights import errors, tf1_checkpoints
tf1_checkpoints._open = lambda path: time.sleep(600)
start = time.time()
try:
  tf1_checkpoints.open_checkpoint("gs://bucket/ckpt", timeout_s=1)
except errors.CheckpointTimeoutError as e:
  print("TIMEOUT", round(time.time() - start, 1), e)
"""


def test_a_timed_out_read_does_not_keep_the_process_alive(tmp_path):
  start = time.time()
  result = subprocess.run(
      [sys.executable, "-c", _HANG_SCRIPT], cwd=REPO_ROOT, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(REPO_ROOT)),
      capture_output=True, text=True, check=False)
  seconds = time.time() - start
  assert result.returncode == 0, result.stderr[-2000:]
  assert "TIMEOUT" in result.stdout and "within 1 s" in result.stdout
  assert seconds < 120, seconds  # The read itself would take 600 s.
