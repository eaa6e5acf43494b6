r"""Trains the seed's TF1 ShapeMask for a few steps and writes what it did.

  TF_USE_LEGACY_KERAS=1 python tests/reference/tf1_train_oracle.py \
      --reference=../shared/reference/tpu_detection --work_dir=/tmp/train

Run it in its own process (`TF_USE_LEGACY_KERAS=1` switches `tf.keras` to
Keras 2 for the whole process). The model, losses, learning rate and BN
updates are the reference's own modules, imported from `--reference`
(`../shared/reference/tpu_detection`, see its SOURCE.md). Its
`modeling/base_model.py` cannot be imported under TF 2.20 (it imports
`tf.estimator`), so the few lines of its `train` glue that decide what a
step does are mirrored in `_train_op` below: the trainable list filtered by
`frozen_variable_prefix`, the L2 list filtered by
`regularization_variable_regex` (both with `re.match` on `v.name`, as its
`filter_variables` does), `l2_weight_decay * sum(tf.nn.l2_loss(v))`, the
learning rate of `learning_rates.learning_rate_generator` on the global
step, `tf.train.MomentumOptimizer(lr, momentum)` (its `OptimizerFactory`
for type 'momentum') and `apply_gradients` under the `UPDATE_OPS` control
dependency (no gradient clipping: the shapemask config's
`gradient_clip_norm` is 0, checked); `model_loss` is
`shapemask_model.build_losses`' weighted sum.

Reads `--work_dir`/`config.json` (sizes, schedule, steps, regularization;
see `tests/training/test_tf1_training_parity.py`), `priors.npy` and
`batches.npz` (batches in the reference's label layout: per level
`cls_targets_<l>` `[K, B, H, W, A]` and `box_targets_<l>` `[K, B, H, W, 4A]`,
the rest `[K, B, ...]`; step i feeds batch `i % K`).

Writes into `--work_dir`:
- `initial/model.ckpt-0*`: the model's variables before the first step
  (the reference's own initialisers), a whole-model TF1 checkpoint;
- `final.npz`: every model variable after the last step, by graph name;
- `steps.json`: per step, the learning rate and the loss terms of the
  forward pass the step differentiated (`cls_loss`, `box_loss`,
  `prior_loss`, `coarse_loss`, `fine_loss`, `model_loss`, `l2_loss`,
  `total_loss`), plus `trainable` / `regularized` / `frozen` name lists;
- `frozen_resnet<D>.json` for each `config["frozen_check_depths"]`: the
  trainable variables of the reference's ResNet-D that the shapemask
  config's `frozen_variable_prefix` freezes, and all its trainable ones;
- `done`: written last.
"""

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # pylint: disable=g-import-not-at-top

_START = time.time()
LOSS_KEYS = ("cls_loss", "box_loss", "prior_loss", "coarse_loss", "fine_loss",
             "model_loss", "l2_loss", "total_loss")


def _log(message):
  print(f"tf1_train_oracle [{time.time() - _START:6.1f} s] {message}",
        file=sys.stderr, flush=True)


def _args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reference", required=True,
                      help="the tpu_detection folder (SOURCE.md inside)")
  parser.add_argument("--work_dir", required=True)
  return parser.parse_args()


def _params(config, shapemask_config, params_dict):
  """The reference's shapemask params with the test's settings."""
  params = params_dict.ParamsDict(shapemask_config.SHAPEMASK_CFG,
                                  shapemask_config.SHAPEMASK_RESTRICTIONS)
  schedule = config["schedule"]
  params.override({
      "architecture": {"num_classes": config["num_classes"],
                       "min_level": config["min_level"],
                       "max_level": config["max_level"],
                       "use_bfloat16": False},
      "train": {
          "total_steps": config["steps"],
          "l2_weight_decay": config["l2_weight_decay"],
          "optimizer": {"type": "momentum", "momentum": config["momentum"]},
          "learning_rate": {
              "type": "step",
              "warmup_learning_rate": schedule["warmup_learning_rate"],
              "warmup_steps": schedule["warmup_steps"],
              "init_learning_rate": schedule["init_learning_rate"],
              "learning_rate_levels": schedule["learning_rate_levels"],
              "learning_rate_steps": schedule["learning_rate_steps"]},
          "frozen_variable_prefix": config["frozen_variable_prefix"],
          "regularization_variable_regex":
              config["regularization_variable_regex"],
      },
      "resnet": {"resnet_depth": config["depth"]},
      "fpn": {"fpn_feat_dims": config["fpn_filters"]},
      "retinanet_head": {"num_convs": config["head_convs"],
                         "num_filters": config["head_filters"]},
      "shapemask_head": {"num_downsample_channels": config["mask_channels"],
                         "num_convs": config["mask_convs"],
                         "upsample_factor": config["upsample_factor"],
                         "mask_crop_size": config["mask_crop_size"],
                         "use_category_for_mask": True},
      "shapemask_parser": {"upsample_factor": config["upsample_factor"],
                           "mask_crop_size": config["mask_crop_size"]},
  }, is_strict=True)
  params.validate()
  params.lock()
  return params


