"""Our model, losses and detections equal the seed's own TF1 code.

The numerical reference of the test suite. `tf1_oracle` (conftest) runs
tests/reference/tf1_oracle.py once per session in its own process: the
reference ShapeMask of ../shared/reference/tpu_detection (ResNet-50-FPN,
128 px, 91 classes) with random weights, random batch-norm statistics and
informative predictors, saved as a whole-model TF1 checkpoint, as an
ImageNet-style backbone file (root-level names, classifier, global_step,
Momentum slots) and as a TF1 SavedModel, run in inference mode on fixed
images, boxes and classes.

Our model restored from those files with `restore_tf1_checkpoint` must give
the reference's values in float32. Tolerance: relative error
||ours - ref|| / ||ref|| below 2e-5 for every output (measured 5e-7 to
3.2e-6: C2 5e-7 ... C5 1.6e-6, P3-P7 2.0e-6 to 2.3e-6, class and box
outputs 2.5e-6, priors 3e-7, coarse and fine logits 3e-6), losses 1e-5
(float32 sums), detections: same count, classes and order, boxes within
1e-3 px, scores within 1e-5.
"""
import json
import re

import numpy as np
import pytest
from keras import ops

from official_shapemask import losses as losses_lib
from official_shapemask.modeling import factory
from official_shapemask.modeling.layers import detection_generator
from official_shapemask.weights import checkpoints
from official_shapemask.weights import tf1_names

LEVELS = range(3, 8)
OUTPUT_TOLERANCE = 2e-5


