"""ShapeMask losses against straightforward numpy re-computations (§6)."""
import keras
import numpy as np
import pytest
from keras import ops

from official_shapemask import losses


def _np(x):
  return ops.convert_to_numpy(x)


def _np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_sigmoid_ce(x, z):
  p = _np_sigmoid(x)
  return -(z * np.log(p) + (1 - z) * np.log(1 - p))


def _random_batch(seed=0, batch=2, anchors=50, classes=6, slots=3, m=4, u=2):
  rng = np.random.default_rng(seed)
  cls_targets = rng.integers(-2, classes, size=(batch, anchors)).astype(
      np.int32)
  positive = cls_targets >= 0
  box_targets = rng.normal(0, 0.3, size=(batch, anchors, 4)).astype(np.float32)
  box_targets[~positive] = 0.0
  box_targets[0, 0, 1] = 0.0  # A zero target element of a positive anchor.
  labels = {
      "cls_targets": cls_targets,
      "box_targets": box_targets,
      "num_positives": positive.sum(1).astype(np.float32),
      "mask_targets": (rng.uniform(size=(batch, slots, m, m)) > 0.5).astype(
          np.float32),
      "fine_mask_targets": (rng.uniform(
          size=(batch, slots, m * u, m * u)) > 0.5).astype(np.float32),
      "mask_is_valid": np.array([[1, 1, 0], [1, 0, 0]], np.float32),
      "image_info": np.zeros((batch, 4, 2), np.float32),
  }
  outputs = {
      "cls_outputs": rng.normal(0, 3, size=(batch, anchors, classes)).astype(
          np.float32),
      "box_outputs": rng.normal(0, 0.3, size=(batch, anchors, 4)).astype(
          np.float32),
      "prior_masks": rng.uniform(size=(batch, slots, m, m)).astype(np.float32),
      "coarse_mask_logits": rng.normal(0, 2, size=(batch, slots, m, m)).astype(
          np.float32),
      "fine_mask_logits": rng.normal(
          0, 2, size=(batch, slots, m * u, m * u)).astype(np.float32),
  }
  return labels, outputs


def _np_focal(logits, cls_targets, alpha, gamma, normalizer):
  num_classes = logits.shape[-1]
  onehot = (cls_targets[..., None] == np.arange(num_classes)).astype(
      np.float64)
  p = _np_sigmoid(logits.astype(np.float64))
  p_t = np.where(onehot == 1, p, 1 - p)
  loss = (1 - p_t)**gamma * _np_sigmoid_ce(logits.astype(np.float64), onehot)
  loss *= np.where(onehot == 1, alpha, 1 - alpha)
  loss *= (cls_targets != -2)[..., None]
  return loss.sum() / normalizer


def _np_huber(outputs, targets, delta, normalizer):
  err = np.abs(outputs.astype(np.float64) - targets)
  huber = np.where(err <= delta, 0.5 * err**2, delta * (err - 0.5 * delta))
  return (huber * (targets != 0)).sum() / (4 * normalizer)


def test_focal_modulator_equals_direct_formula():
  logits = np.linspace(-8, 8, 33).astype(np.float32)
  for target in (0.0, 1.0):
    z = np.full_like(logits, target)
    p = _np_sigmoid(logits.astype(np.float64))
    p_t = p if target == 1.0 else 1 - p
    for gamma in (0.5, 1.5, 2.0):
      np.testing.assert_allclose(
          _np(losses.focal_modulator(logits, z, gamma)), (1 - p_t)**gamma,
          rtol=1e-5, atol=1e-7)


def test_focal_modulator_and_gradient_are_finite_for_extreme_logits():
  import tensorflow as tf
  logits = tf.constant([-200.0, -90.0, 0.0, 90.0, 200.0])
  for target in (0.0, 1.0):
    with tf.GradientTape() as tape:
      tape.watch(logits)
      value = losses.focal_modulator(logits, tf.fill([5], target), 0.5)
    grad = tape.gradient(value, logits)
    assert np.all(np.isfinite(value.numpy())) and np.all(
        np.isfinite(grad.numpy()))
  # Confident correct positives have modulator -> 0, wrong ones -> 1.
  np.testing.assert_allclose(
      _np(losses.focal_modulator(np.array([200.0, -200.0], np.float32),
                                 np.ones(2, np.float32), 1.5)), [0.0, 1.0])


