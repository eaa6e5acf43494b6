"""Weights of tf-models-official's legacy ShapeMask -> our `ShapeMaskModel`.

The port (`official/legacy/detection`, Keras 2) names its layers as follows
(see `legacy_shapemask`):

| port layer | ours |
| --- | --- |
| `conv2d[_i]`, `batch_normalization[_i]` (anonymous, in creation order: stem, then per block the projection shortcut, conv1, conv2[, conv3]) | `backbone.stem`, `backbone.groups[g][b].{shortcut, convs[i]}` `.conv` / `.bn` |
| `l{l}`, `post_hoc_d{l}`, `p{l}` (extra levels), `p{l}-bn` | `decoder.lateral`, `post_hoc`, `coarse`, `norms` |
| `class-{i}`, `class-{i}-{l}`, `class-predict`, same with `box` | `head.class_convs[i]`, `class_norms['i-l']`, `class_predict`, ... |
| `shape-prior-fc` (Dense `[C, D]`) | `prior_head.shape_prior_fc` (1x1 conv `[1, 1, C, D]`) |
| `classify-shape-prior-fc` | `prior_head.shape_classifier` |
| `coarse-mask-fc` (Dense `[1, D]`) | `coarse_head.prior_fc` (1x1 conv) |
| `coarse-mask-class-{i}`, `coarse-mask-class-{i}-bn`, `coarse-mask-class-predict` | `coarse_head.convs[i]`, `norms[i]`, `class_predict` |
| `fine-mask-fc`, `fine-mask-class-{i}[-bn]`, `fine-mask-conv2d-tran`, `fine-mask-class-predict` | `fine_head.prob_fc`, `convs[i]`, `norms[i]`, `upsample`, `class_predict` |

The shape priors are not variables of the port (it reads its `.npy` when it
builds); `convert_weights` takes them as an argument.

The port's differences in behaviour (reference section 12) are not weights and
do not change the conversion: it returns raw fine logits as
`detection_masks` (ours: sigmoid probabilities).
"""

import dataclasses
import re

import numpy as np

from official_shapemask.weights import paths
from official_shapemask.weights import tf1_names

_ANONYMOUS = re.compile(r"^(conv2d|batch_normalization)(?:_(\d+))?$")


@dataclasses.dataclass
class ConversionReport:
  """One row per converted variable: (port variable, our variable, shape)."""
  rows: list

  def table(self):
    width = max([len(r[0]) for r in self.rows] + [13])
    lines = [f"{'port variable':<{width}}  {'our variable':<60}  shape"]
    lines += [f"{a:<{width}}  {b:<60}  {tuple(c)}" for a, b, c in self.rows]
    lines.append(f"{len(self.rows)} variables converted")
    return "\n".join(lines)


def _weights_by_layer(legacy_model):
  """`{layer name: {'kernel': array, ...}}` of every port layer with weights."""
  out = {}
  for layer in legacy_model.layers:
    if not layer.weights:
      continue
    if layer.name in out:
      raise ValueError(f"port model has two layers named {layer.name!r}")
    values = {}
    for weight in layer.weights:
      short = weight.name.split("/")[-1].split(":")[0]
      values[short] = (weight.name.split(":")[0], weight.numpy())
    out[layer.name] = values
  return out


def _anonymous_in_order(layers, prefix):
  """Names of the auto-named port layers `prefix[_i]`, creation order."""
  found = []
  for name in layers:
    match = _ANONYMOUS.match(name)
    if match and match.group(1) == prefix:
      found.append((int(match.group(2) or 0), name))
  return [name for _, name in sorted(found)]


