"""SavedModel export: signatures, equality with the Keras model, restore.

The model is the tiny CPU config (gin/tiny_cpu.gin) with random weights,
non-default batch-norm statistics, and planted class-predictor weights so
that it detects (scores ~0.7, spread over locations so the ranking is not a
tie) and predicts masks above 0.5: a random model scores ~0.01, below the
detection threshold, and predicts mask probabilities ~0.01. The export is
made by the CLI from a checkpoint of that model, so restoring is tested too
(the CLI builds a fresh, differently initialised model).
"""

import glob
import os
import pathlib
import shutil
import subprocess
import sys

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.dataloaders import shapemask_parser
from official_shapemask.modeling import factory
from official_shapemask.serving import export
from official_shapemask.serving import predictor as predictor_lib
from official_shapemask.weights import any_engine
from official_shapemask.weights import paths
from official_shapemask.training import datasets
from official_shapemask.training import gin_utils

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
GIN_FILES = ("tiny_cpu.gin",)
# Four detections keep the overlays sparse enough to check pixels around
# them; every other setting is the tiny config's.
GIN_BINDINGS = ("build_shapemask_model.max_num_detections = 4",)
VAL_IMAGE_ID = 532481  # 640 x 426 (landscape).
PORTRAIT_IMAGE_ID = 333956  # 428 x 640.
OTHER_IMAGE_ID = 184324  # 640 x 425.


def val_image_path(coco_root, image_id):
  return pathlib.Path(coco_root) / "val2017" / f"{image_id:012d}.jpg"


def build_planted_model():
  """The tiny model with planted weights (see the module docstring)."""
  keras.utils.set_random_seed(0)
  gin_utils.parse_config(GIN_FILES, GIN_BINDINGS)
  try:
    model = factory.build_shapemask_model()
  finally:
    gin.clear_config()
  rng = np.random.default_rng(0)
  for variable in model.non_trainable_variables:
    if "moving_mean" in variable.path:
      variable.assign(rng.normal(0.0, 0.1, variable.shape))
    elif "moving_variance" in variable.path:
      variable.assign(rng.uniform(0.5, 2.0, variable.shape))
  kernel = model.head.class_predict.kernel.numpy()
  bias = model.head.class_predict.bias.numpy()
  # Predictor channel a * num_classes + c: anchor a = 0 (smallest scale,
  # aspect 1) of class c = 1 (person) and 18 (dog).
  for column, class_bias in ((1, 0.0), (18, -1.0)):
    bias[column] = class_bias
    kernel[..., column] = rng.normal(0.0, 0.5, kernel.shape[:3])
  model.head.class_predict.kernel.assign(kernel)
  model.head.class_predict.bias.assign(bias)
  fine_bias = model.fine_head.class_predict.bias
  fine_bias.assign(np.full(fine_bias.shape, 3.0, np.float32))
  return model


def save_checkpoint(model, model_dir):
  """A training-style checkpoint `model_dir/ckpt-1`; returns the prefix."""
  return tf.train.Checkpoint(model=model).save(os.path.join(model_dir, "ckpt"))


def run_tool(script, *args, timeout=600):
  # tools/ runs the checkout's package (PYTHONPATH), not an installed one.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=str(REPO_ROOT))
  return subprocess.run(
      [sys.executable, str(REPO_ROOT / "tools" / script), *args],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
      check=False)


def export_args(checkpoint, export_dir, *extra):
  args = [f"--gin_file={f}" for f in GIN_FILES]
  args += [f"--gin_bindings={b}" for b in GIN_BINDINGS]
  return args + [f"--checkpoint={checkpoint}", f"--export_dir={export_dir}",
                 *extra]


def to_numpy(outputs):
  return {k: np.asarray(v) for k, v in outputs.items()}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  model = build_planted_model()
  model_dir = tmp_path_factory.mktemp("planted_run")
  prefix = save_checkpoint(model, str(model_dir))
  return {"model": model, "model_dir": str(model_dir), "prefix": prefix}


