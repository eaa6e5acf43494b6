"""COCO evaluation of ShapeMask: mask pasting, COCOeval, Keras callback.

`COCOEvalCallback` (which imports Keras and TensorFlow) is loaded lazily, so
the evaluator's background worker process imports numpy, OpenCV and
pycocotools only.
"""
from official_shapemask.evaluation.class_splits import category_ids_for_split
from official_shapemask.evaluation.class_splits import COCO_CATEGORY_IDS
from official_shapemask.evaluation.class_splits import NONVOC_CATEGORY_IDS
from official_shapemask.evaluation.class_splits import VOC_CATEGORY_IDS
from official_shapemask.evaluation.coco_evaluator import COCOEvaluator
from official_shapemask.evaluation.coco_evaluator import format_metrics_table
from official_shapemask.evaluation.coco_evaluator import METRIC_NAMES
from official_shapemask.evaluation.mask_paste import paste_instance_masks

__all__ = [
    "COCOEvalCallback",
    "COCOEvaluator",
    "COCO_CATEGORY_IDS",
    "METRIC_NAMES",
    "NONVOC_CATEGORY_IDS",
    "VOC_CATEGORY_IDS",
    "category_ids_for_split",
    "format_metrics_table",
    "paste_instance_masks",
]


def __getattr__(name):
  if name == "COCOEvalCallback":
    from official_shapemask.evaluation.callback import COCOEvalCallback  # pylint: disable=g-import-not-at-top
    return COCOEvalCallback
  raise AttributeError(
      f"module 'official_shapemask.evaluation' has no attribute {name!r}")