def layer_pairs(model, legacy_layer_names):
  """`[(port layer name, our layer, kind)]` for every layer with weights.

  `kind` is 'conv', 'dense', 'dense_to_conv' (Dense kernel `[i, o]` ->
  1x1 conv `[1, 1, i, o]`) or 'bn'.
  """
  pairs = []
  # The port creates the backbone's layers in the TF1 code's order.
  conv_bns = tf1_names.backbone_conv_norms(model.backbone)
  port_convs = _anonymous_in_order(legacy_layer_names, "conv2d")
  port_bns = _anonymous_in_order(legacy_layer_names, "batch_normalization")
  if len(port_convs) != len(conv_bns) or len(port_bns) != len(conv_bns):
    raise ValueError(
        f"backbone depth differs: the port has {len(port_convs)} convolutions"
        f" and {len(port_bns)} batch norms, our ResNet-"
        f"{model.backbone.get_config()['depth']} has {len(conv_bns)}")
  for conv_bn, conv_name, bn_name in zip(conv_bns, port_convs, port_bns):
    pairs.append((conv_name, conv_bn.conv, "conv"))
    pairs.append((bn_name, conv_bn.bn, "bn"))

  decoder = model.decoder
  for key, layer in decoder.lateral.items():
    pairs.append((f"l{key}", layer, "conv"))
  for key, layer in decoder.post_hoc.items():
    pairs.append((f"post_hoc_d{key}", layer, "conv"))
  for key, layer in decoder.coarse.items():
    pairs.append((f"p{key}", layer, "conv"))
  for key, layer in decoder.norms.items():
    pairs.append((f"p{key}-bn", layer, "bn"))

  head = model.head
  for prefix, convs, norms, predict in (
      ("class", head.class_convs, head.class_norms, head.class_predict),
      ("box", head.box_convs, head.box_norms, head.box_predict)):
    for i, conv in enumerate(convs):
      pairs.append((f"{prefix}-{i}", conv, "conv"))
    for key, norm in norms.items():
      pairs.append((f"{prefix}-{key}", norm, "bn"))
    pairs.append((f"{prefix}-predict", predict, "conv"))

  prior = model.prior_head
  pairs.append(("shape-prior-fc", prior.shape_prior_fc, "dense_to_conv"))
  pairs.append(("classify-shape-prior-fc", prior.shape_classifier, "dense"))
  coarse = model.coarse_head
  pairs.append(("coarse-mask-fc", coarse.prior_fc, "dense_to_conv"))
  for i, (conv, norm) in enumerate(zip(coarse.convs, coarse.norms)):
    pairs.append((f"coarse-mask-class-{i}", conv, "conv"))
    pairs.append((f"coarse-mask-class-{i}-bn", norm, "bn"))
  pairs.append(("coarse-mask-class-predict", coarse.class_predict, "conv"))
  fine = model.fine_head
  pairs.append(("fine-mask-fc", fine.prob_fc, "dense_to_conv"))
  for i, (conv, norm) in enumerate(zip(fine.convs, fine.norms)):
    pairs.append((f"fine-mask-class-{i}", conv, "conv"))
    pairs.append((f"fine-mask-class-{i}-bn", norm, "bn"))
  if fine.upsample is not None:
    pairs.append(("fine-mask-conv2d-tran", fine.upsample, "conv"))
  pairs.append(("fine-mask-class-predict", fine.class_predict, "conv"))
  return pairs


def _targets(layer, kind):
  """`{port weight short name: our variable}` of one layer."""
  if kind == "bn":
    return {"gamma": layer.gamma, "beta": layer.beta,
            "moving_mean": layer.moving_mean,
            "moving_variance": layer.moving_variance}
  out = {"kernel": layer.kernel}
  if getattr(layer, "bias", None) is not None:
    out["bias"] = layer.bias
  return out


