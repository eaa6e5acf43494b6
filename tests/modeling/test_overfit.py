"""Overfit: a small ShapeMask trained on six real COCO images reaches a high
training-set box and mask AP (pycocotools).

This is the end-to-end agreement check of the pieces: the converter and
decoder, the parser's anchor and mask targets (outer-box frame, class
slots), the losses, the detection generator, the mask branch on detections
and the evaluator's pasting of outer-box-frame masks back into the image.
A wrong frame, a flipped coordinate or a class-channel mix-up anywhere keeps
the mask AP near zero however long the model trains.

Data: six coco_tiny160 train images with few, large instances, converted
from a subset JSON with `convert_coco_to_tfrecords`; shape priors computed
from the same subset with `compute_shape_priors` (K = 2). No augmentation,
so the training and evaluation views are the same.
"""
import json

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.slow

IMAGE_IDS = (542720, 24577, 188416, 221184, 57345, 286720)
SIZE = 128
BATCH = len(IMAGE_IDS)
STEPS = 150
BASE_LR = 0.02
MIN_AP = 0.5

TINY_MODEL = dict(
    num_classes=91, image_size=SIZE, backbone_depth=10,
    backbone_width_multiplier=0.5, min_level=3, max_level=5,
    fpn_num_filters=64, head_num_convs=2, head_num_filters=64,
    num_downsample_channels=32, mask_num_convs=2, mask_num_filters=32,
    freeze_early_convs=False, l2_weight_decay=1e-5, norm_momentum=0.9,
    pre_nms_num_boxes=1000)
PARSER = dict(output_size=SIZE, min_level=3, max_level=5,
              aug_rand_hflip=False, aug_scale_min=1.0, aug_scale_max=1.0,
              box_jitter_scale=0.0)


def _write_subset(annotation_file, image_ids, path):
  with open(annotation_file) as f:
    data = json.load(f)
  wanted = set(image_ids)
  images = [im for im in data["images"] if im["id"] in wanted]
  missing = wanted - {im["id"] for im in images}
  assert not missing, f"image ids {missing} not in {annotation_file}"
  subset = {
      "images": images,
      "annotations": [a for a in data["annotations"]
                      if a["image_id"] in wanted],
      "categories": data["categories"],
  }
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(subset))
  tmp.rename(path)
  return subset


def test_small_model_overfits_six_real_images(coco_tiny_root, tmp_path):
  tf = pytest.importorskip("tensorflow")
  from official_shapemask.data_prep import coco_tfrecord
  from official_shapemask.dataloaders import input_reader
  from official_shapemask.data_prep import shape_priors
  from official_shapemask.dataloaders import shapemask_parser
  from official_shapemask.evaluation import COCOEvaluator
  from official_shapemask.modeling import build_shapemask_model

  subset_json = tmp_path / "instances_subset.json"
  subset = _write_subset(
      coco_tiny_root / "annotations" / "instances_train2017.json", IMAGE_IDS,
      subset_json)
  summary = coco_tfrecord.convert_coco_to_tfrecords(
      image_dir=str(coco_tiny_root / "train2017"),
      object_annotations_file=str(subset_json),
      output_file_prefix=str(tmp_path / "train"), num_shards=1,
      num_workers=1, show_progress=False)
  assert summary["images"] == BATCH
  assert summary["instances"] == len(subset["annotations"])

  priors, _ = shape_priors.compute_shape_priors(
      str(subset_json), num_clusters=2, num_classes=91, seed=0)
  prior_path = tmp_path / "priors.npy"
  np.save(prior_path, priors)

  keras.utils.set_random_seed(0)
  model = build_shapemask_model(shape_prior_path=str(prior_path),
                                **TINY_MODEL)
  schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
      [int(0.7 * STEPS)], [BASE_LR, BASE_LR / 10])
  model.compile(optimizer=keras.optimizers.SGD(schedule, momentum=0.9))
  train_ds = input_reader.build_dataset(
      str(tmp_path / "train-*"),
      shapemask_parser.Parser(seed=0, **PARSER), batch_size=BATCH,
      is_training=True, deterministic=True, cache=True, seed=0)
  history = model.fit(train_ds, epochs=1, steps_per_epoch=STEPS, verbose=0)
  assert np.isfinite(history.history["loss"][0])

  eval_ds = input_reader.build_dataset(
      str(tmp_path / "train-*"),
      shapemask_parser.Parser(mode="eval", **PARSER), batch_size=BATCH,
      is_training=False)
  evaluator = COCOEvaluator(annotation_file=str(subset_json))
  for images, labels in eval_ds:
    predictions = model.predict_on_batch(
        {"images": images, "image_info": labels["image_info"]})
    evaluator.update(predictions,
                     tf.nest.map_structure(np.asarray,
                                           labels["groundtruths"]))
  assert evaluator.num_images == BATCH
  metrics = evaluator.evaluate()
  print(f"overfit after {STEPS} steps: box AP {metrics['AP']:.3f}, "
        f"mask AP {metrics['mask_AP']:.3f}, final loss "
        f"{history.history['loss'][0]:.3f} (epoch mean)")
  assert metrics["AP"] >= MIN_AP, metrics
  assert metrics["mask_AP"] >= MIN_AP, metrics