@pytest.fixture(scope="module")
def exported(planted, tmp_path_factory):
  export_dir = tmp_path_factory.mktemp("export") / "saved_model"
  metadata = export.export_saved_model(planted["model"], str(export_dir),
                                       checkpoint=planted["prefix"])
  assert metadata["export_dir"] == str(export_dir)
  return {"dir": export_dir, "loaded": tf.saved_model.load(str(export_dir))}


@pytest.fixture(scope="module")
def parsed_val_image(planted, tiny_val_records):
  """The eval parser's (image, image_info) of VAL_IMAGE_ID, and its bytes."""
  parser = shapemask_parser.Parser(
      mode="eval", **datasets.model_input_settings(planted["model"]))
  files = sorted(tf.io.gfile.glob(tiny_val_records))
  for serialized in tf.data.TFRecordDataset(files):
    example = tf.train.Example.FromString(serialized.numpy())
    feature = example.features.feature
    if int(feature["image/source_id"].bytes_list.value[0]) == VAL_IMAGE_ID:
      image, labels = parser(serialized)
      return {"image": image.numpy(),
              "image_info": labels["image_info"].numpy(),
              "bytes": feature["image/encoded"].bytes_list.value[0]}
  raise AssertionError(f"image {VAL_IMAGE_ID} not in {tiny_val_records}")


@pytest.fixture(scope="module")
def keras_outputs(planted, parsed_val_image):
  """The Keras model's outputs on the eval parser's input, + original boxes."""
  model = planted["model"]
  info = parsed_val_image["image_info"][None]
  outputs = to_numpy(model({"images": parsed_val_image["image"][None],
                            "image_info": info}, training=False))
  scale = np.tile(info[:, 2], 2)[:, None, :]
  offset = np.tile(info[:, 3], 2)[:, None, :]
  for key in ("detection_boxes", "detection_outer_boxes"):
    outputs[key + "_original"] = (outputs[key] + offset) / scale
  return outputs


def assert_outputs_close(actual, expected):
  assert set(actual) == set(export.OUTPUT_KEYS)
  for key in export.OUTPUT_KEYS:
    a, e = np.asarray(actual[key]), np.asarray(expected[key])
    assert a.shape == e.shape, key
    if key in ("num_detections", "detection_classes"):
      np.testing.assert_array_equal(a, e, err_msg=key)
    else:
      np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-3, err_msg=key)


def test_planted_model_detects_and_predicts_masks(keras_outputs):
  # Guards the premise of the other tests: real detections and masks.
  assert int(keras_outputs["num_detections"][0]) == 4
  scores = keras_outputs["detection_scores"][0]
  assert np.all(scores > 0.5) and np.ptp(scores) > 1e-3
  assert np.all(keras_outputs["detection_masks"][0] > 0.5)


def test_signatures_inputs_and_metadata(planted, exported):
  loaded = exported["loaded"]
  signatures = loaded.signatures
  assert set(signatures) == {"serving_default", "image_tensor", "image_bytes"}
  for name, key, dtype, shape in (
      ("serving_default", "images", tf.uint8, [1, None, None, 3]),
      ("image_tensor", "images", tf.uint8, [1, None, None, 3]),
      ("image_bytes", "image_bytes", tf.string, [1])):
    spec = signatures[name].structured_input_signature[1]
    assert list(spec) == [key]
    assert spec[key].dtype == dtype and spec[key].shape.as_list() == shape
    assert set(signatures[name].structured_outputs) == set(export.OUTPUT_KEYS)
  metadata = export.read_metadata(str(exported["dir"]))
  assert metadata["image_size"] == 128 and metadata["batch_size"] == 1
  assert metadata["num_classes"] == 91 and metadata["max_num_detections"] == 4
  assert metadata["mask_size"] == 128
  assert metadata["outputs"] == list(export.OUTPUT_KEYS)
  assert metadata["checkpoint"] == planted["prefix"]
  # The variables are tracked (listed on the loaded object).
  assert len(loaded.model_variables) > 50
  # Written through a temporary directory that is gone now.
  siblings = os.listdir(exported["dir"].parent)
  assert siblings == ["saved_model"], siblings


