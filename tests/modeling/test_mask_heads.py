"""ShapeMask mask-branch heads (§5.4-§5.6): shapes, semantics, gradients,
serialization, the JAX backend and XLA compilation."""
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import ops

from official_shapemask import losses
from official_shapemask.modeling.heads.coarse_mask_head import CoarseMaskHead
from official_shapemask.modeling.heads.fine_mask_head import FineMaskHead
from official_shapemask.modeling.heads.shape_prior_head import ShapePriorHead
from official_shapemask.ops import spatial_transform as st

B, N, M, K, C, D, U = 2, 3, 8, 3, 5, 8, 2
CANVAS = 128


def _np(x):
  return ops.convert_to_numpy(x)


def _inputs(seed=0):
  """FPN features (levels 3..7, 6 channels), boxes, outer boxes, classes."""
  rng = np.random.default_rng(seed)
  features = {str(l): rng.normal(size=(B, CANVAS // 2**l, CANVAS // 2**l, 6))
                      .astype(np.float32) for l in range(3, 8)}
  y0 = rng.uniform(5, 60, size=(B, N))
  x0 = rng.uniform(5, 60, size=(B, N))
  h = rng.uniform(10, 60, size=(B, N))
  w = rng.uniform(10, 60, size=(B, N))
  boxes = np.stack([y0, x0, y0 + h, x0 + w], -1).astype(np.float32)
  outer = np.stack([y0 - 0.125 * h, x0 - 0.125 * w, y0 + 1.125 * h,
                    x0 + 1.125 * w], -1).clip(0, CANVAS).astype(np.float32)
  classes = np.array([[1, 4, 2], [3, 0, 1]], np.int32)
  return features, boxes, outer, classes


def _heads(use_category=True, upsample=U, num_convs=2, dtype=None, seed=0):
  keras.utils.set_random_seed(seed)
  kwargs = {"dtype": dtype} if dtype else {}
  prior = ShapePriorHead(num_classes=C, num_clusters=K, mask_crop_size=M,
                         num_downsample_channels=D,
                         use_category_for_mask=use_category, **kwargs)
  rng = np.random.default_rng(seed)
  prior.set_shape_priors(rng.uniform(size=prior.shape_priors_shape))
  coarse = CoarseMaskHead(num_classes=C, mask_crop_size=M,
                          num_convs=num_convs, num_filters=D,
                          use_category_for_mask=use_category, **kwargs)
  fine = FineMaskHead(num_classes=C, mask_crop_size=M, num_convs=num_convs,
                      num_filters=D, upsample_factor=upsample,
                      use_category_for_mask=use_category, **kwargs)
  return prior, coarse, fine


def _randomize_class_predictors(*heads, seed=1):
  """Replace the N(0, 0.01) / -4.6 init so channel selection matters."""
  rng = np.random.default_rng(seed)
  for head in heads:
    conv = head.class_predict
    conv.kernel.assign(rng.normal(size=conv.kernel.shape))
    conv.bias.assign(rng.normal(size=conv.bias.shape))
    upsample = getattr(head, "upsample", None)
    if upsample is not None:
      upsample.bias.assign(rng.normal(size=upsample.bias.shape))


def _run(heads, inputs, training=False):
  prior_head, coarse_head, fine_head = heads
  features, boxes, outer, classes = inputs
  inst, prior = prior_head(features, boxes, outer, classes, training=training)
  coarse = coarse_head(inst, prior, classes, training=training)
  fine = fine_head(inst, coarse, classes, training=training)
  return inst, prior, coarse, fine


def _select(full, classes):
  """[B*N, h, w, C] all-channel logits -> [B, N, h, w] of each class."""
  full = _np(full).reshape((B, N) + tuple(full.shape[1:]))
  return np.take_along_axis(full, classes[:, :, None, None, None], -1)[..., 0]


def test_head_output_shapes_and_ranges():
  inst, prior, coarse, fine = _run(_heads(), _inputs(), training=True)
  assert tuple(inst.shape) == (B, N, M, M, D)
  assert tuple(prior.shape) == (B, N, M, M)
  assert tuple(coarse.shape) == (B, N, M, M)
  assert tuple(fine.shape) == (B, N, M * U, M * U)
  assert _np(prior).min() >= 0.0 and _np(prior).max() <= 1.0 + 1e-6
  for tensor in (inst, prior, coarse, fine):
    assert np.all(np.isfinite(_np(tensor)))


def test_class_predictor_init_matches_reference():
  heads = _heads()
  _, _, coarse_logits, fine_logits = _run(heads, _inputs())
  for head in heads[1:]:
    np.testing.assert_allclose(_np(head.class_predict.bias), -4.59512,
                               atol=1e-5)
    assert abs(float(np.std(_np(head.class_predict.kernel))) - 0.01) < 0.004
  classifier = _np(heads[0].shape_classifier.kernel)
  assert abs(float(np.std(classifier)) - 0.01) < 0.004
  np.testing.assert_array_equal(_np(heads[0].shape_classifier.bias), 0.0)
  # With this init the logits start near -ln(99) (probability 0.01).
  assert abs(float(np.mean(_np(coarse_logits))) + 4.595) < 0.2
  assert abs(float(np.mean(_np(fine_logits))) + 4.595) < 0.2


def test_prior_head_matches_numpy_recomputation():
  prior_head = _heads()[0]
  features, boxes, outer, classes = _inputs(seed=2)
  inst, prior = prior_head(features, boxes, outer, classes)
  rng = np.random.default_rng(5)
  prior_head.shape_classifier.kernel.assign(
      rng.normal(size=prior_head.shape_classifier.kernel.shape))
  inst, prior = prior_head(features, boxes, outer, classes)

  crops = _np(st.multilevel_crop_and_resize(features, outer, M))
  fc_kernel = _np(prior_head.shape_prior_fc.kernel)[0, 0]
  want_inst = crops @ fc_kernel + _np(prior_head.shape_prior_fc.bias)
  np.testing.assert_allclose(_np(inst), want_inst, rtol=1e-4, atol=1e-5)

  uniform = _np(st.crop_mask_in_target_box(np.ones((B, N, M, M), np.float32),
                                            boxes, outer, M))
  pooled = (want_inst * uniform[..., None]).mean(axis=(2, 3))
  logits = (pooled @ _np(prior_head.shape_classifier.kernel) +
            _np(prior_head.shape_classifier.bias)).reshape(B, N, C, K)
  logits = np.take_along_axis(logits, classes[:, :, None, None], 2)[:, :, 0]
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  priors = _np(prior_head.shape_priors)[classes]  # [B, N, K, M, M]
  tight = (weights[..., None, None] * priors).sum(2).astype(np.float32)
  want_prior = _np(st.crop_mask_in_target_box(tight, boxes, outer, M))
  np.testing.assert_allclose(_np(prior), want_prior, rtol=1e-4, atol=1e-5)


def test_class_agnostic_prior_head_uses_row_zero():
  prior_head = _heads(use_category=False)[0]
  assert prior_head.shape_priors_shape == (1, K, M, M)
  features, boxes, outer, classes = _inputs()
  _, prior = prior_head(features, boxes, outer, classes)
  # Ids beyond the single row (e.g. 7) are fine: every instance reads row 0.
  _, same = prior_head(features, boxes, outer, np.full((B, N), 7, np.int32))
  np.testing.assert_allclose(_np(same), _np(prior), rtol=1e-6)
  # Zero classifier -> uniform weights -> mean of row 0's priors.
  prior_head.shape_classifier.kernel.assign(
      np.zeros(prior_head.shape_classifier.kernel.shape))
  _, prior = prior_head(features, boxes, outer, classes)
  tight = np.broadcast_to(_np(prior_head.shape_priors)[0].mean(0),
                          (B, N, M, M)).astype(np.float32)
  np.testing.assert_allclose(
      _np(prior), _np(st.crop_mask_in_target_box(tight, boxes, outer, M)),
      rtol=1e-5, atol=1e-6)


def test_class_specific_prior_head_reads_the_class_row():
  prior_head = _heads()[0]
  features, boxes, outer, classes = _inputs()
  prior_head(features, boxes, outer, classes)
  prior_head.shape_classifier.kernel.assign(
      np.zeros(prior_head.shape_classifier.kernel.shape))
  _, prior = prior_head(features, boxes, outer, classes)
  tight = _np(prior_head.shape_priors).mean(1)[classes].astype(np.float32)
  np.testing.assert_allclose(
      _np(prior), _np(st.crop_mask_in_target_box(tight, boxes, outer, M)),
      rtol=1e-5, atol=1e-6)


def test_set_shape_priors_rejects_wrong_shape_naming_both():
  prior_head = _heads()[0]
  with pytest.raises(ValueError) as error:
    prior_head.set_shape_priors(np.zeros((91, 20, 32, 32), np.float32))
  assert "(91, 20, 32, 32)" in str(error.value)
  assert str((C, K, M, M)) in str(error.value)
  # Values given before build are used when the weight is created.
  prior_head.set_shape_priors(np.full((C, K, M, M), 0.25))
  features, boxes, outer, classes = _inputs()
  prior_head(features, boxes, outer, classes)
  assert not prior_head.shape_priors.trainable
  np.testing.assert_allclose(_np(prior_head.shape_priors), 0.25)
  prior_head.set_shape_priors(np.full((C, K, M, M), 0.5))
  np.testing.assert_allclose(_np(prior_head.shape_priors), 0.5)
  with pytest.raises(ValueError, match=r"\(5, 3, 8, 8\)"):
    prior_head.set_shape_priors(np.zeros((C, K + 1, M, M)))


def test_coarse_class_gather_equals_all_channels_then_select():
  heads = _heads()
  features, boxes, outer, classes = _inputs()
  inst, prior, _, _ = _run(heads, (features, boxes, outer, classes))
  coarse_head = heads[1]
  _randomize_class_predictors(coarse_head)
  got = _np(coarse_head(inst, prior, classes, training=False))
  full = coarse_head.class_predict(
      coarse_head.decoder_features(inst, prior, training=False))
  np.testing.assert_allclose(got, _select(full, classes), rtol=1e-4,
                             atol=1e-5)


def test_coarse_prior_embedding_without_convs():
  heads = _heads(num_convs=0)
  inst, prior, _, _ = _run(heads, _inputs())
  coarse_head = heads[1]
  fc = coarse_head.prior_fc
  want = (_np(inst).reshape(-1, M, M, D) +
          _np(prior).reshape(-1, M, M, 1) * _np(fc.kernel)[0, 0] +
          _np(fc.bias))
  np.testing.assert_allclose(
      _np(coarse_head.decoder_features(inst, prior)), want, rtol=1e-5,
      atol=1e-6)


@pytest.mark.parametrize("upsample", [U, 1])
def test_fine_class_gather_equals_upsample_all_channels_then_select(upsample):
  heads = _heads(upsample=upsample)
  features, boxes, outer, classes = _inputs()
  inst, _, coarse, _ = _run(heads, (features, boxes, outer, classes))
  fine_head = heads[2]
  _randomize_class_predictors(fine_head)
  got = _np(fine_head(inst, coarse, classes, training=False))
  assert got.shape == (B, N, M * upsample, M * upsample)
  hidden = fine_head.decoder_features(inst, coarse, training=False)
  if fine_head.upsample is not None:
    hidden = fine_head.upsample(hidden)
  full = fine_head.class_predict(hidden)
  np.testing.assert_allclose(got, _select(full, classes), rtol=1e-4,
                             atol=1e-4)


def test_fine_instance_embedding_without_convs():
  heads = _heads(num_convs=0)
  inst, _, _, _ = _run(heads, _inputs())
  fine_head = heads[2]
  rng = np.random.default_rng(9)
  coarse = rng.normal(size=(B, N, M, M)).astype(np.float32)
  coarse[0, 0] = -5.0  # Empty foreground: embedding 0 thanks to the epsilon.
  p = 1 / (1 + np.exp(-coarse.reshape(-1, M, M)))
  hard = (p > 0.5).astype(np.float32)
  feats = _np(inst).reshape(-1, M, M, D)
  embedding = (feats * hard[..., None]).sum((1, 2)) / (
      hard.sum((1, 2))[:, None] + 1e-20)
  fc = fine_head.prob_fc
  want = (feats - embedding[:, None, None] +
          p[..., None] * _np(fc.kernel)[0, 0] + _np(fc.bias))
  np.testing.assert_allclose(_np(fine_head.decoder_features(inst, coarse)),
                             want, rtol=1e-4, atol=1e-5)


def test_class_agnostic_mask_heads_use_channel_zero():
  heads = _heads(use_category=False)
  features, boxes, outer, classes = _inputs()
  inst, prior, coarse, fine = _run(heads, (features, boxes, outer, classes))
  for head in heads[1:]:
    assert head.class_predict.kernel.shape[-1] == 1
  other = np.full((B, N), 3, np.int32)
  np.testing.assert_allclose(
      _np(heads[1](inst, prior, other)), _np(coarse), rtol=1e-6)
  np.testing.assert_allclose(
      _np(heads[2](inst, coarse, other)), _np(fine), rtol=1e-6)


def test_config_round_trip_with_non_default_values():
  layers = [
      ShapePriorHead(num_classes=7, num_clusters=4, mask_crop_size=16,
                     num_downsample_channels=12, use_category_for_mask=False,
                     name="prior_x"),
      CoarseMaskHead(num_classes=7, mask_crop_size=16, num_convs=3,
                     num_filters=12, use_category_for_mask=False,
                     norm_momentum=0.9, norm_epsilon=1e-3, name="coarse_x"),
      FineMaskHead(num_classes=7, mask_crop_size=16, num_convs=1,
                   num_filters=12, upsample_factor=2,
                   use_category_for_mask=False, norm_momentum=0.8,
                   norm_epsilon=1e-2, name="fine_x"),
  ]
  for layer in layers:
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    revived = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer))
    assert type(revived) is type(layer)
    assert revived.get_config() == config
  prior_clone = ShapePriorHead.from_config(layers[0].get_config())
  assert prior_clone.shape_priors_shape == (1, 4, 16, 16)
  assert layers[2].get_config()["upsample_factor"] == 2
  assert layers[1].get_config()["norm_momentum"] == 0.9