def test_focal_loss_matches_numpy():
  labels, outputs = _random_batch()
  normalizer = labels["num_positives"].sum() + 1.0
  got = _np(losses.focal_loss(outputs["cls_outputs"], labels["cls_targets"],
                              alpha=0.4, gamma=1.5, normalizer=normalizer))
  want = _np_focal(outputs["cls_outputs"], labels["cls_targets"], 0.4, 1.5,
                   normalizer)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Ignored anchors contribute nothing, whatever their logits.
  changed = outputs["cls_outputs"].copy()
  changed[labels["cls_targets"] == -2] = 50.0
  np.testing.assert_allclose(
      _np(losses.focal_loss(changed, labels["cls_targets"], 0.4, 1.5,
                            normalizer)), got, rtol=1e-6)


def test_huber_box_loss_matches_numpy():
  labels, outputs = _random_batch(seed=1)
  normalizer = labels["num_positives"].sum() + 1.0
  got = _np(losses.huber_box_loss(outputs["box_outputs"],
                                  labels["box_targets"], delta=0.15,
                                  normalizer=normalizer))
  want = _np_huber(outputs["box_outputs"], labels["box_targets"], 0.15,
                   normalizer)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_mask_losses_match_numpy_with_all_slot_denominators():
  labels, outputs = _random_batch(seed=2)
  valid = labels["mask_is_valid"][:, :, None, None]
  t, tf_ = labels["mask_targets"], labels["fine_mask_targets"]
  want_prior = 0.5 * ((t - outputs["prior_masks"])**2 * valid).sum() / (
      t.sum() + 1e-20)
  want_coarse = (_np_sigmoid_ce(outputs["coarse_mask_logits"].astype(
      np.float64), t) * valid).sum() / (t.sum() + 1e-20)
  want_fine = (_np_sigmoid_ce(outputs["fine_mask_logits"].astype(np.float64),
                              tf_) * valid).sum() / (tf_.sum() + 1e-20)
  np.testing.assert_allclose(
      _np(losses.shape_prior_loss(outputs["prior_masks"], t,
                                  labels["mask_is_valid"])), want_prior,
      rtol=1e-5)
  np.testing.assert_allclose(
      _np(losses.mask_cross_entropy_loss(outputs["coarse_mask_logits"], t,
                                         labels["mask_is_valid"])),
      want_coarse, rtol=1e-5)
  np.testing.assert_allclose(
      _np(losses.mask_cross_entropy_loss(outputs["fine_mask_logits"], tf_,
                                         labels["mask_is_valid"])),
      want_fine, rtol=1e-5)
  # Invalid slots count in the denominator but not in the numerator.
  assert t[~labels["mask_is_valid"].astype(bool)].sum() > 0


def test_mask_losses_are_zero_without_foreground_or_valid_slots():
  zeros = np.zeros((1, 2, 4, 4), np.float32)
  assert float(_np(losses.shape_prior_loss(zeros, zeros,
                                           np.zeros((1, 2))))) == 0.0
  assert float(_np(losses.mask_cross_entropy_loss(zeros, zeros,
                                                  np.zeros((1, 2))))) == 0.0


def test_l2_regularization_loss():
  rng = np.random.default_rng(4)
  values = [rng.normal(size=s).astype(np.float32) for s in ((3, 4), (5,))]
  variables = [keras.Variable(v) for v in values]
  want = 1e-4 * sum(0.5 * (v.astype(np.float64)**2).sum() for v in values)
  np.testing.assert_allclose(_np(losses.l2_regularization_loss(variables)),
                             want, rtol=1e-5)
  np.testing.assert_allclose(
      _np(losses.l2_regularization_loss(variables, weight=0.5)),
      want / 1e-4 * 0.5, rtol=1e-5)
  assert float(_np(losses.l2_regularization_loss([]))) == 0.0


def test_shapemask_loss_terms_and_weighted_sum():
  labels, outputs = _random_batch(seed=5)
  loss_fn = losses.ShapeMaskLoss(box_loss_weight=40.0, prior_loss_weight=0.2,
                                 coarse_loss_weight=0.5, fine_loss_weight=2.0)
  terms = {k: float(_np(v)) for k, v in loss_fn(labels, outputs).items()}
  assert set(terms) == {"cls_loss", "box_loss", "prior_loss", "coarse_loss",
                        "fine_loss", "model_loss"}
  normalizer = labels["num_positives"].sum() + 1.0
  np.testing.assert_allclose(
      terms["cls_loss"],
      _np_focal(outputs["cls_outputs"], labels["cls_targets"], 0.4, 1.5,
                normalizer), rtol=1e-5)
  np.testing.assert_allclose(
      terms["box_loss"],
      _np_huber(outputs["box_outputs"], labels["box_targets"], 0.15,
                normalizer), rtol=1e-5)
  want = (terms["cls_loss"] + 40.0 * terms["box_loss"] +
          0.2 * terms["prior_loss"] + 0.5 * terms["coarse_loss"] +
          2.0 * terms["fine_loss"])
  np.testing.assert_allclose(terms["model_loss"], want, rtol=1e-5)
  assert all(v > 0 for v in terms.values())