def test_image_tensor_signature_equals_keras(exported, parsed_val_image,
                                             keras_outputs):
  image = export.decode_image(parsed_val_image["bytes"]).numpy()
  for name in ("serving_default", "image_tensor"):
    outputs = exported["loaded"].signatures[name](images=image[None])
    assert_outputs_close(to_numpy(outputs), keras_outputs)


def test_image_bytes_signature_equals_keras(exported, parsed_val_image,
                                            keras_outputs):
  outputs = exported["loaded"].signatures["image_bytes"](
      image_bytes=tf.constant([parsed_val_image["bytes"]]))
  assert_outputs_close(to_numpy(outputs), keras_outputs)


def test_image_info_and_original_boxes(exported, parsed_val_image):
  outputs = to_numpy(exported["loaded"].signatures["image_bytes"](
      image_bytes=tf.constant([parsed_val_image["bytes"]])))
  info = outputs["image_info"][0]
  np.testing.assert_allclose(info, parsed_val_image["image_info"])
  np.testing.assert_allclose(info[0], [426, 640])
  # Long side 640 -> 128; the short side rounds: 426 * 0.2 = 85.2 -> 85.
  np.testing.assert_allclose(info[2], [85 / 426, 128 / 640], rtol=1e-6)
  for key in ("detection_boxes", "detection_outer_boxes"):
    expected = (outputs[key][0] + np.tile(info[3], 2)) / np.tile(info[2], 2)
    np.testing.assert_allclose(outputs[key + "_original"][0], expected,
                               rtol=1e-6)
  # Valid boxes in original pixels lie within the padded canvas' extent.
  num = int(outputs["num_detections"][0])
  boxes = outputs["detection_boxes_original"][0, :num]
  assert np.all(boxes >= 0) and np.all(boxes <= 640)
  assert np.all(boxes[:, 2:] > boxes[:, :2])


def test_static_batch_size_is_enforced(exported, parsed_val_image):
  # The exported functions (the signatures declare the same [1] shape).
  two = tf.constant([parsed_val_image["bytes"]] * 2)
  with pytest.raises(TypeError, match="Can not cast"):
    exported["loaded"].serve_bytes(two)


def test_predictor_batches_images_of_different_sizes(planted, exported,
                                                     coco_tiny_root):
  # A static batch of 2 over 3 images (the last batch padded), images of
  # different sizes in one batch, against the SavedModel one at a time.
  images = [val_image_path(coco_tiny_root, i).read_bytes()
            for i in (VAL_IMAGE_ID, PORTRAIT_IMAGE_ID, OTHER_IMAGE_ID)]
  module = export.ShapeMaskServingModule(planted["model"], batch_size=2)
  batched = predictor_lib.Predictor(module.serve_bytes, 2,
                                    "in-process").predict_bytes(images)
  saved = predictor_lib.Predictor.from_saved_model(str(exported["dir"]))
  assert saved.batch_size == 1
  single = saved.predict_bytes(images)
  assert batched["image_info"].shape == (3, 4, 2)
  np.testing.assert_allclose(batched["image_info"][:, 0],
                             [[426, 640], [640, 428], [425, 640]])
  assert_outputs_close(batched, single)


def test_restore_rejects_a_mismatched_model(planted, tmp_path):
  other = factory.build_shapemask_model(
      num_classes=5, image_size=128, backbone_depth=10,
      backbone_width_multiplier=0.5, min_level=3, max_level=5,
      fpn_num_filters=64, head_num_convs=2, head_num_filters=64,
      num_clusters=4, num_downsample_channels=32, mask_num_convs=2,
      mask_num_filters=32, freeze_early_convs=False)
  with pytest.raises(ValueError, match="does not match the model"):
    export.restore_model(other, planted["prefix"])
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    export.restore_model(other, str(tmp_path))