def _loss_labels(seed=0, size=M, upsample=U):
  rng = np.random.default_rng(seed)
  return {
      "mask_targets": (rng.uniform(size=(B, N, size, size)) > 0.5).astype(
          np.float32),
      "fine_mask_targets": (rng.uniform(
          size=(B, N, size * upsample, size * upsample)) > 0.5).astype(
              np.float32),
      "mask_is_valid": np.array([[1, 1, 1], [1, 1, 0]], np.float32),
  }


def test_gradients_are_finite_and_reach_the_shape_classifier():
  import tensorflow as tf
  heads = _heads()
  inputs = _inputs()
  labels = _loss_labels()
  _run(heads, inputs)
  variables = [v for h in heads for v in h.trainable_variables]
  with tf.GradientTape(persistent=True) as tape:
    _, prior, coarse, fine = _run(heads, inputs, training=True)
    coarse_loss = losses.mask_cross_entropy_loss(
        coarse, labels["mask_targets"], labels["mask_is_valid"])
    total = (coarse_loss + losses.mask_cross_entropy_loss(
        fine, labels["fine_mask_targets"], labels["mask_is_valid"]) +
             0.1 * losses.shape_prior_loss(prior, labels["mask_targets"],
                                           labels["mask_is_valid"]))
  grads = tape.gradient(total, variables)
  for variable, grad in zip(variables, grads):
    assert grad is not None, variable.path
    assert np.all(np.isfinite(_np(grad))), variable.path
  classifier = heads[0].shape_classifier.kernel
  coarse_grad = _np(tape.gradient(coarse_loss, classifier))
  assert np.abs(coarse_grad).max() > 0
  assert all(v is not heads[0].shape_priors for v in variables)


