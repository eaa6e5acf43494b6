"""Legacy (tf-models-official) ShapeMask checkpoints convert into our model.

The parity test writes a checkpoint of the port with random weights (the way
its executor does: `tf.train.Checkpoint(model=...)` plus `params.yaml`),
converts it with `tools/convert_legacy_checkpoint.convert`, and compares the
two models on the same images: backbone, FPN, RetinaNet outputs and the mask
branch must agree within 1e-4 relative, which shows that the architectures
are the same. It runs in a subprocess (Keras 2 `tf_keras` and Keras 3 share
it, but not the test process).
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

TINY = dict(num_classes=91, image_size=128, backbone_depth=10,
            fpn_num_filters=32, head_num_convs=2, head_num_filters=32,
            num_downsample_channels=16, mask_num_convs=2, mask_num_filters=16,
            pre_nms_num_boxes=500)

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import tensorflow as tf
    from official.modeling.hyperparams import params_dict
    from official_shapemask.modeling import factory
    from official_shapemask.weights import checkpoints
    from official_shapemask.weights import legacy_shapemask
    from official_shapemask.weights import legacy_converter
    from official_shapemask.cli import convert_legacy_checkpoint

    tmp = sys.argv[1]
    kwargs = json.loads(sys.argv[2])
    rng = np.random.default_rng(0)
    prior_path = os.path.join(tmp, "priors.npy")
    np.save(prior_path, rng.uniform(0, 1, (91, 3, 32, 32)).astype(np.float32))
    model_dir = os.path.join(tmp, "port_run")
    os.makedirs(model_dir)
    params = legacy_shapemask.legacy_params(
        kwargs, batch_size=2, shape_prior_path=prior_path,
        model_dir=model_dir)
    params_dict.save_params_dict_to_yaml(
        params, os.path.join(model_dir, "params.yaml"))
    port, _ = legacy_shapemask.build_legacy_model(params, "train")
    # Random weights at scales that keep activations O(1) through batch
    # norms with random moving statistics; box deltas ~0.1 so that boxes
    # stay near their anchors; class logits around -1 so that detections
    # fill the 100 slots.
    for layer in port.layers:
      for w in layer.weights:
        short = w.name.split("/")[-1].split(":")[0]
        shape = tuple(w.shape)
        if short == "kernel":
          scale = 0.1 if layer.name == "box-predict" else 1.0
          value = rng.normal(0, scale / np.sqrt(np.prod(shape[:-1])), shape)
        elif short == "bias":
          mean = -1.0 if layer.name == "class-predict" else 0.0
          value = rng.normal(mean, 0.3, shape)
        elif short in ("gamma", "moving_variance"):
          value = rng.uniform(0.5, 1.5, shape)
        else:  # beta, moving_mean
          value = rng.normal(0, 0.1, shape)
        w.assign(value.astype(np.float32))
    tf.train.Checkpoint(model=port).save(os.path.join(model_dir, "ckpt"))

    out_file = os.path.join(tmp, "ours", "shapemask.weights.h5")
    model, report, parity = convert_legacy_checkpoint.convert(
        legacy_model_dir=model_dir, output=out_file, verify_batch_size=2,
        print_fn=None)
    # The weights file loads into a fresh model of ours.
    fresh = factory.build_shapemask_model(
        num_clusters=3, **legacy_shapemask.model_kwargs_from_params(params))
    fresh.load_weights(out_file)
    same = all(np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(model.weights, fresh.weights))
    try:
      checkpoints.save_model_weights(model, os.path.join(tmp, "tf", "c"))
      tf_checkpoint = "written"
    except ValueError as e:
      tf_checkpoint = str(e)
    mapped = {row[1] for row in report.rows}
    print("RESULT" + json.dumps({
        "parity": parity,
        "num_rows": len(report.rows),
        "num_port_weights": len(port.weights),
        "all_ours_mapped": mapped == {v.path for v in model.weights},
        "num_weights": len(model.weights),
        "roundtrip_equal": bool(same),
        "tf_checkpoint": tf_checkpoint,
    }))
""")


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
  pytest.importorskip("official.legacy.detection.modeling.factory")
  tmp = tmp_path_factory.mktemp("legacy")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=str(REPO_ROOT))
  proc = subprocess.run(
      [sys.executable, "-c", _SCRIPT, str(tmp), json.dumps(TINY)],
      capture_output=True, text=True, env=env, timeout=900, cwd=REPO_ROOT,
      check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
  assert proc.returncode == 0 and lines, (
      f"conversion subprocess failed:\n{proc.stdout[-2000:]}\n"
      f"{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULT"):])


def test_every_variable_is_mapped(parity):
  # Every port weight and the priors; every one of our variables.
  assert parity["num_rows"] == parity["num_port_weights"] + 1
  assert parity["all_ours_mapped"]
  assert parity["num_rows"] == parity["num_weights"]


@pytest.mark.parametrize("name", [
    "backbone_C3", "backbone_C4", "backbone_C5", "fpn_P3", "fpn_P4",
    "fpn_P5", "fpn_P6", "fpn_P7", "retinanet_class_outputs",
    "retinanet_box_outputs"
])
def test_detector_outputs_agree(parity, name):
  assert parity["parity"][name] < 1e-4, parity["parity"]


@pytest.mark.parametrize("name", [
    "prior_masks", "coarse_mask_logits", "fine_mask_logits"
])
def test_mask_branch_agrees(parity, name):
  # Both mask branches run on the port's detections; the port's logits are
  # raw, ours too (before the sigmoid of `detection_masks`).
  assert parity["parity"][name] < 1e-4, parity["parity"]
  # Instances whose hard coarse masks differ (a logit within rounding of
  # the 0.5 threshold) are compared apart; there are few.
  assert parity["parity"]["fine_mask_threshold_sensitive_instances"] <= 10


def test_detections_and_masks_agree(parity):
  result = parity["parity"]
  assert result["num_port_detections"] == 200  # 100 per image, 2 images.
  assert result["detections_matched"] == 1.0
  # Ours are probabilities; the port returns raw logits (reference §12).
  assert result["detection_masks_vs_sigmoid_port"] < 1e-4


def test_weights_file_round_trip(parity):
  assert parity["roundtrip_equal"]


def test_tf_checkpoint_written_only_when_complete(parity):
  # Either TensorFlow tracks every variable, or the converter refuses with
  # a message naming the shortfall (never a silently partial checkpoint).
  message = parity["tf_checkpoint"]
  assert message == "written" or (
      f"of its {parity['num_weights']} variables" in message), message


def test_params_round_trip_and_unsupported_settings():
  pytest.importorskip("official.legacy.detection.configs.factory")
  from official_shapemask.weights import legacy_shapemask
  params = legacy_shapemask.legacy_params(TINY, batch_size=2)
  back = legacy_shapemask.model_kwargs_from_params(params)
  for key, value in TINY.items():
    assert back[key] == value, key
  assert back["aspect_ratios"] == (1.0, 2.0, 0.5)
  with pytest.raises(ValueError, match="width_multiplier"):
    legacy_shapemask.legacy_params(
        dict(TINY, backbone_width_multiplier=0.5))
  with pytest.raises(ValueError, match="mask_num_filters=16"):
    legacy_shapemask.legacy_params(dict(TINY, mask_num_filters=32))
