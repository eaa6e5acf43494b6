"""Builds a ShapeMask model from plain keyword arguments (gin-configurable).

Every width and depth is a parameter, so the same builder gives the
reference's ResNet-101-FPN at 1024 px and a CPU-sized model for tests and the
demo. Example::

    model = build_shapemask_model(num_classes=91, image_size=1024,
                                  backbone_depth=101,
                                  shape_prior_path="priors_91x20x32x32.npy")
"""

import logging

import gin
import numpy as np
from keras import ops

from official_shapemask import losses as losses_lib
from official_shapemask.modeling import prior_file
from official_shapemask.modeling import shapemask_model
from official_shapemask.modeling.backbones import resnet
from official_shapemask.modeling.decoders import fpn
from official_shapemask.modeling.heads import coarse_mask_head
from official_shapemask.modeling.heads import fine_mask_head
from official_shapemask.modeling.heads import retinanet_head
from official_shapemask.modeling.heads import shape_prior_head
from official_shapemask.modeling.layers import detection_generator
from official_shapemask.ops import anchors as anchors_lib


def load_priors(shape_prior_path, num_classes, use_category_for_mask,
                mask_crop_size=None):
  """Loads and validates a `[C_mask, K, m, m]` shape-prior file.

  Raises:
    FileNotFoundError, ValueError: naming the file (see
      `prior_file.load_shape_priors`); ValueError also when `m` differs from
      `mask_crop_size` (when given).
  """
  priors = prior_file.load_shape_priors(
      shape_prior_path,
      num_classes=num_classes if use_category_for_mask else None,
      class_agnostic=not use_category_for_mask)
  if mask_crop_size is not None and priors.shape[-1] != mask_crop_size:
    raise ValueError(
        f"shape priors in {shape_prior_path} are {priors.shape[-1]}x"
        f"{priors.shape[-1]}, but mask_crop_size is {mask_crop_size} (make "
        f"them with tools/generate_shape_priors.py --prior_size="
        f"{mask_crop_size})")
  return priors


