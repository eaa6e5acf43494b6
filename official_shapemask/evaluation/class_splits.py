"""COCO category splits for the cross-category (novel object) experiment.

ShapeMask's generalisation experiment trains the mask branch on one split of
the COCO categories and evaluates mask AP on the other (reference §10). The
split is the PASCAL VOC one: the 20 COCO categories that also exist in VOC,
and the remaining 60 COCO categories.

All ids are raw COCO category ids (1..90 with gaps), the ids used as class
slots throughout `official_shapemask`.
"""

# The 80 category ids that exist in COCO 2014/2017 instances annotations.
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42,
    43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90)

# person, bicycle, car, motorcycle, airplane, bus, train, boat, bird, cat,
# dog, horse, sheep, cow, bottle, chair, couch, potted plant, dining table, tv.
VOC_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62,
                    63, 64, 67, 72)

NONVOC_CATEGORY_IDS = tuple(
    c for c in COCO_CATEGORY_IDS if c not in frozenset(VOC_CATEGORY_IDS))

SPLITS = ("all", "voc", "nonvoc")


def category_ids_for_split(split, all_category_ids=COCO_CATEGORY_IDS):
  """Returns the sorted category ids of a split.

  Args:
    split: str, one of 'all', 'voc', 'nonvoc'.
    all_category_ids: iterable of int, the ids returned for 'all' (default:
      the 80 COCO ids). Lets a non-COCO label space use split 'all'.

  Returns:
    tuple of int, sorted.

  Raises:
    ValueError: if `split` is not one of `SPLITS`.
  """
  if split == "all":
    return tuple(sorted(int(c) for c in all_category_ids))
  if split == "voc":
    return VOC_CATEGORY_IDS
  if split == "nonvoc":
    return NONVOC_CATEGORY_IDS
  raise ValueError(
      f"Unknown class split {split!r}; expected one of {SPLITS} "
      "(setting mask_train_class / mask_eval_class).")