def test_mixed_bfloat16_heads():
  heads = _heads(dtype="mixed_bfloat16")
  inst, prior, coarse, fine = _run(heads, _inputs(), training=True)
  assert keras.backend.standardize_dtype(inst.dtype) == "bfloat16"
  assert keras.backend.standardize_dtype(coarse.dtype) == "bfloat16"
  assert keras.backend.standardize_dtype(fine.dtype) == "bfloat16"
  assert keras.backend.standardize_dtype(prior.dtype) == "float32"
  for head in heads:
    for variable in head.weights:
      assert keras.backend.standardize_dtype(variable.dtype) == "float32"
  labels = _loss_labels()
  value = losses.mask_cross_entropy_loss(fine, labels["fine_mask_targets"],
                                         labels["mask_is_valid"])
  assert keras.backend.standardize_dtype(value.dtype) == "float32"
  assert np.isfinite(_np(value))


def test_heads_and_losses_compile_with_xla():
  import tensorflow as tf
  heads = _heads()
  features, boxes, outer, classes = _inputs()
  labels = _loss_labels()
  _run(heads, (features, boxes, outer, classes))
  variables = [v for h in heads for v in h.trainable_variables]
  loss_fn = losses.ShapeMaskLoss()
  rng = np.random.default_rng(0)
  det_labels = {
      "cls_targets": rng.integers(-2, C, size=(B, 20)).astype(np.int32),
      "box_targets": rng.normal(size=(B, 20, 4)).astype(np.float32),
      "num_positives": np.array([3.0, 4.0], np.float32),
      **labels,
  }
  det_outputs = {
      "cls_outputs": rng.normal(size=(B, 20, C)).astype(np.float32),
      "box_outputs": rng.normal(size=(B, 20, 4)).astype(np.float32),
  }

  def step(features, boxes, outer, classes):
    with tf.GradientTape() as tape:
      # Batch statistics: outputs do not depend on the moving averages that
      # the eager call updates.
      _, prior, coarse, fine = _run(heads, (features, boxes, outer, classes),
                                    training=True)
      outputs = dict(det_outputs, prior_masks=prior,
                     coarse_mask_logits=coarse, fine_mask_logits=fine)
      terms = loss_fn(det_labels, outputs)
    grads = tape.gradient(terms["model_loss"], variables)
    return terms["model_loss"], tf.linalg.global_norm(grads), fine

  eager = step(features, boxes, outer, classes)
  compiled = tf.function(step, jit_compile=True)(features, boxes, outer,
                                                   classes)
  for want, got in zip(eager, compiled):
    np.testing.assert_allclose(_np(got), _np(want), rtol=2e-4, atol=1e-4)