def convert_weights(legacy_model, model, priors=None):
  """Copies every weight of the port's model into ours.

  Args:
    legacy_model: the port's built `tf_keras` model (any mode).
    model: our built `ShapeMaskModel` with the same settings
      (`legacy_shapemask.model_kwargs_from_params`).
    priors: `[C_mask, K, m, m]` shape priors the port used (None = keep
      ours).

  Returns:
    a `ConversionReport`.

  Raises:
    ValueError: naming the layer, for a missing layer, a shape mismatch, or
      a port weight / our variable left unconverted.
  """
  port = _weights_by_layer(legacy_model)
  rows, used_layers, assigned = [], set(), set()
  for name, layer, kind in layer_pairs(model, list(port)):
    if name not in port:
      raise ValueError(
          f"the port model has no layer {name!r} (for our {layer.path}); is "
          "it a ShapeMask model with the same levels and convs?")
    used_layers.add(name)
    values = port[name]
    targets = _targets(layer, kind)
    if set(values) != set(targets):
      raise ValueError(
          f"port layer {name!r} has weights {sorted(values)}, our "
          f"{layer.path} has {sorted(targets)}")
    for short, variable in targets.items():
      full_name, value = values[short]
      if kind == "dense_to_conv" and short == "kernel":
        value = value.reshape((1, 1) + value.shape)
      if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(
            f"shape mismatch: port {full_name} {tuple(value.shape)} vs our "
            f"{variable.path} {tuple(variable.shape)}")
      variable.assign(value.astype(np.float32))
      assigned.add(id(variable))
      rows.append((full_name, variable.path, tuple(variable.shape)))
  left = sorted(set(port) - used_layers)
  if left:
    raise ValueError(f"port layers not converted: {left}")
  if priors is not None:
    model.prior_head.set_shape_priors(priors)
    variable = model.prior_head.shape_priors
    assigned.add(id(variable))
    rows.append(("(shape_prior_path .npy)", variable.path,
                 tuple(variable.shape)))
  missing = [v.path for v in model.weights
             if id(v) not in assigned and not v.path.endswith("shape_priors")]
  if missing:
    raise ValueError(f"our variables left unconverted: {missing}")
  return ConversionReport(rows=rows)


def restore_legacy_checkpoint(legacy_model, checkpoint_path):
  """Restores a checkpoint of the port's executor into its model.

  The executor writes `tf.train.Checkpoint(model=..., optimizer=...)`; the
  optimizer slots are ignored, every model variable must be found.

  Args:
    legacy_model: the port's model built from the run's params.
    checkpoint_path: checkpoint prefix or the model directory.

  Returns:
    the checkpoint prefix used.
  """
  import tensorflow as tf
  path = paths.resolve_checkpoint(checkpoint_path)
  status = tf.train.Checkpoint(model=legacy_model).restore(path)
  status.expect_partial()
  status.assert_existing_objects_matched()
  return path


def relative_error(ours, theirs):
  """``||ours - theirs|| / ||theirs||`` in float64 (inf when NaN appears)."""
  a = np.asarray(ours, np.float64)
  b = np.asarray(theirs, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"shapes differ: ours {a.shape}, port {b.shape}")
  if not (np.isfinite(a).all() and np.isfinite(b).all()):
    return float("inf")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _flat_head_outputs(per_level, min_level, max_level, last_dim):
  """Port per-level `[B, H, W, A * k]` -> `[B, sum H*W*A, k]`."""
  flat = []
  for level in range(min_level, max_level + 1):
    x = np.asarray(per_level[level])
    flat.append(x.reshape(x.shape[0], -1, last_dim))
  return np.concatenate(flat, axis=1)