def test_shapemask_loss_is_float32_for_bfloat16_inputs():
  labels, outputs = _random_batch(seed=6)
  bf16 = {k: ops.cast(v, "bfloat16") for k, v in outputs.items()}
  terms = losses.ShapeMaskLoss()(labels, bf16)
  for value in terms.values():
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert np.isfinite(_np(value))


def test_shapemask_loss_config_round_trip_and_missing_keys():
  loss_fn = losses.ShapeMaskLoss(focal_loss_alpha=0.25, focal_loss_gamma=2.0,
                                 huber_loss_delta=0.1, box_loss_weight=10.0,
                                 prior_loss_weight=0.3, coarse_loss_weight=0.7,
                                 fine_loss_weight=1.5, mask_loss_epsilon=1e-6)
  config = loss_fn.get_config()
  clone = losses.ShapeMaskLoss.from_config(config)
  assert clone.get_config() == config
  assert config["focal_loss_gamma"] == 2.0 and config["mask_loss_epsilon"] == 1e-6
  revived = keras.saving.deserialize_keras_object(
      keras.saving.serialize_keras_object(loss_fn))
  assert isinstance(revived, losses.ShapeMaskLoss)
  assert revived.get_config() == config
  labels, outputs = _random_batch(seed=7)
  del labels["fine_mask_targets"]
  with pytest.raises(KeyError, match="fine_mask_targets"):
    loss_fn(labels, outputs)


def _four_images():
  """Two random batches of 2 as one batch of 4 (other positives per half)."""
  first, second = _random_batch(seed=7), _random_batch(seed=8, anchors=50)
  second[0]["cls_targets"][:, :20] = -1  # Fewer positives in the 2nd half.
  second[0]["num_positives"] = (second[0]["cls_targets"] >= 0).sum(1).astype(
      np.float32)
  second[0]["box_targets"][second[0]["cls_targets"] < 0] = 0.0
  join = lambda a, b: {k: np.concatenate([a[k], b[k]]) for k in a}  # pylint: disable=unnecessary-lambda-assignment
  return join(first[0], second[0]), join(first[1], second[1])


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_loss_is_the_mean_of_each_groups_loss(groups):
  labels, outputs = _four_images()
  loss_fn = losses.ShapeMaskLoss()
  got = {k: float(_np(v))
         for k, v in loss_fn(labels, outputs, num_groups=groups).items()}
  per = 4 // groups
  parts = [loss_fn({k: v[g * per:(g + 1) * per] for k, v in labels.items()},
                   {k: v[g * per:(g + 1) * per] for k, v in outputs.items()})
           for g in range(groups)]
  whole = {k: float(_np(v)) for k, v in loss_fn(labels, outputs).items()}
  for key in got:
    want = np.mean([float(_np(p[key])) for p in parts])
    np.testing.assert_allclose(got[key], want, rtol=1e-5, err_msg=key)
  # The class loss from numpy, each group by its own positives + 1.
  want = np.mean([
      _np_focal(outputs["cls_outputs"][g * per:(g + 1) * per],
                labels["cls_targets"][g * per:(g + 1) * per], 0.4, 1.5,
                labels["num_positives"][g * per:(g + 1) * per].sum() + 1.0)
      for g in range(groups)])
  np.testing.assert_allclose(got["cls_loss"], want, rtol=1e-5)
  # Not the whole batch's normalisation (the groups' counts differ).
  for key in ("cls_loss", "box_loss", "coarse_loss", "model_loss"):
    assert abs(got[key] - whole[key]) > 1e-3 * abs(whole[key]), key


def test_grouped_loss_needs_a_batch_multiple():
  labels, outputs = _four_images()
  with pytest.raises(ValueError, match="batch of 4 images is not a multiple "
                     "of num_groups=3"):
    losses.ShapeMaskLoss()(labels, outputs, num_groups=3)