def _matching(variables, regex, keep):
  """`base_model.filter_variables`' rule: `re.match(regex, v.name)`."""
  if regex is None:
    return list(variables)
  return [v for v in variables if bool(re.match(regex, v.name)) == keep]


def _train_op(params, model_loss, learning_rates, tf):
  """What `base_model.BaseModel.train` adds after the losses (mirrored)."""
  train = params.train
  assert train.gradient_clip_norm == 0.0, train.gradient_clip_norm
  global_step = tf.train.get_or_create_global_step()
  learning_rate = learning_rates.learning_rate_generator(
      train.learning_rate, train.total_steps)(global_step)
  optimizer = tf.train.MomentumOptimizer(
      learning_rate, momentum=train.optimizer.momentum)
  update_ops = tf.get_collection(tf.GraphKeys.UPDATE_OPS)
  train_vars = _matching(tf.trainable_variables(),
                         train.frozen_variable_prefix, keep=False)
  regularized = _matching(train_vars, train.regularization_variable_regex,
                          keep=True)
  l2_loss = float(train.l2_weight_decay) * tf.add_n(
      [tf.nn.l2_loss(v) for v in regularized])
  total_loss = model_loss + l2_loss
  grads_and_vars = optimizer.compute_gradients(total_loss, train_vars)
  with tf.control_dependencies(update_ops):
    train_op = optimizer.apply_gradients(grads_and_vars, global_step)
  frozen = [v for v in tf.trainable_variables() if v not in train_vars]
  return train_op, learning_rate, l2_loss, total_loss, {
      "trainable": [v.op.name for v in train_vars],
      "regularized": [v.op.name for v in regularized],
      "frozen": [v.op.name for v in frozen],
      "update_ops": len(update_ops)}


def _frozen_names(depth, params, tf, nn_ops, resnet):
  """The trainable ResNet-`depth` variables the shapemask config freezes."""
  with tf.Graph().as_default():
    resnet.Resnet(resnet_depth=depth,
                  batch_norm_activation=nn_ops.BatchNormActivation())(
                      tf.zeros([1, 64, 64, 3]), is_training=True)
    trainable = tf.trainable_variables()
    kept = _matching(trainable, params.train.frozen_variable_prefix,
                     keep=False)
    return {"frozen": sorted(v.op.name for v in trainable if v not in kept),
            "trainable": sorted(v.op.name for v in trainable),
            "prefix": params.train.frozen_variable_prefix}


