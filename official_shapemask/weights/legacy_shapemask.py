"""tf-models-official's legacy ShapeMask (`official/legacy/detection`).

The Model Garden port of ShapeMask is a Keras 2 (`tf_keras`) functional model
built from a `ParamsDict`. This module translates between its params and the
keyword arguments of `official_shapemask.modeling.build_shapemask_model`, and
builds the port's model, for two users:

- `legacy_converter` (checkpoints of the port -> our model);
- `tools/bench/benchmark.py --peer` (the port measured side by side with ours).

It imports TensorFlow and tf-models-official (Keras 2), never our Keras 3
layers, so it can run in a process of its own.
"""

import os

# How the port differs from ours in a side-by-side benchmark run.
UNEQUAL_SETTINGS = (
    "port: global-norm gradient clip 1.0 hard-coded in its train step and "
    "Nesterov momentum (its config default); ours matches both in --peer "
    "runs (--clip=1 --nesterov=1)",
    "port: float32 only here; ours may run --precision=mixed_bfloat16",
    "port: its training graph contains the detection generator too (pruned "
    "by TensorFlow: in training its outputs feed no loss)",
    "port: the fine head predicts all C mask channels at (m*u)^2 and gathers "
    "one; ours computes only the selected class (fused into the transposed "
    "conv)",
    "port: the coarse head predicts all C channels at m^2; ours only the "
    "selected class",
    "port: its frozen-variable regex freezes the first 11 conv kernels and "
    "the gamma/beta of their 11 batch norms; the reference freezes the "
    "kernels only; ours matches the port in --peer runs "
    "(--freeze_early_norms=1)",
    "port: coarse/fine mask losses are Keras BCE with SUM reduction "
    "(reference section 12); ours elementwise masked CE",
)


def _square_size(output_size):
  size = list(output_size)
  if len(size) != 2 or size[0] != size[1]:
    raise ValueError(
        f"shapemask_parser.output_size={size}: only square canvases map to "
        "build_shapemask_model(image_size=...)")
  return int(size[0])