def _relative_error(ours, theirs):
  a = np.asarray(ops.convert_to_numpy(ours), np.float64)
  b = np.asarray(theirs, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  assert np.isfinite(a).all()
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _flat(per_level, prefix, last):
  """Reference per-level `[B, H, W, A * k]` -> our `[B, sum H*W*A, k]`."""
  return np.concatenate(
      [per_level[f"{prefix}_{l}"].reshape(
          per_level[f"{prefix}_{l}"].shape[0], -1, last) for l in LEVELS], 1)


@pytest.fixture(scope="module")
def reference(tf1_oracle):
  outputs = np.load(tf1_oracle / "outputs.npz")
  return {"dir": tf1_oracle,
          "outputs": {k: outputs[k] for k in outputs.files},
          "size": outputs["images"].shape[1]}


@pytest.fixture(scope="module")
def full_model(reference):
  """Our ResNet-50-FPN ShapeMask with the reference's settings."""
  return factory.build_shapemask_model(
      num_classes=91, image_size=reference["size"], backbone_depth=50,
      shape_prior_path=str(reference["dir"] / "priors.npy"))


@pytest.mark.slow  # The first test runs the TF1 oracle (about a minute).
def test_whole_checkpoint_gives_the_reference_outputs(reference, full_model):
  model, ref = full_model, reference["outputs"]
  report = checkpoints.restore_tf1_checkpoint(
      model, str(reference["dir"] / "whole"), modules="all", print_fn=None)
  names = json.loads((reference["dir"] / "variables.json").read_text())
  assert len(report.restored) == len(names) == len(
      tf1_names.tf1_variables(model))
  assert [r for _, r in report.skipped] == [
      "not in TF1 checkpoints (comes from shape_prior_path)"]
  slots = sum(1 for n in names if not n.startswith("resnet50/") and
              not n.split("/")[-1].startswith("moving_"))
  assert report.ignored == {"global_step": 1, "optimizer slots": slots,
                            "classifier": 0, "other": 0}

  errors = {}
  backbone = model.backbone(ref["images"], training=False)
  for level in (2, 3, 4, 5):
    errors[f"C{level}"] = _relative_error(backbone[str(level)],
                                          ref[f"C{level}"])
  pyramid = model.decoder(backbone, training=False)
  for level in LEVELS:
    errors[f"P{level}"] = _relative_error(pyramid[str(level)],
                                          ref[f"P{level}"])
  out = model({"images": ref["images"], "mask_boxes": ref["boxes"],
               "mask_outer_boxes": ref["outer_boxes"],
               "mask_classes": ref["classes"]}, training=False)
  errors["cls_outputs"] = _relative_error(out["cls_outputs"],
                                          _flat(ref, "cls", 91))
  errors["box_outputs"] = _relative_error(out["box_outputs"],
                                          _flat(ref, "box", 4))
  errors["prior_masks"] = _relative_error(out["prior_masks"],
                                          ref["prior_masks"])
  coarse = ops.convert_to_numpy(out["coarse_mask_logits"])
  errors["coarse_mask_logits"] = _relative_error(coarse,
                                                 ref["coarse_mask_logits"])
  # The fine head thresholds sigmoid(coarse) at 0.5; an instance whose hard
  # mask flips on a logit within rounding of 0 is counted, not compared.
  stable = np.all((coarse > 0) == (ref["coarse_mask_logits"] > 0),
                  axis=(2, 3))
  assert stable.sum() >= stable.size - 1, stable
  errors["fine_mask_logits"] = _relative_error(
      ops.convert_to_numpy(out["fine_mask_logits"])[stable],
      ref["fine_mask_logits"][stable])
  bad = {k: v for k, v in errors.items() if not v < OUTPUT_TOLERANCE}
  assert not bad, errors
  # The outputs carry information (a mapping error would show).
  assert np.std(ref["cls_3"]) > 0.1
  assert 0.05 < np.mean(ref["coarse_mask_logits"] > 0) < 0.95


def test_saved_model_restores_the_same_variables(reference, full_model):
  model = full_model
  for entry in tf1_names.tf1_variables(model):
    entry.variable.assign(np.zeros(entry.variable.shape, np.float32))
  report = checkpoints.restore_tf1_checkpoint(
      model, str(reference["dir"] / "saved_model"), modules="all",
      print_fn=None)
  assert len(report.restored) == len(tf1_names.tf1_variables(model))
  assert report.ignored["global_step"] == 0
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  whole = tf.train.load_checkpoint(
      tf.train.latest_checkpoint(str(reference["dir"] / "whole")))
  for entry in tf1_names.tf1_variables(model):
    expected = whole.get_tensor(entry.name)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(entry.variable),
        expected.reshape(entry.variable.shape), err_msg=entry.name)


def test_imagenet_file_with_the_seeds_prefix_gives_the_reference_backbone(
    reference):
  ref = reference["outputs"]
  # Small heads: only the backbone comes from the file.
  model = factory.build_shapemask_model(
      num_classes=5, num_clusters=2, image_size=reference["size"],
      backbone_depth=50, fpn_num_filters=16, head_num_convs=1,
      head_num_filters=16, num_downsample_channels=8, mask_num_convs=1,
      mask_num_filters=8, pre_nms_num_boxes=100)
  path = str(reference["dir"] / "imagenet")
  with pytest.raises(ValueError) as err:
    checkpoints.restore_tf1_checkpoint(model, path, print_fn=None)
  assert "root-level names" in str(err.value)
  assert "prefix 'resnet50/'" in str(err.value)
  assert "conv2d/kernel" in str(err.value)

  lines = []
  report = checkpoints.restore_tf1_checkpoint(
      model, path, prefix="resnet50/", modules="backbone",
      print_fn=lines.append)
  assert len(report.restored) == 53 * 5 and not report.skipped
  trainable = 53 * 3  # Kernel, gamma, beta per convolution.
  assert report.ignored == {"global_step": 1,
                            "optimizer slots": trainable + 2,
                            "classifier": 2, "other": 0}
  assert "265 restored, 0 skipped" in lines[0]
  assert "1 global_step" in lines[0] and "2 classifier" in lines[0]
  backbone = model.backbone(ref["images"], training=False)
  for level in (2, 3, 4, 5):
    assert _relative_error(backbone[str(level)],
                           ref[f"C{level}"]) < OUTPUT_TOLERANCE, level


