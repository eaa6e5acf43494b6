"""The whole ShapeMaskModel: serialization, `fit` and predictions on
coco_tiny160, XLA, mixed_bfloat16, and the JAX backend without TensorFlow.

The layers, heads and losses have their own unit tests (tests/modeling,
tests/ops, tests/losses); these tests check how the model puts them together.

This module imports no TensorFlow at the top level: the JAX subprocess
imports `TINY` and `synthetic_training_batch` from it with TensorFlow
blocked.
"""
import json
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from official_shapemask.modeling import ShapeMaskModel
from official_shapemask.modeling import build_shapemask_model
from official_shapemask.ops import anchors as anchors_lib

SIZE = 128
NUM_CLASSES = 91
BATCH = 2

# A model small enough to trace and run in seconds on 2 CPU cores. The low
# score threshold keeps detections (scores start near 0.01 with the -4.595
# class bias), so the prediction checks see real detections, not padding.
TINY = dict(num_classes=NUM_CLASSES, image_size=SIZE, backbone_depth=10,
            backbone_width_multiplier=0.25, min_level=3, max_level=5,
            fpn_num_filters=16, head_num_convs=1, head_num_filters=16,
            num_clusters=2, num_downsample_channels=8, mask_num_convs=1,
            mask_num_filters=8, freeze_early_convs=False, norm_momentum=0.9,
            pre_nms_num_boxes=200, score_threshold=1e-3)

LOSS_KEYS = ("cls_loss", "box_loss", "prior_loss", "coarse_loss",
             "fine_loss", "model_loss", "l2_loss", "total_loss")


def _np(x):
  return np.asarray(ops.convert_to_numpy(x))