def legacy_params(model_kwargs,
                  batch_size=2,
                  shape_prior_path="",
                  use_bfloat16=False,
                  model_dir="",
                  train_file_pattern="",
                  nesterov=True):
  """Port params equivalent to our `build_shapemask_model(**model_kwargs)`.

  Args:
    model_kwargs: dict of `build_shapemask_model` arguments (missing keys
      take that function's defaults).
    batch_size: train and eval batch size of the port's input layers.
    shape_prior_path: `.npy` priors `[C, K, m, m]` the port loads ('' = one
      zero prior per class, the port's silent default).
    use_bfloat16: the port's mixed_bfloat16 policy.
    model_dir, train_file_pattern: passed through.
    nesterov: the port's optimizer setting (its default is True).

  Returns:
    a locked `ParamsDict`.

  Raises:
    ValueError: for settings the port cannot express (width multiplier,
      frozen convolutions off, ...).
  """
  from official_shapemask.modeling import factory  # numpy/keras only.
  import inspect

  defaults = {
      k: v.default for k, v in inspect.signature(
          factory.build_shapemask_model).parameters.items()
  }
  kw = dict(defaults)
  kw.update(model_kwargs)
  if float(kw["backbone_width_multiplier"]) != 1.0:
    raise ValueError("the port has no backbone_width_multiplier; use 1.0")
  if int(kw["mask_num_filters"]) != int(kw["num_downsample_channels"]):
    raise ValueError(
        "the port's coarse/fine convolutions have num_downsample_channels "
        f"filters: set mask_num_filters={kw['num_downsample_channels']}")
  from official.legacy.detection.configs import factory as config_factory
  params = config_factory.config_generator("shapemask")
  size = int(kw["image_size"])
  params.override({
      "model_dir": model_dir,
      "use_tpu": False,
      "strategy_type": "one_device",
      "architecture": {
          "use_bfloat16": bool(use_bfloat16),
          "num_classes": int(kw["num_classes"]),
          "min_level": int(kw["min_level"]),
          "max_level": int(kw["max_level"]),
          "outer_box_scale": float(kw["outer_box_scale"]),
      },
      "anchor": {
          "num_scales": int(kw["num_scales"]),
          "aspect_ratios": [float(a) for a in kw["aspect_ratios"]],
          "anchor_size": float(kw["anchor_size"]),
      },
      "norm_activation": {
          "batch_norm_momentum": float(kw["norm_momentum"]),
          "batch_norm_epsilon": float(kw["norm_epsilon"]),
      },
      "resnet": {"resnet_depth": int(kw["backbone_depth"])},
      "fpn": {"fpn_feat_dims": int(kw["fpn_num_filters"])},
      "retinanet_head": {
          "num_convs": int(kw["head_num_convs"]),
          "num_filters": int(kw["head_num_filters"]),
      },
      "postprocess": {
          "max_total_size": int(kw["max_num_detections"]),
          "nms_iou_threshold": float(kw["nms_iou_threshold"]),
          "score_threshold": float(kw["score_threshold"]),
          "pre_nms_num_boxes": int(kw["pre_nms_num_boxes"]),
      },
      "train": {
          "batch_size": int(batch_size),
          "total_steps": 1000,
          "train_file_pattern": train_file_pattern,
          "l2_weight_decay": float(kw["l2_weight_decay"]),
          "optimizer": {"nesterov": bool(nesterov)},
      },
      "eval": {"batch_size": int(batch_size),
               "eval_file_pattern": train_file_pattern},
      "shapemask_parser": {
          "output_size": [size, size],
          "mask_crop_size": int(kw["mask_crop_size"]),
          "upsample_factor": int(kw["upsample_factor"]),
          "outer_box_scale": float(kw["outer_box_scale"]),
          "num_sampled_masks": int(kw["num_mask_slots"]),
          "use_category": bool(kw["use_category_for_mask"]),
      },
      "shapemask_head": {
          "num_downsample_channels": int(kw["num_downsample_channels"]),
          "mask_crop_size": int(kw["mask_crop_size"]),
          "use_category_for_mask": bool(kw["use_category_for_mask"]),
          "num_convs": int(kw["mask_num_convs"]),
          "upsample_factor": int(kw["upsample_factor"]),
          "shape_prior_path": shape_prior_path or "",
      },
      "retinanet_loss": {
          "focal_loss_alpha": float(kw["focal_loss_alpha"]),
          "focal_loss_gamma": float(kw["focal_loss_gamma"]),
          "huber_loss_delta": float(kw["huber_loss_delta"]),
          "box_loss_weight": float(kw["box_loss_weight"]),
      },
      "shapemask_loss": {
          "shape_prior_loss_weight": float(kw["prior_loss_weight"]),
          "coarse_mask_loss_weight": float(kw["coarse_loss_weight"]),
          "fine_mask_loss_weight": float(kw["fine_loss_weight"]),
      },
  }, is_strict=True)
  params.validate()
  params.lock()
  return params