_JAX_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    import keras
    from keras import ops
    assert keras.backend.backend() == "jax", keras.backend.backend()
    from official_shapemask import losses
    from official_shapemask.modeling.heads.coarse_mask_head import CoarseMaskHead
    from official_shapemask.modeling.heads.fine_mask_head import FineMaskHead
    from official_shapemask.modeling.heads.shape_prior_head import ShapePriorHead
    from official_shapemask.ops import spatial_transform as st

    B, N, M, K, C, D, U = 2, 3, 8, 3, 5, 8, 2
    rng = np.random.default_rng(0)
    features = {str(l): rng.normal(size=(B, 128 // 2**l, 128 // 2**l, 6))
                .astype("float32") for l in range(3, 8)}
    boxes = np.tile(np.array([20, 30, 70, 60], "float32"), (B, N, 1))
    boxes += rng.uniform(-10, 10, size=(B, N, 1)).astype("float32")
    outer = boxes + np.array([-6, -4, 6, 4], "float32")
    classes = np.array([[1, 4, 2], [3, 0, 1]], "int32")
    # (No keras.utils.set_random_seed: it imports TensorFlow to seed it.)
    prior_head = ShapePriorHead(C, K, mask_crop_size=M,
                                num_downsample_channels=D)
    prior_head.set_shape_priors(rng.uniform(size=(C, K, M, M)))
    coarse_head = CoarseMaskHead(C, mask_crop_size=M, num_convs=2,
                                 num_filters=D)
    fine_head = FineMaskHead(C, mask_crop_size=M, num_convs=2, num_filters=D,
                             upsample_factor=U)
    inst, prior = prior_head(features, boxes, outer, classes)
    coarse = coarse_head(inst, prior, classes)
    fine_head(inst, coarse, classes)
    conv = fine_head.class_predict
    conv.kernel.assign(rng.normal(size=conv.kernel.shape))
    conv.bias.assign(rng.normal(size=conv.bias.shape))
    fine = fine_head(inst, coarse, classes)
    assert tuple(fine.shape) == (B, N, M * U, M * U)
    full = conv(fine_head.upsample(fine_head.decoder_features(inst, coarse)))
    full = np.asarray(full).reshape(B, N, M * U, M * U, C)
    want = np.take_along_axis(full, classes[:, :, None, None, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(fine), want, rtol=1e-4, atol=1e-4)
    # The ones-mask golden check under JAX too.
    sq = np.asarray(st.crop_mask_in_target_box(
        np.ones((1, 1, 32, 32), "float32"),
        np.array([[[100, 100, 200, 200]]], "float32"),
        np.array([[[87.5, 87.5, 212.5, 212.5]]], "float32")))
    assert abs(float(sq.sum()) - 25.75 ** 2) < 1e-2, sq.sum()

    labels = {
        "cls_targets": rng.integers(-2, C, size=(B, 20)).astype("int32"),
        "box_targets": rng.normal(size=(B, 20, 4)).astype("float32"),
        "num_positives": np.array([3.0, 4.0], "float32"),
        "mask_targets": (rng.uniform(size=(B, N, M, M)) > .5).astype("float32"),
        "fine_mask_targets": (rng.uniform(
            size=(B, N, M * U, M * U)) > .5).astype("float32"),
        "mask_is_valid": np.ones((B, N), "float32"),
    }
    det = {"cls_outputs": rng.normal(size=(B, 20, C)).astype("float32"),
           "box_outputs": rng.normal(size=(B, 20, 4)).astype("float32")}
    loss_fn = losses.ShapeMaskLoss()
    heads = (prior_head, coarse_head, fine_head)

    def loss(trainable, non_trainable):
      (inst, prior), ntv0 = prior_head.stateless_call(
          trainable[0], non_trainable[0], features, boxes, outer, classes,
          training=True)
      coarse, ntv1 = coarse_head.stateless_call(
          trainable[1], non_trainable[1], inst, prior, classes, training=True)
      fine, ntv2 = fine_head.stateless_call(
          trainable[2], non_trainable[2], inst, coarse, classes, training=True)
      outputs = dict(det, prior_masks=prior, coarse_mask_logits=coarse,
                     fine_mask_logits=fine)
      terms = loss_fn(labels, outputs)
      l2 = losses.l2_regularization_loss(
          [v for tv in trainable for v in tv])
      return terms["model_loss"] + l2, terms

    trainable = [[v.value for v in h.trainable_variables] for h in heads]
    non_trainable = [[v.value for v in h.non_trainable_variables]
                     for h in heads]
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (total, terms), grads = grad_fn(trainable, non_trainable)
    assert np.isfinite(float(total)), total
    for g in jax.tree_util.tree_leaves(grads):
      assert np.all(np.isfinite(np.asarray(g)))
    names = [v.path for v in prior_head.trainable_variables]
    classifier = grads[0][names.index(
        prior_head.shape_classifier.kernel.path)]
    assert float(np.abs(np.asarray(classifier)).max()) > 0
    for key in ("cls_loss", "box_loss", "prior_loss", "coarse_loss",
                "fine_loss", "model_loss"):
      assert terms[key].dtype == np.float32 and np.isfinite(float(terms[key]))
    assert "tensorflow" not in sys.modules, "model code imported tensorflow"
    print("JAX_OK", float(total))
""")


def test_heads_and_losses_run_under_jax_backend(run_under_jax):
  result = run_under_jax(_JAX_SCRIPT, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "JAX_OK" in result.stdout
