r"""Runs the seed's TF1 ShapeMask code once and writes what the tests compare.

  TF_USE_LEGACY_KERAS=1 python tests/reference/tf1_oracle.py \
      --reference=../shared/reference/tpu_detection --output_dir=/tmp/oracle

Run it in its own process: `TF_USE_LEGACY_KERAS=1` switches `tf.keras` to
Keras 2 for the whole process, which the TF1 layers need. It imports the
reference from `--reference` (`../shared/reference/tpu_detection`, see its
SOURCE.md); nothing of it is copied here.

What it builds: the reference ShapeMask (ResNet-50-FPN, levels 3-7,
`--image_size` px, 91 classes, the shape-prior / coarse / fine heads) in
inference mode, with every variable set to random values: kernels scaled by
1/sqrt(fan-in), biases, batch-norm gamma/beta and moving statistics all
random, and the predictors (RetinaNet class/box, prior classifier, coarse
and fine class columns) informative rather than the reference's
near-constant initialisation, so that a wrong mapping shows in every output.

What it writes to `--output_dir`:
- `whole/model.ckpt-7*`: a whole-model TF1 checkpoint (the reference's graph
  names, `resnet50/...`, `fpn/...`, `retinanet/...`, `prior_mask/...`,
  `coarse_mask/...`, `fine_mask/...`), plus `global_step` and Momentum slots
  of the non-backbone variables, as a TF1 training run writes them;
- `imagenet/model.ckpt-*`: an ImageNet-style backbone file: the backbone's
  variables under root-level names (`conv2d/kernel`,
  `batch_normalization_7/moving_variance`, ...), a `dense/*` classifier,
  `global_step` and Momentum slots of every trainable variable;
- `priors.npy`: the `[91, K, 32, 32]` shape priors the prior head read;
- `outputs.npz`: the fixed inputs (images, boxes, outer boxes, classes) and
  the reference's outputs: `C2`..`C5`, `P3`..`P7`, `cls_<l>` / `box_<l>`
  per level, `prior_masks`, `coarse_mask_logits`, `fine_mask_logits`;
- `losses.npz`: fixed targets (per level) and the reference's loss terms on
  the outputs above;
- `detections.npz`: fixed per-level head outputs (`DETECTION_CLASSES`
  class slots) and the reference's detection generator results on them;
- `saved_model/`: a TF1 SavedModel (`saved_model.pb`, `variables/`) of the
  graph with the model's variables;
- `variables.json`: name -> shape of every variable of the graph;
- `training.json`: the model's trainable variables (`trainable`, graph
  names) and the reference's `train.frozen_variable_prefix` for ShapeMask
  (which of them a training run keeps frozen);
- `done`: written last.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top

BATCH = 2
NUM_CLASSES = 91
NUM_INSTANCES = 8
NUM_CLUSTERS = 20
MIN_LEVEL, MAX_LEVEL = 3, 7
# The reference's detection generator unrolls one NMS per image and class,
# which takes minutes for 91 classes on a CPU; its inputs here have 11.
DETECTION_CLASSES = 11
ANCHORS_PER_LOCATION = 9


def _args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference", required=True,
                      help="the tpu_detection folder (SOURCE.md inside)")
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--image_size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=11)
  return parser.parse_args()


def _fixed_boxes(rng, size):
  """Tight boxes of varied sizes and their 1.25x outer boxes, clipped."""
  side = rng.uniform(0.15, 0.95, (BATCH, NUM_INSTANCES, 2)) * size
  centre = rng.uniform(0.3, 0.7, (BATCH, NUM_INSTANCES, 2)) * size
  lo = np.clip(centre - side / 2, 0, size - 1)
  hi = np.clip(centre + side / 2, 0, size - 1)
  boxes = np.concatenate([lo, hi], -1)
  outer_side = (hi - lo) * 1.25
  mid = (hi + lo) / 2
  outer = np.concatenate([np.clip(mid - outer_side / 2, 0, size - 1),
                          np.clip(mid + outer_side / 2, 0, size - 1)], -1)
  return boxes.astype(np.float32), outer.astype(np.float32)


def _random_value(name, shape, rng):
  """Random values for one variable, keeping activations O(1)."""
  short = name.split("/")[-1]
  if short in ("kernel", "depthwise_kernel"):
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if "conv2d_transpose" in name:  # [h, w, out, in]
      fan_in = int(shape[-1])
    scale = 1.0
    if name.endswith("box-predict/kernel"):
      scale = 0.3
    elif "/dense_1/" in name:  # Shape-mode classifier: a peaked softmax.
      scale = 3.0
    return rng.normal(0.0, scale / np.sqrt(fan_in), shape)
  if short == "bias":
    mean = -1.0 if name.endswith("class_net/class-predict/bias") else 0.0
    return rng.normal(mean, 0.3, shape)
  if short in ("gamma", "moving_variance"):
    return rng.uniform(0.5, 1.5, shape)
  if short in ("beta", "moving_mean"):
    return rng.normal(0.0, 0.1, shape)
  raise ValueError(f"no random rule for variable {name}")


_START = time.time()


def _log(message):
  print(f"tf1_oracle [{time.time() - _START:6.1f} s] {message}",
        file=sys.stderr, flush=True)


def main():
  args = _args()
  ref = os.path.abspath(args.reference)
  sys.path[:0] = [os.path.join(ref, "detection"), ref]
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  tf.disable_v2_behavior()
  # pylint: disable=g-import-not-at-top
  from configs import shapemask_config
  from dataloader import anchor
  from hyperparameters import params_dict
  from modeling import losses
  from modeling.architecture import fpn, heads, nn_ops, resnet
  from ops import postprocess_ops
  # pylint: enable=g-import-not-at-top

  out = args.output_dir
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  size = args.image_size
  params = params_dict.ParamsDict(shapemask_config.SHAPEMASK_CFG,
                                  shapemask_config.SHAPEMASK_RESTRICTIONS)
  prior_path = os.path.join(out, "priors.npy")
  np.save(prior_path, rng.uniform(
      0, 1, (NUM_CLASSES, NUM_CLUSTERS, 32, 32)).astype(np.float32))

  images = rng.normal(0, 1, (BATCH, size, size, 3)).astype(np.float32)
  boxes, outer = _fixed_boxes(rng, size)
  classes = rng.integers(1, NUM_CLASSES, (BATCH, NUM_INSTANCES)).astype(
      np.int32)
  classes[1, -1] = 0  # A padded slot.

  graph = tf.Graph()
  with graph.as_default():
    bna = nn_ops.BatchNormActivation()
    feats = resnet.Resnet(resnet_depth=50, batch_norm_activation=bna)(
        tf.constant(images), is_training=False)
    pyramid = fpn.Fpn(MIN_LEVEL, MAX_LEVEL, 256, batch_norm_activation=bna)(
        feats, is_training=False)
    cls, box = heads.RetinanetHead(
        MIN_LEVEL, MAX_LEVEL, NUM_CLASSES, ANCHORS_PER_LOCATION, 4, 256,
        batch_norm_activation=bna)(pyramid, is_training=False)
    inst, prior = heads.ShapemaskPriorHead(
        NUM_CLASSES, 128, 32, True, prior_path, bna)(
            pyramid, tf.constant(boxes), tf.constant(outer),
            tf.constant(classes), False)
    coarse = heads.ShapemaskCoarsemaskHead(
        NUM_CLASSES, 128, 32, True, 4, bna)(inst, prior, tf.constant(classes),
                                            False)
    fine = heads.ShapemaskFinemaskHead(
        NUM_CLASSES, 128, 32, True, 4, 4, bna)(inst, coarse,
                                               tf.constant(classes), False)
    _log("model graph built")
    model_vars = list(tf.global_variables())
    trainable_names = [v.op.name for v in tf.trainable_variables()]
    # What a TF1 training run adds to its checkpoints.
    global_step = tf.train.get_or_create_global_step()
    backbone_vars = [v for v in model_vars
                     if v.op.name.startswith("resnet50/")]
    dense_kernel = tf.Variable(
        rng.normal(0, 0.02, (2048, 1000)).astype(np.float32),
        name="imagenet/dense/kernel")
    dense_bias = tf.Variable(np.zeros(1000, np.float32),
                             name="imagenet/dense/bias")
    trainable = [v for v in model_vars
                 if not v.op.name.split("/")[-1].startswith("moving_")]
    slots = {v.op.name: tf.Variable(
        tf.zeros(v.shape), name=v.op.name + "/Momentum") for v in trainable}
    dense_slots = [tf.Variable(tf.zeros(v.shape), name="imagenet_slot")
                   for v in (dense_kernel, dense_bias)]

    # Losses on the outputs above, for fixed targets.
    targets = {"num_positives": np.array([12.0, 7.0], np.float32)}
    cls_targets, box_targets = {}, {}
    for level in range(MIN_LEVEL, MAX_LEVEL + 1):
      h = w = size // 2**level
      labels = rng.choice([-2, -1, 0, 5, 17, 90], (BATCH, h, w, 9),
                          p=[0.05, 0.75, 0.05, 0.05, 0.05, 0.05])
      cls_targets[level] = labels.astype(np.int32)
      deltas = rng.normal(0, 0.2, (BATCH, h, w, 9, 4))
      deltas[labels <= 0] = 0.0
      box_targets[level] = deltas.reshape(BATCH, h, w, 36).astype(np.float32)
    targets["mask_targets"] = (rng.uniform(0, 1, (BATCH, NUM_INSTANCES, 32,
                                                  32)) > 0.6).astype(
                                                      np.float32)
    targets["fine_mask_targets"] = (rng.uniform(
        0, 1, (BATCH, NUM_INSTANCES, 128, 128)) > 0.6).astype(np.float32)
    valid = np.ones((BATCH, NUM_INSTANCES), np.float32)
    valid[1, -2:] = 0.0
    targets["mask_is_valid"] = valid
    loss_params = params.retinanet_loss
    terms = {
        "cls_loss": losses.RetinanetClassLoss(loss_params, NUM_CLASSES)(
            cls, {k: tf.constant(v) for k, v in cls_targets.items()},
            tf.constant(targets["num_positives"])),
        "box_loss": losses.RetinanetBoxLoss(loss_params)(
            box, {k: tf.constant(v) for k, v in box_targets.items()},
            tf.constant(targets["num_positives"])),
        "prior_loss": losses.ShapemaskMseLoss()(
            prior, tf.constant(targets["mask_targets"]), tf.constant(valid)),
        "coarse_loss": losses.ShapemaskLoss()(
            coarse, tf.constant(targets["mask_targets"]), tf.constant(valid)),
        "fine_loss": losses.ShapemaskLoss()(
            fine, tf.constant(targets["fine_mask_targets"]),
            tf.constant(valid)),
    }
    weights = params.shapemask_loss
    terms["model_loss"] = (
        terms["cls_loss"] + loss_params.box_loss_weight * terms["box_loss"] +
        weights.shape_prior_loss_weight * terms["prior_loss"] +
        weights.coarse_mask_loss_weight * terms["coarse_loss"] +
        weights.fine_mask_loss_weight * terms["fine_loss"])

    # Detections on fixed head outputs.
    det_cls, det_box = {}, {}
    for level in range(MIN_LEVEL, MAX_LEVEL + 1):
      h = w = size // 2**level
      det_cls[level] = rng.normal(
          -4.0, 1.5, (BATCH, h, w, 9 * DETECTION_CLASSES)).astype(np.float32)
      det_cls[level][1] -= 3.0  # Image 1: fewer than 100 detections.
      det_box[level] = rng.normal(0, 0.3, (BATCH, h, w, 36)).astype(
          np.float32)
    anchors = anchor.Anchor(MIN_LEVEL, MAX_LEVEL, 3, [1.0, 2.0, 0.5], 4.0,
                            [size, size]).multilevel_boxes
    anchors = {k: tf.tile(v[None], [BATCH, 1, 1]) for k, v in anchors.items()}
    detections = postprocess_ops.MultilevelDetectionGenerator(
        MIN_LEVEL, MAX_LEVEL, params.postprocess)(
            {k: tf.constant(v) for k, v in det_box.items()},
            {k: tf.constant(v) for k, v in det_cls.items()}, anchors,
            tf.constant([[[size, size]]] * BATCH, tf.float32))

    # One op assigns every random value (a session run per variable would
    # take minutes on a big graph).
    random_values = {v: _random_value(v.op.name, v.shape.as_list(), rng)
                     for v in model_vars}
    feeds = {v: tf.placeholder(tf.float32, v.shape) for v in model_vars}
    assign_all = tf.group(*[tf.assign(v, feeds[v]) for v in model_vars])
    _log("loss and detection graphs built")
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      sess.run(assign_all, {feeds[v]: value.astype(np.float32)
                            for v, value in random_values.items()})
      global_step.load(45000, sess)
      _log("random values assigned")

      fetch = {"C%d" % l: feats[l] for l in (2, 3, 4, 5)}
      fetch.update({"P%d" % l: pyramid[l]
                    for l in range(MIN_LEVEL, MAX_LEVEL + 1)})
      fetch.update({"cls_%d" % l: cls[l]
                    for l in range(MIN_LEVEL, MAX_LEVEL + 1)})
      fetch.update({"box_%d" % l: box[l]
                    for l in range(MIN_LEVEL, MAX_LEVEL + 1)})
      fetch.update(prior_masks=prior, coarse_mask_logits=coarse,
                   fine_mask_logits=fine)
      results, loss_values = sess.run((fetch, terms))
      _log("forward pass and losses run")
      det_values = sess.run(detections)
      _log("detections run")

      # Whole model: the graph's names, global_step, slots outside the
      # backbone.
      whole = {v.op.name: v for v in model_vars}
      whole["global_step"] = global_step
      whole.update({name + "/Momentum": slot for name, slot in slots.items()
                    if not name.startswith("resnet50/")})
      tf.train.Saver(whole).save(sess, os.path.join(out, "whole", "model.ckpt"),
                                 global_step=7, write_meta_graph=False)
      # ImageNet style: root-level backbone names, classifier, slots.
      strip = len("resnet50/")
      imagenet = {v.op.name[strip:]: v for v in backbone_vars}
      imagenet.update({
          "dense/kernel": dense_kernel, "dense/bias": dense_bias,
          "dense/kernel/Momentum": dense_slots[0],
          "dense/bias/Momentum": dense_slots[1],
          "global_step": global_step})
      imagenet.update({name[strip:] + "/Momentum": slot
                       for name, slot in slots.items()
                       if name.startswith("resnet50/")})
      tf.train.Saver(imagenet).save(
          sess, os.path.join(out, "imagenet", "model.ckpt"),
          global_step=112603, write_meta_graph=False)
      # A TF1 SavedModel holding the model's variables.
      builder = tf.saved_model.builder.SavedModelBuilder(
          os.path.join(out, "saved_model"))
      builder.add_meta_graph_and_variables(
          sess, [tf.saved_model.tag_constants.SERVING],
          saver=tf.train.Saver(model_vars))
      builder.save()

  np.savez(os.path.join(out, "outputs.npz"), images=images, boxes=boxes,
           outer_boxes=outer, classes=classes, **results)
  flat_targets = dict(targets)
  flat_targets.update({"cls_targets_%d" % k: v for k, v in cls_targets.items()})
  flat_targets.update({"box_targets_%d" % k: v for k, v in box_targets.items()})
  np.savez(os.path.join(out, "losses.npz"), **flat_targets,
           **{"ref_" + k: np.float32(v) for k, v in loss_values.items()})
  det = {"cls_%d" % k: v for k, v in det_cls.items()}
  det.update({"box_%d" % k: v for k, v in det_box.items()})
  det.update({"ref_" + k: v for k, v in det_values.items()})
  np.savez(os.path.join(out, "detections.npz"), **det)
  with open(os.path.join(out, "variables.json"), "w") as f:
    json.dump({v.op.name: v.shape.as_list() for v in model_vars}, f, indent=0)
  with open(os.path.join(out, "training.json"), "w") as f:
    json.dump({"trainable": trainable_names,
               "frozen_variable_prefix": params.train.frozen_variable_prefix},
              f, indent=0)
  _log("checkpoints and outputs written")
  with open(os.path.join(out, "done"), "w") as f:
    f.write(f"image_size={size} seed={args.seed}\n")


if __name__ == "__main__":
  main()