def model_kwargs_from_params(params):
  """Our `build_shapemask_model` arguments for the port's params.

  The shape priors are not included: the port loads them from
  `params.shapemask_head.shape_prior_path` (see `load_legacy_priors`).

  Raises:
    ValueError: for port settings our model does not implement.
  """
  arch = params.architecture
  if arch.backbone != "resnet" or arch.multilevel_features != "fpn":
    raise ValueError(
        f"only resnet + fpn ports convert, got {arch.backbone} + "
        f"{arch.multilevel_features}")
  if params.fpn.use_separable_conv or not params.fpn.use_batch_norm:
    raise ValueError("fpn.use_separable_conv / use_batch_norm=False do not "
                     "convert")
  if params.retinanet_head.use_separable_conv:
    raise ValueError("retinanet_head.use_separable_conv does not convert")
  if params.norm_activation.activation != "relu":
    raise ValueError(f"activation {params.norm_activation.activation!r} does "
                     "not convert (ReLU only)")
  head = params.shapemask_head
  return dict(
      num_classes=int(arch.num_classes),
      image_size=_square_size(params.shapemask_parser.output_size),
      backbone_depth=int(params.resnet.resnet_depth),
      min_level=int(arch.min_level),
      max_level=int(arch.max_level),
      fpn_num_filters=int(params.fpn.fpn_feat_dims),
      head_num_convs=int(params.retinanet_head.num_convs),
      head_num_filters=int(params.retinanet_head.num_filters),
      num_scales=int(params.anchor.num_scales),
      aspect_ratios=tuple(float(a) for a in params.anchor.aspect_ratios),
      anchor_size=float(params.anchor.anchor_size),
      use_category_for_mask=bool(head.use_category_for_mask),
      mask_crop_size=int(head.mask_crop_size),
      num_downsample_channels=int(head.num_downsample_channels),
      mask_num_convs=int(head.num_convs),
      mask_num_filters=int(head.num_downsample_channels),
      upsample_factor=int(head.upsample_factor),
      outer_box_scale=float(arch.outer_box_scale),
      norm_momentum=float(params.norm_activation.batch_norm_momentum),
      norm_epsilon=float(params.norm_activation.batch_norm_epsilon),
      pre_nms_num_boxes=int(params.postprocess.pre_nms_num_boxes),
      nms_iou_threshold=float(params.postprocess.nms_iou_threshold),
      score_threshold=float(params.postprocess.score_threshold),
      max_num_detections=int(params.postprocess.max_total_size),
      focal_loss_alpha=float(params.retinanet_loss.focal_loss_alpha),
      focal_loss_gamma=float(params.retinanet_loss.focal_loss_gamma),
      huber_loss_delta=float(params.retinanet_loss.huber_loss_delta),
      box_loss_weight=float(params.retinanet_loss.box_loss_weight),
      prior_loss_weight=float(
          params.shapemask_loss.shape_prior_loss_weight),
      coarse_loss_weight=float(
          params.shapemask_loss.coarse_mask_loss_weight),
      fine_loss_weight=float(params.shapemask_loss.fine_mask_loss_weight),
      l2_weight_decay=float(params.train.l2_weight_decay),
      num_mask_slots=int(params.shapemask_parser.num_sampled_masks),
  )


def load_legacy_priors(params):
  """The priors the port uses: the `.npy` file, or one zero prior per class.

  Returns:
    float32 `[C_mask, K, m, m]`.
  """
  import numpy as np
  import tensorflow as tf
  head = params.shapemask_head
  if head.shape_prior_path:
    with tf.io.gfile.GFile(head.shape_prior_path, "rb") as f:
      return np.load(f).astype(np.float32)
  rows = params.architecture.num_classes if head.use_category_for_mask else 1
  return np.zeros((rows, 1, head.mask_crop_size, head.mask_crop_size),
                  np.float32)


def read_params(path_or_dir):
  """Params of a port run: a `params.yaml` or the model directory holding it."""
  import tensorflow as tf
  from official.legacy.detection.configs import factory as config_factory
  from official.modeling.hyperparams import params_dict
  path = path_or_dir
  if tf.io.gfile.isdir(path):
    path = os.path.join(path, "params.yaml")
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f"{path}: no params.yaml of the port (its executor writes one into "
        "model_dir); pass --legacy_params")
  params = config_factory.config_generator("shapemask")
  params = params_dict.override_params_dict(params, path, is_strict=False)
  if params.type != "shapemask":
    raise ValueError(f"{path}: params of a {params.type!r} model, not "
                     "shapemask")
  return params


def build_legacy_model(params, mode="train"):
  """Builds the port's functional `tf_keras` model.

  Args:
    params: port params (`legacy_params` or `read_params`).
    mode: 'train' (mask branch on the given GT boxes, batch norm in training
      mode) or 'predict' (detections, then masks; the `PREDICT_WITH_GT`
      inputs `image` and `image_info`).

  Returns:
    `(model, builder)`; `builder.build_loss_fn()` and
    `builder.make_filter_trainable_variables_fn()` give the port's loss and
    frozen-variable filter.
  """
  from official.legacy.detection.dataloader import mode_keys
  from official.legacy.detection.modeling import factory as model_factory
  keys = {"train": mode_keys.TRAIN, "predict": mode_keys.PREDICT_WITH_GT}
  if mode not in keys:
    raise ValueError(f"mode must be one of {sorted(keys)}, got {mode!r}")
  builder = model_factory.model_generator(params)
  model = builder.build_model(params, mode=keys[mode])
  return model, builder
