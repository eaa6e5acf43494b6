"""Tests of official_shapemask.evaluation.mask_paste."""
import numpy as np
import pytest

from official_shapemask.evaluation import mask_paste


def test_all_ones_map_golden_rectangle():
  # Worked by hand from reference §9.6. Outer box yxyx (10.3, 20.6, 60.9,
  # 100.2), m = 128, enlarged by 130/128 about its centre:
  #   x: centre 60.4, half 39.8 * 1.015625 = 40.421875 -> [19.98, 100.82]
  #      -> int [19, 100], width 100 - 19 + 1 = 82;
  #   y: centre 35.6, half 25.3 * 1.015625 = 25.6953 -> [9.90, 61.30]
  #      -> int [9, 61], height 53.
  # Bilinear 130 -> 82 samples source x at (k + 0.5) * 130 / 82 - 0.5: the
  # first and last columns land at 0.29 from the zero border (value 0.29,
  # below 0.5), the others inside the ones -> columns 20..99.
  # 130 -> 53: source y = (k + 0.5) * 130 / 53 - 0.5 is 0.73 for k = 0 and
  # 128.27 for k = 52 (values 0.73 > 0.5) -> all rows 9..61.
  pasted = mask_paste.paste_instance_masks(
      np.ones([1, 128, 128], np.float32),
      np.array([[10.3, 20.6, 60.9, 100.2]]), 80, 120)
  expected = np.zeros([80, 120], np.uint8)
  expected[9:62, 20:100] = 1
  assert pasted.dtype == np.uint8 and pasted.shape == (1, 80, 120)
  np.testing.assert_array_equal(pasted[0], expected)


def test_clipping_matches_a_larger_canvas():
  # Boxes whose enlarged corners are integers (half sizes 64 -> 65), so
  # truncation is the same after shifting the box by +100 pixels.
  rng = np.random.default_rng(3)
  masks = rng.uniform(size=[2, 128, 128]).astype(np.float32)
  boxes = np.array([[-64.0, -54.0, 64.0, 74.0],   # sticks out top-left
                    [10.0, 20.0, 138.0, 276.0]])  # sticks out bottom-right
  small = mask_paste.paste_instance_masks(masks, boxes, 30, 40)
  big = mask_paste.paste_instance_masks(masks, boxes + 100.0, 300, 400)
  np.testing.assert_array_equal(small, big[:, 100:130, 100:140])
  assert small[0].sum() > 0 and small[1].sum() > 0


def test_hwn_layout_and_edge_cases():
  rng = np.random.default_rng(0)
  masks = rng.uniform(size=[3, 16, 16]).astype(np.float32)
  boxes = np.array([[5.0, 5.0, 40.0, 30.0], [0.0, 0.0, 50.0, 60.0],
                    [200.0, 200.0, 260.0, 280.0]])  # outside the image
  nhw = mask_paste.paste_instance_masks(masks, boxes, 50, 60)
  hwn = mask_paste.paste_instance_masks_hwn(masks, boxes, 50, 60)
  assert hwn.flags["F_CONTIGUOUS"] and hwn.shape == (50, 60, 3)
  np.testing.assert_array_equal(np.transpose(nhw, [1, 2, 0]), hwn)
  assert nhw[2].sum() == 0
  assert mask_paste.paste_instance_masks(
      np.zeros([0, 16, 16]), np.zeros([0, 4]), 7, 9).shape == (0, 7, 9)
  with pytest.raises(ValueError, match="N, 4"):
    mask_paste.paste_instance_masks(masks, boxes[:2], 50, 60)
  with pytest.raises(ValueError, match="square"):
    mask_paste.paste_instance_masks(masks[:, :, :8], boxes, 50, 60)


def test_round_trip_on_real_masks(val_coco, evalkit):
  """GT mask -> 128x128 in its outer box -> pasted back: IoU > 0.95."""
  ious = []
  for ann in val_coco.loadAnns(val_coco.getAnnIds()):
    x, y, w, h = ann["bbox"]
    if ann["iscrowd"] or w <= 32 or h <= 32:
      continue
    img = val_coco.imgs[ann["image_id"]]
    full = val_coco.annToMask(ann)
    outer = evalkit.outer_boxes([[y, x, y + h, x + w]],
                                canvas=max(img["height"], img["width"]))[0]
    crop = evalkit.crop_to_paste_frame(full, outer)
    pasted = mask_paste.paste_instance_masks(crop[None], outer[None],
                                             img["height"], img["width"])[0]
    inter = np.logical_and(pasted, full).sum()
    union = np.logical_or(pasted, full).sum()
    ious.append(inter / union)
  ious = np.asarray(ious)
  assert ious.size > 300  # coco_tiny160 val has 462 such objects.
  assert ious.min() > 0.95, np.sort(ious)[:5]