def main():
  args = _args()
  ref = os.path.abspath(args.reference)
  sys.path[:0] = [os.path.join(ref, "detection"), ref]
  import tensorflow.compat.v1 as tf  # pylint: disable=g-import-not-at-top
  tf.disable_v2_behavior()
  # pylint: disable=g-import-not-at-top
  from configs import shapemask_config
  from hyperparameters import params_dict
  from modeling import learning_rates
  from modeling import losses
  from modeling.architecture import fpn, heads, nn_ops, resnet
  # pylint: enable=g-import-not-at-top

  work = args.work_dir
  with open(os.path.join(work, "config.json")) as f:
    config = json.load(f)
  data = np.load(os.path.join(work, "batches.npz"))
  batches = {k: data[k] for k in data.files}
  num_batches, batch = batches["images"].shape[:2]
  levels = range(config["min_level"], config["max_level"] + 1)
  prior_path = os.path.join(work, "priors.npy")

  # The frozen-variable rule of the shapemask config, on the deep ResNets.
  frozen_params = params_dict.ParamsDict(
      shapemask_config.SHAPEMASK_CFG, shapemask_config.SHAPEMASK_RESTRICTIONS)
  for depth in config.get("frozen_check_depths", []):
    with open(os.path.join(work, f"frozen_resnet{depth}.json"), "w") as f:
      json.dump(_frozen_names(depth, frozen_params, tf, nn_ops, resnet), f)
  _log("frozen-variable lists written")

  params = _params(config, shapemask_config, params_dict)
  arch = params.architecture
  head_params = params.shapemask_head
  graph = tf.Graph()
  with graph.as_default():
    tf.set_random_seed(config["seed"])
    feeds = {k: tf.placeholder(v.dtype, v.shape[1:], name=k)
             for k, v in batches.items()}
    labels = dict(feeds)
    labels["cls_targets"] = {l: feeds[f"cls_targets_{l}"] for l in levels}
    labels["box_targets"] = {l: feeds[f"box_targets_{l}"] for l in levels}
    # The reference's model, as `shapemask_model._build_outputs` wires it in
    # training mode (ground-truth boxes into the mask branch).
    bna = nn_ops.BatchNormActivation(
        momentum=params.batch_norm_activation.batch_norm_momentum,
        epsilon=params.batch_norm_activation.batch_norm_epsilon)
    features = resnet.Resnet(resnet_depth=params.resnet.resnet_depth,
                             batch_norm_activation=bna)(
                                 feeds["images"], is_training=True)
    pyramid = fpn.Fpn(arch.min_level, arch.max_level,
                      params.fpn.fpn_feat_dims, batch_norm_activation=bna)(
                          features, is_training=True)
    cls_outputs, box_outputs = heads.RetinanetHead(
        arch.min_level, arch.max_level, arch.num_classes,
        len(params.anchor.aspect_ratios) * params.anchor.num_scales,
        params.retinanet_head.num_convs, params.retinanet_head.num_filters,
        batch_norm_activation=bna)(pyramid, is_training=True)
    instances, prior_masks = heads.ShapemaskPriorHead(
        arch.num_classes, head_params.num_downsample_channels,
        head_params.mask_crop_size, head_params.use_category_for_mask,
        prior_path, bna)(pyramid, feeds["mask_boxes"],
                         feeds["mask_outer_boxes"], feeds["mask_classes"],
                         True)
    coarse = heads.ShapemaskCoarsemaskHead(
        arch.num_classes, head_params.num_downsample_channels,
        head_params.mask_crop_size, head_params.use_category_for_mask,
        head_params.num_convs, bna)(instances, prior_masks,
                                    feeds["mask_classes"], True)
    fine = heads.ShapemaskFinemaskHead(
        arch.num_classes, head_params.num_downsample_channels,
        head_params.mask_crop_size, head_params.use_category_for_mask,
        head_params.num_convs, head_params.upsample_factor, bna)(
            instances, coarse, feeds["mask_classes"], True)
    model_vars = list(tf.global_variables())

    # `shapemask_model.build_losses`: the reference's loss objects, weighted.
    terms = {
        "cls_loss": losses.RetinanetClassLoss(
            params.retinanet_loss, arch.num_classes)(
                cls_outputs, labels["cls_targets"], feeds["num_positives"]),
        "box_loss": losses.RetinanetBoxLoss(params.retinanet_loss)(
            box_outputs, labels["box_targets"], feeds["num_positives"]),
        "prior_loss": losses.ShapemaskMseLoss()(
            prior_masks, feeds["mask_targets"], feeds["mask_is_valid"]),
        "coarse_loss": losses.ShapemaskLoss()(
            coarse, feeds["mask_targets"], feeds["mask_is_valid"]),
        "fine_loss": losses.ShapemaskLoss()(
            fine, feeds["fine_mask_targets"], feeds["mask_is_valid"]),
    }
    weights = params.shapemask_loss
    terms["model_loss"] = (
        terms["cls_loss"] +
        params.retinanet_loss.box_loss_weight * terms["box_loss"] +
        terms["prior_loss"] * weights.shape_prior_loss_weight +
        terms["coarse_loss"] * weights.coarse_mask_loss_weight +
        terms["fine_loss"] * weights.fine_mask_loss_weight)
    train_op, learning_rate, terms["l2_loss"], terms["total_loss"], lists = (
        _train_op(params, terms["model_loss"], learning_rates, tf))
    _log(f"training graph built: {len(model_vars)} model variables, "
         f"{len(lists['trainable'])} trained, {len(lists['regularized'])} "
         f"decayed, {lists['update_ops']} BN update ops")

    steps = []
    with tf.Session() as sess:
      sess.run(tf.global_variables_initializer())
      tf.train.Saver({v.op.name: v for v in model_vars}).save(
          sess, os.path.join(work, "initial", "model.ckpt"), global_step=0,
          write_meta_graph=False)
      for step in range(config["steps"]):
        index = step % num_batches
        _, lr, values = sess.run(
            (train_op, learning_rate, terms),
            {feeds[k]: v[index] for k, v in batches.items()})
        steps.append({"learning_rate": float(lr),
                      **{k: float(values[k]) for k in LOSS_KEYS}})
        _log(f"step {step}: lr={lr:.5f} " + " ".join(
            f"{k}={values[k]:.5f}" for k in LOSS_KEYS))
      final = sess.run({v.op.name: v for v in model_vars})
  np.savez(os.path.join(work, "final.npz"), **final)
  with open(os.path.join(work, "steps.json"), "w") as f:
    json.dump({"steps": steps, **lists}, f, indent=1)
  with open(os.path.join(work, "done"), "w") as f:
    f.write(f"steps={config['steps']} batch={batch}\n")
  _log("done")


if __name__ == "__main__":
  main()