def test_restore_from_a_whole_model_weights_file(planted, keras_outputs,
                                                 parsed_val_image, tmp_path):
  """What the JAX engine leaves: `model_dir/shapemask-<step>.weights.h5`."""
  model_dir = tmp_path / "jax_run"
  model_dir.mkdir()
  for step in (10, 200, 30):  # The newest step wins, not the newest name.
    planted["model"].save_weights(str(
        paths.model_weights_path(str(model_dir), step)))
  (model_dir / "shapemask-x.weights.h5").write_text("not a step")
  newest = paths.model_weights_path(str(model_dir), 200)
  assert paths.latest_model_weights(str(model_dir)) == newest
  # tools/predict.py and tools/export_saved_model.py restore this way.
  gin_utils.parse_config(GIN_FILES, GIN_BINDINGS)
  try:
    predictor = predictor_lib.Predictor.from_checkpoint(
        factory.build_shapemask_model(), str(model_dir))
  finally:
    gin.clear_config()
  assert predictor.source == f"checkpoint {newest}"
  assert_outputs_close(predictor.predict_bytes([parsed_val_image["bytes"]]),
                       keras_outputs)
  other = factory.build_shapemask_model(
      num_classes=5, image_size=128, backbone_depth=10, num_clusters=4,
      max_level=5, freeze_early_convs=False)
  with pytest.raises(ValueError, match=f"weights file {newest} does not "
                     "match the model"):
    export.restore_model(other, newest)