def parity_report(legacy_model, model, images):
  """Runs the port's inference model and ours on the same images.

  Compares, in inference mode (batch-norm moving statistics):
  backbone C_min..C5 (the FPN's inputs), FPN P_min..P_max, RetinaNet class
  and box outputs, and the mask branch (prior, coarse logits, fine logits)
  run by both on the port's detections (its boxes, outer boxes and classes).
  Also compares our detections with the port's, and `detection_masks`:
  ours are probabilities, the port's raw fine logits (reference section 12),
  so the port's go through a sigmoid first.

  Args:
    legacy_model: the port's model built in 'predict' mode.
    model: our converted model.
    images: float32 `[B, S, S, 3]`.

  Returns:
    dict name -> relative error (see `relative_error`); `fine_mask_logits`
    covers the instances whose hard coarse masks agree and
    `fine_mask_threshold_sensitive_instances` counts the others. Also
    `num_port_detections` and `detections_matched`, the fraction of the
    port's valid detections that ours reproduce (same slot, same class, box
    within 1e-3 px).
  """
  import tensorflow as tf
  import tf_keras
  from keras import ops

  images = np.asarray(images, np.float32)
  batch, size = images.shape[0], images.shape[1]
  image_info = np.tile(
      np.array([[size, size], [size, size], [1.0, 1.0], [0.0, 0.0]],
               np.float32), (batch, 1, 1))
  cfg = model.decoder.get_config()
  min_level, max_level = cfg["min_level"], cfg["max_level"]
  top = cfg["backbone_max_level"]
  probes = {}
  for level in range(min_level, top + 1):
    probes[f"C{level}"] = legacy_model.get_layer(f"l{level}").input
  for level in range(min_level, max_level + 1):
    probes[f"P{level}"] = legacy_model.get_layer(f"p{level}-bn").output
  probe_model = tf_keras.Model(legacy_model.inputs, probes)
  port_inputs = {"image": tf.constant(images),
                 "image_info": tf.constant(image_info)}
  port_feats = {k: v.numpy() for k, v in
                probe_model(port_inputs, training=False).items()}
  port = legacy_model(port_inputs, training=False)

  out = {}
  backbone = model.backbone(images, training=False)
  fpn = model.decoder(backbone, training=False)
  for level in range(min_level, top + 1):
    out[f"backbone_C{level}"] = relative_error(
        ops.convert_to_numpy(backbone[str(level)]), port_feats[f"C{level}"])
  for level in range(min_level, max_level + 1):
    out[f"fpn_P{level}"] = relative_error(
        ops.convert_to_numpy(fpn[str(level)]), port_feats[f"P{level}"])
  cls, box = model.head(fpn, training=False)
  out["retinanet_class_outputs"] = relative_error(
      ops.convert_to_numpy(cls),
      _flat_head_outputs(port["cls_outputs"], min_level, max_level,
                         cls.shape[-1]))
  out["retinanet_box_outputs"] = relative_error(
      ops.convert_to_numpy(box),
      _flat_head_outputs(port["box_outputs"], min_level, max_level, 4))

  boxes = port["detection_boxes"].numpy()
  outer = port["detection_outer_boxes"].numpy()
  classes = port["detection_classes"].numpy().astype(np.int32)
  prior, coarse, fine = model._mask_branch(  # pylint: disable=protected-access
      fpn, boxes, outer, classes, training=False)
  out["prior_masks"] = relative_error(ops.convert_to_numpy(prior),
                                      port["prior_masks"].numpy())
  port_coarse = port["coarse_mask_logits"].numpy()
  coarse = ops.convert_to_numpy(coarse)
  out["coarse_mask_logits"] = relative_error(coarse, port_coarse)
  # The fine head thresholds sigmoid(coarse) at 0.5: a coarse logit within
  # rounding of 0 can land on the other side in the other model, which
  # flips a pixel of the hard mask and moves that instance's embedding.
  # Instances whose hard masks differ are counted, not compared.
  stable = np.all((coarse > 0) == (port_coarse > 0), axis=(2, 3))
  out["fine_mask_logits"] = relative_error(
      ops.convert_to_numpy(fine)[stable],
      port["fine_mask_logits"].numpy()[stable])
  out["fine_mask_threshold_sensitive_instances"] = int((~stable).sum())

  ours = model({"images": images, "image_info": image_info}, training=False)
  ours = {k: ops.convert_to_numpy(v) for k, v in ours.items()}
  port_num = port["num_detections"].numpy()
  matched, total = np.zeros(boxes.shape[:2], bool), 0
  for b in range(batch):
    n = int(port_num[b])
    total += n
    matched[b, :n] = (
        (ours["detection_classes"][b, :n] == classes[b, :n]) &
        (np.abs(ours["detection_boxes"][b, :n] - boxes[b, :n]).max(-1) <
         1e-3))
  out["num_port_detections"] = int(total)
  out["detections_matched"] = float(matched.sum() / max(total, 1))
  if matched.any():
    port_probs = 1.0 / (1.0 + np.exp(-port["detection_masks"].numpy()))
    out["detection_masks_vs_sigmoid_port"] = relative_error(
        ours["detection_masks"][matched], port_probs[matched])
  return out