def test_losses_equal_the_reference(reference):
  ref = reference["outputs"]
  data = np.load(reference["dir"] / "losses.npz")
  labels = {
      "cls_targets": np.concatenate(
          [data[f"cls_targets_{l}"].reshape(2, -1) for l in LEVELS], 1),
      "box_targets": np.concatenate(
          [data[f"box_targets_{l}"].reshape(2, -1, 4) for l in LEVELS], 1),
  }
  for key in ("num_positives", "mask_targets", "fine_mask_targets",
              "mask_is_valid"):
    labels[key] = data[key]
  outputs = {"cls_outputs": _flat(ref, "cls", 91),
             "box_outputs": _flat(ref, "box", 4)}
  for key in ("prior_masks", "coarse_mask_logits", "fine_mask_logits"):
    outputs[key] = ref[key]
  assert (labels["cls_targets"] > 0).sum() > 100
  assert (labels["cls_targets"] == -2).sum() > 10  # Ignored anchors.
  terms = losses_lib.ShapeMaskLoss()(labels, outputs)
  for key in ("cls_loss", "box_loss", "prior_loss", "coarse_loss",
              "fine_loss", "model_loss"):
    ours = float(ops.convert_to_numpy(terms[key]))
    assert ours == pytest.approx(float(data["ref_" + key]), rel=1e-5), key


def test_detections_equal_the_reference(reference):
  data = np.load(reference["dir"] / "detections.npz")
  num_classes = data["cls_3"].shape[-1] // 9
  generator = detection_generator.DetectionGenerator(
      image_size=(reference["size"], reference["size"]))
  ours = generator(_flat(data, "cls", num_classes), _flat(data, "box", 4))
  ours = {k: ops.convert_to_numpy(v) for k, v in ours.items()}
  count = data["ref_num_detections"]
  np.testing.assert_array_equal(ours["num_detections"], count)
  assert count[0] == 100 and 0 < count[1] < 100, count
  for b, n in enumerate(count):
    np.testing.assert_array_equal(ours["detection_classes"][b, :n],
                                  data["ref_detection_classes"][b, :n])
    np.testing.assert_allclose(ours["detection_scores"][b, :n],
                               data["ref_detection_scores"][b, :n],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["detection_boxes"][b, :n],
                               data["ref_detection_boxes"][b, :n], atol=1e-3)


@pytest.mark.parametrize("rule", ["all", "seed_2019"])
def test_l2_variables_are_the_references_selection(reference, full_model,
                                                   rule):
  """Our decayed variables, in TF1 names, are the reference's.

  The reference decays the variables that train (its trainable variables
  less `frozen_variable_prefix`) that `regularization_variable_regex`
  keeps: None since December 2019 ('all'); in the seed's code, the names
  with neither `batch_normalization` nor `bias` ('seed_2019'). Ours
  (`build_shapemask_model(l2_variables=...)`) chooses by layer.
  """
  info = json.loads((reference["dir"] / "training.json").read_text())
  frozen = info["frozen_variable_prefix"]
  trains = [n for n in info["trainable"] if not re.match(frozen, n + ":0")]
  assert len(trains) < len(info["trainable"])  # The stem and conv2_x.
  if rule == "seed_2019":
    want = {n for n in trains
            if "batch_normalization" not in n and "bias" not in n}
    assert any(n.startswith("fpn/p3-bn/") for n in want)  # Decayed then.
  else:
    want = set(trains)
  model = full_model
  names = {id(e.variable): e.name for e in tf1_names.tf1_variables(model)}
  model.l2_variables = rule
  try:
    ours = [names[id(v)] for v in model.l2_regularized_variables()]
  finally:
    model.l2_variables = "all"
  assert len(ours) == len(set(ours))
  assert set(ours) == want