def synthetic_training_batch(batch_size=BATCH, image_size=SIZE,
                             num_classes=NUM_CLASSES, min_level=3,
                             max_level=5, num_slots=8, mask_crop_size=32,
                             upsample_factor=4, seed=0):
  """A random numpy `(images, labels)` batch in the training contract
  (docs/contracts.md): every key, dtype and shape of the train parser."""
  rng = np.random.default_rng(seed)
  b, s, n, m = batch_size, image_size, num_slots, mask_crop_size
  total = anchors_lib.num_anchors((s, s), min_level, max_level)
  images = rng.normal(size=(b, s, s, 3)).astype(np.float32)
  cls_targets = rng.choice([-2, -1], size=(b, total), p=[0.1, 0.9])
  positive = rng.random((b, total)) < 0.01
  cls_targets[positive] = rng.integers(1, num_classes, positive.sum())
  box_targets = rng.normal(0.0, 0.5, (b, total, 4)) * positive[..., None]
  y0 = rng.uniform(0, s / 2, (b, n))
  x0 = rng.uniform(0, s / 2, (b, n))
  h = rng.uniform(8, s / 2, (b, n))
  w = rng.uniform(8, s / 2, (b, n))
  boxes = np.stack([y0, x0, y0 + h, x0 + w], -1)
  outer = np.stack([y0 - h / 8, x0 - w / 8, y0 + 9 * h / 8, x0 + 9 * w / 8],
                   -1).clip(0, s - 1)
  is_valid = np.ones((b, n), np.float32)
  is_valid[:, -2:] = 0.0  # Padded slots, as the parser writes them.
  classes = rng.integers(1, num_classes, (b, n)) * is_valid.astype(np.int64)
  masks = (rng.random((b, n, m, m)) < 0.4).astype(np.float32)
  fine = np.kron(masks, np.ones((upsample_factor, upsample_factor),
                                np.float32))
  info = np.array([[s, s], [s, s], [1.0, 1.0], [0.0, 0.0]], np.float32)
  labels = {
      "cls_targets": cls_targets.astype(np.int32),
      "box_targets": box_targets.astype(np.float32),
      "num_positives": positive.sum(axis=1).astype(np.float32),
      "image_info": np.tile(info, (b, 1, 1)),
      "mask_boxes": (boxes * is_valid[..., None]).astype(np.float32),
      "mask_outer_boxes": (outer * is_valid[..., None]).astype(np.float32),
      "mask_classes": classes.astype(np.int32),
      "mask_targets": masks * is_valid[..., None, None],
      "fine_mask_targets": fine * is_valid[..., None, None],
      "mask_is_valid": is_valid,
  }
  return images, labels


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def train_batch(tiny_train_records):
  """One real training batch (numpy) of coco_tiny160 at 128 px."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_shapemask.dataloaders import input_reader
  from official_shapemask.dataloaders import shapemask_parser
  parser = shapemask_parser.Parser(output_size=SIZE, min_level=3,
                                   max_level=5, seed=3)
  dataset = input_reader.build_dataset(tiny_train_records, parser,
                                       batch_size=BATCH, is_training=True,
                                       deterministic=True, seed=3)
  images, labels = next(iter(dataset))
  assert float(tf.reduce_sum(labels["mask_is_valid"])) > 0
  return images.numpy(), tf.nest.map_structure(lambda t: t.numpy(), labels)


@pytest.fixture(scope="module")
def eval_dataset(tiny_val_records):
  from official_shapemask.dataloaders import input_reader
  from official_shapemask.dataloaders import shapemask_parser
  parser = shapemask_parser.Parser(output_size=SIZE, min_level=3,
                                   max_level=5, mode="eval")
  return input_reader.build_dataset(tiny_val_records, parser,
                                    batch_size=BATCH, is_training=False)


# ---------------------------------------------------------- serialization
NON_DEFAULT = dict(
    TINY, num_clusters=3, mask_crop_size=16, upsample_factor=2,
    outer_box_scale=1.5, l2_weight_decay=3e-5, focal_loss_alpha=0.3,
    focal_loss_gamma=2.0, huber_loss_delta=0.1, box_loss_weight=20.0,
    prior_loss_weight=0.3, coarse_loss_weight=0.5, fine_loss_weight=2.0,
    nms_iou_threshold=0.6, max_num_detections=20, norm_epsilon=1e-3,
    anchor_size=3.0, num_mask_slots=4, l2_variables="seed_2019")


def _json(config):
  return json.loads(json.dumps(config))


def _check_round_trip(original, revived, images, labels):
  assert type(revived) is ShapeMaskModel
  assert revived is not original
  assert revived.get_config() == original.get_config()
  # Settings of the model, its layers and its loss survived.
  assert revived.outer_box_scale == 1.5
  assert revived.l2_weight_decay == 3e-5
  assert revived.l2_variables == "seed_2019"
  assert revived.image_size == SIZE
  assert revived.prior_head.num_clusters == 3
  assert revived.fine_head.upsample_factor == 2
  assert revived.detection_generator.get_config()["max_num_detections"] == 20
  assert revived.shapemask_loss.get_config()["box_loss_weight"] == 20.0
  # Same weights -> same training outputs, losses and detections.
  revived(revived.pack_inputs(images, labels), training=False)
  assert len(revived.weights) == len(original.weights)
  revived.set_weights(original.get_weights())
  _assert_same_outputs(revived, original, images, labels)


def _assert_same_outputs(got_model, want_model, images, labels):
  got = got_model(got_model.pack_inputs(images, labels), training=False)
  want = want_model(want_model.pack_inputs(images, labels), training=False)
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(_np(got[key]), _np(want[key]), rtol=1e-5,
                               atol=1e-5, err_msg=key)
  got_losses = got_model.compute_losses(labels, got)
  want_losses = want_model.compute_losses(labels, want)
  for key in LOSS_KEYS:
    np.testing.assert_allclose(_np(got_losses[key]), _np(want_losses[key]),
                               rtol=1e-5, err_msg=key)
  got = got_model(images, training=False)
  want = want_model(images, training=False)
  assert got["detection_masks"].shape == want["detection_masks"].shape
  for key in want:
    np.testing.assert_allclose(_np(got[key]), _np(want[key]), rtol=1e-5,
                               atol=1e-5, err_msg=key)


def test_config_round_trip_with_non_default_values(tmp_path):
  keras.utils.set_random_seed(0)
  model = build_shapemask_model(**NON_DEFAULT)
  # Non-zero priors so the copied `shape_priors` weight matters.
  rng = np.random.default_rng(0)
  model.prior_head.set_shape_priors(
      rng.uniform(size=model.prior_head.shape_priors_shape))
  images, labels = synthetic_training_batch(mask_crop_size=16,
                                            upsample_factor=2, num_slots=4)
  config = model.get_config()
  _check_round_trip(model, ShapeMaskModel.from_config(config), images,
                    labels)
  serialized = keras.saving.serialize_keras_object(model)
  assert serialized["registered_name"] == "official_shapemask>ShapeMaskModel"
  _check_round_trip(model, keras.saving.deserialize_keras_object(serialized),
                    images, labels)
  # A .keras file restores the architecture and every weight, priors too.
  path = tmp_path / "shapemask.keras"
  model.save(path)
  loaded = keras.models.load_model(path)
  # (Equal up to JSON's lists for tuples in the sub-layers' build shapes.)
  assert _json(loaded.get_config()) == _json(model.get_config())
  np.testing.assert_array_equal(_np(loaded.prior_head.shape_priors),
                                _np(model.prior_head.shape_priors))
  _assert_same_outputs(loaded, model, images, labels)


def test_l2_variables_rules():
  """'all' decays every trainable variable; 'seed_2019' the seed's subset.

  The seed's rule in the reference's names: no variable whose name holds
  `batch_normalization` (the backbone's batch norms) or `bias`; frozen
  kernels never count.
  """
  from official_shapemask.weights import tf1_names  # pylint: disable=g-import-not-at-top
  config = dict(TINY, freeze_early_convs=True)
  every = build_shapemask_model(**config)
  assert every.l2_variables == "all"
  assert every.l2_regularized_variables() == every.trainable_variables
  seed = build_shapemask_model(**dict(config, l2_variables="seed_2019"))
  chosen = {id(v) for v in seed.l2_regularized_variables()}
  trainable = {id(v) for v in seed.trainable_variables}
  entries = tf1_names.tf1_variables(seed)
  assert trainable <= {id(e.variable) for e in entries}
  by_rule = {id(e.variable) for e in entries if id(e.variable) in trainable
             and "batch_normalization" not in e.name and "bias" not in e.name}
  assert chosen == by_rule
  # What the rule keeps and drops, by layer.
  assert id(seed.decoder.norms["3"].gamma) in chosen
  assert id(seed.head.class_norms["0-3"].beta) in chosen
  assert id(seed.coarse_head.norms[0].gamma) in chosen
  assert id(seed.backbone.groups[1][0].convs[0].bn.gamma) not in chosen
  assert id(seed.head.class_predict.bias) not in chosen
  assert id(seed.fine_head.upsample.bias) not in chosen
  assert id(seed.backbone.stem.conv.kernel) not in trainable  # Frozen.
  assert id(seed.backbone.groups[1][0].convs[0].conv.kernel) in chosen
  # The loss term sums over them.
  seed.set_weights(every.get_weights())
  images, labels = synthetic_training_batch()
  for model, variables in ((every, every.trainable_variables),
                           (seed, seed.l2_regularized_variables())):
    outputs = model(model.pack_inputs(images, labels), training=False)
    got = _np(model.compute_losses(labels, outputs)["l2_loss"])
    want = 1e-4 * sum(0.5 * np.sum(np.square(_np(v)).astype(np.float64))
                      for v in variables)
    np.testing.assert_allclose(got, want, rtol=1e-5)
  with pytest.raises(ValueError, match="l2_variables='seed'"):
    build_shapemask_model(**dict(TINY, l2_variables="seed"))


# ------------------------------------------------------------- fit, predict
def _tf_batch_dataset(images, labels):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.data.Dataset.from_tensors((images, labels)).repeat()


def test_one_fit_step_on_real_data_uses_compute_losses(train_batch):
  pytest.importorskip("tensorflow")
  images, labels = train_batch
  keras.utils.set_random_seed(1)
  model = build_shapemask_model(**TINY)
  model.compile(optimizer=keras.optimizers.SGD(0.01))
  # The losses of the batch before the step, on the ground-truth boxes.
  outputs = model(model.pack_inputs(images, labels), training=True)
  expected = {k: float(_np(v)) for k, v in
              model.compute_losses(labels, outputs).items()}
  for key in LOSS_KEYS:
    assert np.isfinite(expected[key]) and expected[key] > 0, (key, expected)
  before = {v.path: _np(v) for v in model.weights}

  history = model.fit(_tf_batch_dataset(images, labels), epochs=1,
                      steps_per_epoch=1, verbose=0)

  logs = {k: v[0] for k, v in history.history.items()}
  np.testing.assert_allclose(logs["loss"], expected["total_loss"], rtol=1e-4)
  for key in ("cls_loss", "box_loss", "prior_loss", "coarse_loss",
              "fine_loss", "l2_loss"):
    np.testing.assert_allclose(logs[key], expected[key], rtol=1e-4,
                               err_msg=key)
  changed = {v.path for v in model.weights
             if not np.array_equal(_np(v), before[v.path])}
  # Every part of the network got gradients and took a step; the batch
  # norms updated their moving statistics; the priors did not move.
  for part in ("backbone", "decoder", "head", "prior_head", "coarse_head",
               "fine_head"):
    layer = getattr(model, part)
    assert any(v.path in changed for v in layer.trainable_variables), part
  assert model.prior_head.shape_classifier.kernel.path in changed
  assert any(path.endswith("moving_mean") for path in changed)
  assert model.prior_head.shape_priors.path not in changed

  # `evaluate` runs the same losses with inference-mode batch norm.
  outputs = model(model.pack_inputs(images, labels), training=False)
  expected = {k: float(_np(v)) for k, v in
              model.compute_losses(labels, outputs).items()}
  results = model.evaluate(_tf_batch_dataset(images, labels), steps=1,
                           verbose=0, return_dict=True)
  np.testing.assert_allclose(results["loss"], expected["total_loss"],
                             rtol=1e-4)
  np.testing.assert_allclose(results["fine_loss"], expected["fine_loss"],
                             rtol=1e-4)


def _check_predictions(out, images, num_classes=NUM_CLASSES, max_det=100):
  b, s = images.shape[0], images.shape[1]
  m = 32 * 4
  num = _np(out["num_detections"])
  boxes = _np(out["detection_boxes"])
  outer = _np(out["detection_outer_boxes"])
  classes = _np(out["detection_classes"])
  scores = _np(out["detection_scores"])
  masks = _np(out["detection_masks"])
  assert num.shape == (b,) and num.dtype == np.int32
  assert boxes.shape == outer.shape == (b, max_det, 4)
  assert classes.shape == scores.shape == (b, max_det)
  assert classes.dtype == np.int32 and scores.dtype == np.float32
  assert masks.shape == (b, max_det, m, m) and masks.dtype == np.float32
  assert np.all((num >= 0) & (num <= max_det))
  valid = np.arange(max_det)[None, :] < num[:, None]
  assert valid.any(), "no detections: the range checks would be vacuous"
  v_boxes, v_outer = boxes[valid], outer[valid]
  for name, b_ in (("boxes", v_boxes), ("outer boxes", v_outer)):
    assert np.all((b_ >= 0) & (b_ <= s - 1)), name
    assert np.all(b_[:, 0] <= b_[:, 2]) and np.all(b_[:, 1] <= b_[:, 3]), name
  # The outer box contains its box.
  assert np.all(v_outer[:, :2] <= v_boxes[:, :2] + 1e-4)
  assert np.all(v_outer[:, 2:] >= v_boxes[:, 2:] - 1e-4)
  assert np.all((classes[valid] >= 1) & (classes[valid] < num_classes))
  assert np.all((scores[valid] >= 0) & (scores[valid] <= 1))
  assert np.all(np.diff(np.where(valid, scores, -1), axis=1) <= 0)
  assert np.all(scores[~valid] == -1)
  assert np.all((masks >= 0) & (masks <= 1)) and np.isfinite(masks).all()
  # Mask probabilities are not constant: the mask branch ran per detection.
  assert masks[valid].std() > 0


def test_predictions_on_eval_batches_have_documented_shapes_and_ranges(
    eval_dataset):
  keras.utils.set_random_seed(2)
  model = build_shapemask_model(**TINY)
  batches = list(eval_dataset.take(2))
  per_batch = []
  for batch in batches:
    images, labels = batch
    # A whole eval batch: predicts from the images, passes image_info on.
    out = model.predict_on_batch(batch)
    _check_predictions(out, images.numpy())
    np.testing.assert_array_equal(out["image_info"],
                                  labels["image_info"].numpy())
    per_batch.append(out)
  # Images alone: the same detections, no image_info.
  alone = model.predict_on_batch(images)
  assert "image_info" not in alone
  for key in ("detection_boxes", "detection_scores", "detection_masks"):
    np.testing.assert_allclose(_np(alone[key]), _np(per_batch[-1][key]),
                               rtol=1e-5, atol=1e-5, err_msg=key)
  # `predict` over the eval dataset concatenates the same batches.
  full = model.predict(eval_dataset.take(2), verbose=0)
  assert full["detection_masks"].shape == (2 * BATCH, 100, 128, 128)
  for key in ("num_detections", "detection_boxes", "image_info"):
    want = np.concatenate([_np(out[key]) for out in per_batch])
    np.testing.assert_allclose(full[key], want, rtol=1e-5, atol=1e-4,
                               err_msg=key)


# ---------------------------------------------------------------------- XLA
def test_train_step_under_xla_gives_the_same_loss_and_gradients(train_batch):
  tf = pytest.importorskip("tensorflow")
  if keras.backend.backend() != "tensorflow":
    pytest.skip("the XLA check runs with the TensorFlow backend")
  images, labels = train_batch
  keras.utils.set_random_seed(3)
  model = build_shapemask_model(**TINY)
  variables = model.trainable_variables

  def step(images, labels):
    with tf.GradientTape() as tape:
      outputs = model(model.pack_inputs(images, labels), training=True)
      losses = model.compute_losses(labels, outputs)
    grads = tape.gradient(losses["total_loss"], variables)
    return losses, grads

  images_t = tf.constant(images)
  labels_t = tf.nest.map_structure(tf.constant, labels)
  eager_losses, eager_grads = step(images_t, labels_t)
  xla_step = tf.function(step, jit_compile=True)
  xla_losses, xla_grads = xla_step(images_t, labels_t)
  for key in LOSS_KEYS:
    np.testing.assert_allclose(_np(xla_losses[key]), _np(eager_losses[key]),
                               rtol=2e-4, atol=1e-6, err_msg=key)
  assert all(g is not None for g in xla_grads)
  eager_norm = float(tf.linalg.global_norm(eager_grads))
  assert eager_norm > 0
  diffs = [x - e for x, e in zip(xla_grads, eager_grads)]
  assert float(tf.linalg.global_norm(diffs)) <= 1e-3 * eager_norm
  # Per variable, up to rounding noise: the biases of convolutions followed
  # by batch norm have an exactly zero true gradient (the norm removes any
  # constant shift), so only noise of ~1e-10 remains there.
  for v, diff, g_eager in zip(variables, diffs, eager_grads):
    assert float(tf.norm(diff)) <= (1e-2 * float(tf.norm(g_eager)) +
                                    1e-5 * eager_norm), v.path


@pytest.mark.slow  # A second XLA compile (~15 s of CPU).
def test_fit_with_jit_compile_takes_the_same_step(train_batch):
  # What `fit` does by default on a GPU (jit_compile='auto'): the whole Keras
  # train step, optimizer and loss trackers included, under XLA.
  pytest.importorskip("tensorflow")
  if keras.backend.backend() != "tensorflow":
    pytest.skip("the XLA check runs with the TensorFlow backend")
  images, labels = train_batch
  keras.utils.set_random_seed(5)
  model = build_shapemask_model(**TINY)
  initial = model.get_weights()
  results = []
  for jit_compile in (False, True):
    model.set_weights(initial)
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  jit_compile=jit_compile)
    history = model.fit(_tf_batch_dataset(images, labels), epochs=1,
                        steps_per_epoch=1, verbose=0)
    results.append((history.history, model.get_weights()))
  (plain, plain_weights), (xla, xla_weights) = results
  for key in ("loss", "cls_loss", "box_loss", "prior_loss", "coarse_loss",
              "fine_loss", "l2_loss"):
    np.testing.assert_allclose(xla[key][0], plain[key][0], rtol=2e-4,
                               err_msg=key)
  moved = 0
  for before, got, want in zip(initial, xla_weights, plain_weights):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    moved += not np.array_equal(want, before)
  assert moved > len(initial) // 2


# ------------------------------------------------------------ mixed bfloat16
@pytest.fixture
def mixed_bfloat16_policy():
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def _dtype(x):
  return keras.backend.standardize_dtype(x.dtype)


def test_mixed_bfloat16_train_step(train_batch, mixed_bfloat16_policy):
  pytest.importorskip("tensorflow")
  images, labels = train_batch
  keras.utils.set_random_seed(4)
  model = build_shapemask_model(**TINY)
  assert {_dtype(v) for v in model.weights} == {"float32"}
  # Forward activations are bfloat16.
  features = model.backbone(images, training=True)
  assert {_dtype(t) for t in features.values()} == {"bfloat16"}
  pyramid = model.decoder(features, training=True)
  assert {_dtype(t) for t in pyramid.values()} == {"bfloat16"}
  assert {_dtype(t) for t in model.head(pyramid)} == {"bfloat16"}
  instance_features, _ = model.prior_head(
      pyramid, labels["mask_boxes"], labels["mask_outer_boxes"],
      labels["mask_classes"])
  assert _dtype(instance_features) == "bfloat16"
  # Outputs and losses are float32 and finite.
  outputs = model(model.pack_inputs(images, labels), training=True)
  assert {_dtype(t) for t in outputs.values()} == {"float32"}
  terms = model.compute_losses(labels, outputs)
  for key in LOSS_KEYS:
    assert _dtype(terms[key]) == "float32", key
    assert np.isfinite(float(_np(terms[key]))), key
  before = _np(model.head.trainable_variables[0])
  model.compile(optimizer=keras.optimizers.SGD(0.01))
  history = model.fit(_tf_batch_dataset(images, labels), epochs=1,
                      steps_per_epoch=1, verbose=0)
  for key in ("loss", "cls_loss", "box_loss", "fine_loss"):
    assert np.isfinite(history.history[key][0]), key
  np.testing.assert_allclose(history.history["loss"][0],
                             float(_np(terms["total_loss"])), rtol=2e-2)
  assert {_dtype(v) for v in model.weights} == {"float32"}
  assert not np.array_equal(_np(model.head.trainable_variables[0]), before)
  predictions = model(images, training=False)
  masks = _np(predictions["detection_masks"])
  assert masks.dtype == np.float32 and np.all((masks >= 0) & (masks <= 1))


# -------------------------------------------------- without TensorFlow / JAX
_BLOCK_TENSORFLOW = textwrap.dedent("""
    import importlib.abc
    import sys

    class _NoTensorFlow(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.startswith("tensorflow") or name.split(".")[0] == "tf_keras":
          raise ImportError(f"{name} is blocked in this test")
        return None

    sys.meta_path.insert(0, _NoTensorFlow())
    for name in list(sys.modules):
      assert not name.startswith("tensorflow"), name
""")

_IMPORT_SCRIPT = _BLOCK_TENSORFLOW + textwrap.dedent("""
    import keras
    assert keras.backend.backend() == "jax", keras.backend.backend()
    import official_shapemask.modeling
    import official_shapemask.losses
    import official_shapemask.ops
    from official_shapemask.modeling import build_shapemask_model
    assert callable(build_shapemask_model)
    try:
      import tensorflow  # noqa: F401
    except ImportError:
      pass
    else:
      raise AssertionError("the TensorFlow blocker does not work")
    assert not [m for m in sys.modules if m.startswith("tensorflow")]
    print("IMPORT_OK")
""")

_JAX_TRAIN_SCRIPT = _BLOCK_TENSORFLOW + textwrap.dedent("""
    import keras
    import numpy as np
    assert keras.backend.backend() == "jax", keras.backend.backend()
    from official_shapemask.modeling import build_shapemask_model
    from test_shapemask_model import TINY, synthetic_training_batch
    from test_shapemask_model import _check_predictions

    prior_path = sys.argv[1]
    np.save(prior_path, np.random.default_rng(0).uniform(
        size=(TINY["num_classes"], 3, 32, 32)).astype(np.float32))
    config = dict(TINY, num_clusters=None, shape_prior_path=prior_path)
    model = build_shapemask_model(**config)
    assert model.prior_head.num_clusters == 3
    np.testing.assert_allclose(
        np.asarray(model.prior_head.shape_priors), np.load(prior_path))
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    images, labels = synthetic_training_batch()
    before = [np.asarray(v) for v in model.trainable_variables]
    history = model.fit(images, labels, batch_size=images.shape[0],
                        epochs=1, verbose=0)
    for key in ("loss", "cls_loss", "box_loss", "prior_loss", "coarse_loss",
                "fine_loss", "l2_loss"):
      value = history.history[key][0]
      assert np.isfinite(value) and value > 0, (key, value)
    moved = sum(not np.array_equal(np.asarray(v), b)
                for v, b in zip(model.trainable_variables, before))
    assert moved == len(before), (moved, len(before))
    out = model.predict_on_batch(images)
    _check_predictions(out, images)
    # The seed's L2 rule reads the values a stateless step maps in.
    from official_shapemask import losses as losses_lib
    seed = build_shapemask_model(**dict(config, l2_variables="seed_2019"))
    chosen = seed.l2_regularized_variables()
    assert 0 < len(chosen) < len(seed.trainable_variables)
    plain = float(losses_lib.l2_regularization_loss(chosen))
    doubled = [(v, v.value * 2.0) for v in seed.trainable_variables]
    with keras.StatelessScope(state_mapping=doubled):
      mapped = float(losses_lib.l2_regularization_loss(
          seed.l2_regularized_variables()))
    np.testing.assert_allclose(mapped, 4.0 * plain, rtol=1e-5)
    assert not [m for m in sys.modules if m.startswith("tensorflow")]
    print("JAX_TRAIN_OK", history.history["loss"][0])
""")


def test_import_modeling_without_tensorflow(run_under_jax):
  result = run_under_jax(_IMPORT_SCRIPT)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "IMPORT_OK" in result.stdout


@pytest.mark.slow  # ~50 s of CPU: XLA-compiling the JAX train and predict.
def test_fit_step_and_predict_under_jax_without_tensorflow(tmp_path,
                                                           run_under_jax):
  result = run_under_jax(_JAX_TRAIN_SCRIPT, str(tmp_path / "priors.npy"))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "JAX_TRAIN_OK" in result.stdout