@pytest.mark.parametrize("how", ["truncated", "overwritten"])
def test_restore_names_a_damaged_checkpoint(planted, tmp_path, how):
  run_dir = tmp_path / "run"
  shutil.copytree(planted["model_dir"], run_dir)
  prefix = str(run_dir / os.path.basename(planted["prefix"]))
  data = pathlib.Path(glob.glob(prefix + ".data-*")[0])
  raw = bytearray(data.read_bytes())
  if how == "truncated":
    raw = raw[:len(raw) // 2]
  else:
    raw[len(raw) // 2] ^= 0xFF
  data.write_bytes(bytes(raw))
  gin_utils.parse_config(GIN_FILES, GIN_BINDINGS)
  try:
    fresh = factory.build_shapemask_model()
  finally:
    gin.clear_config()
  with pytest.raises(ValueError) as err:
    export.restore_model(fresh, prefix)
  message = str(err.value)
  assert message.startswith(f"checkpoint {prefix} cannot be read ("), message
  assert "\n" not in message


def test_damaged_jax_weights_file_is_named(planted, tmp_path):
  """The weights a JAX run leaves for export, truncated: one line."""
  weights = paths.model_weights_path(str(tmp_path), 20)
  planted["model"].save_weights(weights)
  data = pathlib.Path(weights).read_bytes()
  pathlib.Path(weights).write_bytes(data[:len(data) // 2])
  gin_utils.parse_config(GIN_FILES, GIN_BINDINGS)
  try:
    fresh = factory.build_shapemask_model()
  finally:
    gin.clear_config()
  for checkpoint in (str(tmp_path), weights):
    with pytest.raises(ValueError) as err:
      export.restore_model(fresh, checkpoint)
    message = str(err.value)
    assert message.startswith(f"weights file {weights} cannot be read ("), (
        message)
    assert "\n" not in message


def test_an_orbax_step_without_jax_is_one_line(planted, tmp_path,
                                               monkeypatch):
  """The newest step is the JAX engine's (Orbax) and JAX is not installed:
  one line saying what to install, or which step TensorFlow reads."""
  monkeypatch.setattr(any_engine, "engine_available",
                      lambda engine: engine == "tensorflow")
  run = tmp_path / "run"
  shutil.copytree(planted["model_dir"], run)  # Its ckpt-1.
  step = run / "checkpoints" / "15"
  (step / "state").mkdir(parents=True)
  printed = []
  for path in (run, step):
    with pytest.raises(ValueError) as err:
      export.restore_model(planted["model"], str(path),
                           print_fn=printed.append)
    assert str(err.value) == (
        f"the JAX engine's checkpoint {step} (step 15) is read by the JAX "
        "engine, which is not installed: pip install official_shapemask[jax]"
        f", or give the TensorFlow engine's checkpoint {run}/ckpt-1 (step 1) "
        f"instead: --checkpoint={run}/ckpt-1")
  assert printed == [
      f"Using step 15 of {run}: the JAX engine's checkpoint {step} (newer "
      "than the TensorFlow engine's step 1)"]
  only = tmp_path / "jax_only" / "checkpoints" / "15"
  only.mkdir(parents=True)
  with pytest.raises(ValueError, match=(
      r"pip install official_shapemask\[jax\], or export from a JAX run's "
      r"shapemask-<step>.weights.h5 \(written when it reaches its total "
      r"steps\)$")):
    export.restore_model(planted["model"], str(only.parent.parent),
                         print_fn=None)


def test_export_refuses_non_empty_dir(planted, tmp_path):
  (tmp_path / "keep.txt").write_text("not a SavedModel")
  with pytest.raises(FileExistsError, match="overwrite"):
    export.export_saved_model(planted["model"], str(tmp_path))
  assert os.listdir(tmp_path) == ["keep.txt"]


def _tree(path):
  """{relative path: bytes} of every file under `path`."""
  path = pathlib.Path(path)
  return {str(p.relative_to(path)): p.read_bytes()
          for p in sorted(path.rglob("*")) if p.is_file()}


def _training_run(planted, tmp_path):
  """A copy of the planted run with what train.py also writes there."""
  run_dir = tmp_path / "run"
  shutil.copytree(planted["model_dir"], run_dir)
  (run_dir / "config.gin").write_text("TOTAL_STEPS = 1\n")
  (run_dir / "train").mkdir()
  (run_dir / "train" / "events.out.tfevents.1.host").write_bytes(b"logs")
  return run_dir


def test_overwrite_refuses_a_training_run_directory(planted, tmp_path):
  run_dir = _training_run(planted, tmp_path)
  before = _tree(run_dir)
  result = run_tool("export_saved_model.py",
                    *export_args(run_dir, run_dir, "--overwrite"))
  assert result.returncode == 1, result.stdout + result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0] == (
      f"error: export_dir {run_dir} is not a SavedModel: it holds a "
      "training run's files (checkpoint, ckpt-1.data-00000-of-00001, "
      "ckpt-1.index, config.gin and 1 more). --overwrite replaces only an "
      "earlier SavedModel; export to a new or empty directory, e.g. "
      f"--export_dir={run_dir / 'saved_model'}")
  assert "Restored" not in result.stdout  # Refused before reading anything.
  assert _tree(run_dir) == before
  assert sorted(os.listdir(tmp_path)) == ["run"]
  # Without --overwrite the message does not suggest it either.
  result = run_tool("export_saved_model.py", *export_args(run_dir, run_dir))
  assert result.returncode == 1
  assert "is not a SavedModel" in result.stderr
  assert "pass overwrite" not in result.stderr
  assert _tree(run_dir) == before


def test_export_dir_that_is_a_file_is_one_line(planted, tmp_path):
  target = tmp_path / "model.txt"
  target.write_text("keep")
  with pytest.raises(FileExistsError,
                     match=f"^export_dir {target} is a file; give a "
                     "directory path for the SavedModel$"):
    export.export_saved_model(planted["model"], str(target), overwrite=True)
  assert target.read_text() == "keep"


def _fake_save(monkeypatch, fail=False):
  """tf.saved_model.save writing a stand-in SavedModel (or failing midway)."""

  def save(module, path, signatures=None):
    del module, signatures
    os.makedirs(os.path.join(path, "variables"))
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
      f.write(b"new")
    if fail:
      raise RuntimeError("disk full")

  monkeypatch.setattr(tf.saved_model, "save", save)


def test_overwrite_replaces_an_earlier_saved_model(planted, exported,
                                                   tmp_path, monkeypatch):
  export_dir = tmp_path / "saved_model"
  shutil.copytree(exported["dir"], export_dir)
  with pytest.raises(FileExistsError,
                     match="already holds a SavedModel; pass overwrite"):
    export.export_saved_model(planted["model"], str(export_dir))
  _fake_save(monkeypatch)
  result = export.export_saved_model(planted["model"], str(export_dir),
                                     overwrite=True)
  assert result["left_over"] is None
  assert (export_dir / "saved_model.pb").read_bytes() == b"new"
  assert sorted(os.listdir(tmp_path)) == ["saved_model"]


@pytest.mark.parametrize("where", ["save", "swap"])
def test_failed_export_leaves_the_earlier_one_whole(planted, exported,
                                                    tmp_path, monkeypatch,
                                                    where):
  export_dir = tmp_path / "saved_model"
  shutil.copytree(exported["dir"], export_dir)
  before = _tree(export_dir)
  _fake_save(monkeypatch, fail=where == "save")
  if where == "swap":  # The new export's rename into place fails.
    rename = tf.io.gfile.rename

    def failing_rename(src, dst, overwrite=False):
      if ".tmp-" in src:
        raise tf.errors.UnavailableError(None, None, "connection reset")
      return rename(src, dst, overwrite)

    monkeypatch.setattr(tf.io.gfile, "rename", failing_rename)
  with pytest.raises((RuntimeError, tf.errors.UnavailableError)):
    export.export_saved_model(planted["model"], str(export_dir),
                              overwrite=True)
  assert _tree(export_dir) == before
  assert sorted(os.listdir(tmp_path)) == ["saved_model"]  # No temporaries.


def test_checkpoint_round_trip_through_the_cli(planted, keras_outputs,
                                               parsed_val_image, tmp_path):
  gin_utils.parse_config(GIN_FILES, GIN_BINDINGS)
  try:
    fresh = factory.build_shapemask_model()
  finally:
    gin.clear_config()
  export.restore_model(fresh, planted["model_dir"])
  # tools/predict.py --gin_file --checkpoint builds the same way.
  gin_utils.parse_config(GIN_FILES, GIN_BINDINGS)
  try:
    from_checkpoint = predictor_lib.Predictor.from_checkpoint(
        factory.build_shapemask_model(), planted["model_dir"])
  finally:
    gin.clear_config()
  assert_outputs_close(from_checkpoint.predict_bytes([parsed_val_image[
      "bytes"]]), keras_outputs)
  # The export CLI from the model directory gives the Keras model's outputs.
  export_dir = tmp_path / "from_checkpoint"
  result = run_tool("export_saved_model.py",
                    *export_args(planted["model_dir"], export_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Restored {planted['prefix']}" in result.stdout
  loaded = tf.saved_model.load(str(export_dir))
  outputs = loaded.signatures["image_bytes"](
      image_bytes=tf.constant([parsed_val_image["bytes"]]))
  assert_outputs_close(to_numpy(outputs), keras_outputs)


def test_checkpoint_holds_every_model_variable(planted):
  # Keras 3 keeps list/dict-held layers out of TF's object graph unless the
  # model names them (ShapeMaskModel._trackable_children); a checkpoint must
  # hold every variable, BN statistics of the ResNet blocks included.
  assert export.untracked_variables(planted["model"]) == []
  reader = tf.train.load_checkpoint(planted["prefix"])
  saved = {k for k in reader.get_variable_to_shape_map()
           if k.startswith("model/")}
  assert len(saved) == len(planted["model"].variables)


def test_cli_errors_name_the_problem(tmp_path):
  result = run_tool("export_saved_model.py",
                    *export_args(tmp_path / "missing", tmp_path / "out"))
  assert result.returncode == 1
  assert "error:" in result.stderr and str(tmp_path / "missing") in (
      result.stderr)
  assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("height,width", [(3, 2000), (2000, 3)])
def test_extreme_aspect_ratio_runs(exported, height, width):
  # At 128 px the short side scales to 0.19 px: it becomes one pixel.
  rng = np.random.default_rng(height)
  image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  signatures = exported["loaded"].signatures
  by_tensor = to_numpy(signatures["image_tensor"](images=image[None]))
  by_bytes = to_numpy(signatures["image_bytes"](
      image_bytes=tf.constant([tf.io.encode_png(image).numpy()])))
  for outputs in (by_tensor, by_bytes):
    info = outputs["image_info"][0]
    np.testing.assert_allclose(info[0], [height, width])
    np.testing.assert_allclose(np.round(info[0] * info[2]),
                               [1, 128] if height < width else [128, 1])
    for key in export.OUTPUT_KEYS:
      assert np.all(np.isfinite(outputs[key])), key
  assert_outputs_close(by_bytes, by_tensor)