@gin.configurable
def build_shapemask_model(num_classes=91,
                          image_size=1024,
                          backbone_depth=50,
                          backbone_width_multiplier=1.0,
                          freeze_early_convs=True,
                          freeze_early_norms=False,
                          backbone_stem_pool_padding="same",
                          min_level=3,
                          max_level=7,
                          fpn_num_filters=256,
                          head_num_convs=4,
                          head_num_filters=256,
                          num_scales=3,
                          aspect_ratios=(1.0, 2.0, 0.5),
                          anchor_size=4.0,
                          shape_prior_path=None,
                          num_clusters=None,
                          use_category_for_mask=True,
                          mask_crop_size=32,
                          num_downsample_channels=128,
                          mask_num_convs=4,
                          mask_num_filters=128,
                          upsample_factor=4,
                          outer_box_scale=1.25,
                          norm_momentum=0.997,
                          norm_epsilon=1e-4,
                          use_sync_bn=False,
                          pre_nms_num_boxes=5000,
                          nms_iou_threshold=0.5,
                          score_threshold=0.05,
                          max_num_detections=100,
                          focal_loss_alpha=0.4,
                          focal_loss_gamma=1.5,
                          huber_loss_delta=0.15,
                          box_loss_weight=50.0,
                          prior_loss_weight=0.1,
                          coarse_loss_weight=1.0,
                          fine_loss_weight=1.0,
                          l2_weight_decay=1e-4,
                          l2_variables="all",
                          num_mask_slots=8):
  """Builds a ShapeMask model with all variables created.

  Args:
    num_classes: int, class slots including background 0 (COCO: 91, raw
      category ids as indices).
    image_size: int, side of the square padded input canvas.
    backbone_depth: ResNet depth (10, 18, 34, 50, 101, 152).
    backbone_width_multiplier: float, scales every backbone filter count.
    freeze_early_convs: bool, freeze the stem + conv2_x conv kernels.
    freeze_early_norms: bool, also freeze those stages' batch-norm gamma and
      beta (the Model Garden port's behaviour; the reference keeps them
      trainable). See `ResNet`.
    backbone_stem_pool_padding: "same" (reference) or "symmetric" (the
      stem max-pool of torchvision/timm/keras-hub ResNets; use it with
      keras-hub ImageNet weights). See `ResNet`.
    min_level, max_level: pyramid levels used (reference 3..7).
    fpn_num_filters: FPN channels (reference 256).
    head_num_convs, head_num_filters: RetinaNet tower depth and width.
    num_scales, aspect_ratios, anchor_size: anchor settings.
    shape_prior_path: `.npy` of shape `[C_mask, K, m, m]`; K is read from it.
    num_clusters: K when no prior file is given (zero priors, which carry no
      shape information: a warning is logged).
    use_category_for_mask: bool, class-specific priors and mask channels;
      False = class-agnostic (one prior row, one mask channel).
    mask_crop_size: m, the crop side of the mask branch (32).
    num_downsample_channels: D, instance feature channels (128).
    mask_num_convs, mask_num_filters: coarse/fine head conv towers.
    upsample_factor: fine-mask upsampling (4 -> 128x128 masks).
    outer_box_scale: float, outer box scale (1.25).
    norm_momentum, norm_epsilon, use_sync_bn: batch norm settings.
    pre_nms_num_boxes, nms_iou_threshold, score_threshold,
      max_num_detections: post-processing.
    focal_loss_alpha ... fine_loss_weight: loss settings.
    l2_weight_decay: weight of the L2 term.
    l2_variables: the trainable variables it decays: `'all'` (the
      reference since December 2019) or `'seed_2019'` (the seed's rule: not
      the backbone's batch-norm gamma/beta, no bias). See
      `ShapeMaskModel.l2_regularized_variables`.
    num_mask_slots: instance slots used to build the mask heads' variables.

  Returns:
    a built `ShapeMaskModel`.
  """
  if shape_prior_path:
    priors = load_priors(shape_prior_path, num_classes, use_category_for_mask,
                         mask_crop_size)
    num_clusters = priors.shape[1]
  else:
    if not num_clusters:
      raise ValueError(
          "give shape_prior_path (a [num_classes, K, 32, 32] .npy, see "
          "tools/generate_shape_priors.py) or num_clusters for zero priors")
    logging.warning(
        "No shape_prior_path: using %d all-zero priors per class, which carry "
        "no shape information (the reference's silent default).", num_clusters)
    priors = None

  norm = dict(norm_momentum=norm_momentum, norm_epsilon=norm_epsilon,
              use_sync_bn=use_sync_bn)
  backbone = resnet.ResNet(depth=backbone_depth,
                           width_multiplier=backbone_width_multiplier,
                           freeze_early_convs=freeze_early_convs,
                           freeze_early_norms=freeze_early_norms,
                           stem_pool_padding=backbone_stem_pool_padding,
                           **norm)
  decoder = fpn.FPN(min_level=min_level, max_level=max_level,
                    num_filters=fpn_num_filters, **norm)
  head = retinanet_head.RetinaNetHead(
      min_level=min_level, max_level=max_level, num_classes=num_classes,
      num_anchors_per_location=anchors_lib.anchors_per_location(
          num_scales, aspect_ratios),
      num_convs=head_num_convs, num_filters=head_num_filters, **norm)
  mask_args = dict(num_classes=num_classes, mask_crop_size=mask_crop_size,
                   use_category_for_mask=use_category_for_mask)
  prior_head = shape_prior_head.ShapePriorHead(
      num_clusters=num_clusters,
      num_downsample_channels=num_downsample_channels, **mask_args)
  coarse_head = coarse_mask_head.CoarseMaskHead(
      num_convs=mask_num_convs, num_filters=mask_num_filters, **mask_args,
      **norm)
  fine_head = fine_mask_head.FineMaskHead(
      num_convs=mask_num_convs, num_filters=mask_num_filters,
      upsample_factor=upsample_factor, **mask_args, **norm)
  generator = detection_generator.DetectionGenerator(
      image_size=(image_size, image_size), min_level=min_level,
      max_level=max_level, num_scales=num_scales,
      aspect_ratios=tuple(aspect_ratios), anchor_size=anchor_size,
      pre_nms_num_boxes=pre_nms_num_boxes,
      nms_iou_threshold=nms_iou_threshold, score_threshold=score_threshold,
      max_num_detections=max_num_detections)
  loss = losses_lib.ShapeMaskLoss(
      focal_loss_alpha=focal_loss_alpha, focal_loss_gamma=focal_loss_gamma,
      huber_loss_delta=huber_loss_delta, box_loss_weight=box_loss_weight,
      prior_loss_weight=prior_loss_weight,
      coarse_loss_weight=coarse_loss_weight,
      fine_loss_weight=fine_loss_weight)
  model = shapemask_model.ShapeMaskModel(
      backbone=backbone, decoder=decoder, head=head, prior_head=prior_head,
      coarse_head=coarse_head, fine_head=fine_head,
      detection_generator=generator, loss=loss, image_size=image_size,
      outer_box_scale=outer_box_scale, l2_weight_decay=l2_weight_decay,
      l2_variables=l2_variables, name="shapemask")
  build_model_variables(model, num_mask_slots)
  if priors is not None:
    model.prior_head.set_shape_priors(priors)
  return model


def dummy_training_inputs(image_size, batch_size=1, num_mask_slots=8):
  """A zero training input dict with valid boxes (for building/tracing)."""
  box = np.array([0.25, 0.25, 0.75, 0.75], np.float32) * image_size
  outer = np.array([0.1875, 0.1875, 0.8125, 0.8125], np.float32) * image_size
  return {
      "images": np.zeros((batch_size, image_size, image_size, 3), np.float32),
      "mask_boxes": np.tile(box, (batch_size, num_mask_slots, 1)),
      "mask_outer_boxes": np.tile(outer, (batch_size, num_mask_slots, 1)),
      "mask_classes": np.ones((batch_size, num_mask_slots), np.int32),
  }


def build_model_variables(model, num_mask_slots=8):
  """Creates every variable with one inference-mode call on zeros."""
  inputs = dummy_training_inputs(model.image_size, 1, num_mask_slots)
  model({k: ops.convert_to_tensor(v) for k, v in inputs.items()},
        training=False)
  return model
