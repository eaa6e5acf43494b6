"""Tests of official_shapemask.evaluation.mask_paste."""
import numpy as np
import pytest
from pycocotools import mask as mask_api

from official_shapemask.evaluation import coco_utils
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


def _old_path(masks, boxes, height, width):
  """Full-size paste, then pycocotools' encoder (the path it replaces)."""
  return coco_utils.encode_binary_masks(
      mask_paste.paste_instance_masks_hwn(masks, boxes, height, width))


def test_paste_and_encode_equals_full_size_paste_on_edge_cases():
  rng = np.random.default_rng(7)
  height, width = 37, 53
  masks = rng.uniform(size=[10, 16, 16]).astype(np.float32)
  masks[9] = 1.0  # Its 1x1 window (last box) is on.
  masks[0] = 1.0  # Full columns: runs go on from one column to the next.
  masks[1] = 0.0  # Nothing above 0.5.
  boxes = np.array([
      [-5.0, -5.0, 45.0, 60.0],    # Covers the image: ones to the last pixel.
      [3.0, 4.0, 20.0, 30.0],
      [-30.0, 10.0, 5.0, 20.0],    # Sticks out at the top.
      [30.0, 45.0, 80.0, 90.0],    # Bottom-right corner.
      [10.0, -40.0, 30.0, 2.0],    # Left edge.
      [20.0, 20.0, 20.4, 20.4],    # Less than a pixel.
      [100.0, 100.0, 120.0, 130.0],  # Outside the image.
      [0.0, 0.0, 36.0, 52.0],
      [-1e3, -1e3, 1e3, 1e3],      # Far larger than the image.
      [-20.0, -20.0, -1.0, -1.0],  # Reaches one pixel in: a 1x1 window.
  ])
  expected = _old_path(masks, boxes, height, width)
  assert mask_paste.paste_and_encode(masks, boxes, height, width) == expected
  assert expected[6]["counts"] == expected[1]["counts"]  # Both empty.
  assert mask_paste.paste_and_encode(np.zeros([0, 16, 16]), np.zeros([0, 4]),
                                     5, 5) == []
  with pytest.raises(ValueError, match="N, 4"):
    mask_paste.paste_and_encode(masks, boxes[:3], height, width)


def test_window_counts_match_pycocotools_encode():
  rng = np.random.default_rng(11)
  for trial in range(200):
    height, width = rng.integers(1, 40, 2)
    h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
    y_lo, x_lo = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
    window = rng.uniform(size=[h, w]) < rng.uniform(0.05, 0.95)
    if trial % 4 == 0:
      window[:] = True  # Whole columns of ones.
    full = np.zeros([height, width], np.uint8, order="F")
    full[y_lo:y_lo + h, x_lo:x_lo + w] = window
    counts = mask_paste.window_rle_counts(window, y_lo, x_lo, height, width)
    assert counts.sum() == height * width
    assert (counts[1:] > 0).all()  # Only the first run may be empty.
    rle = mask_api.frPyObjects(
        [{"size": [int(height), int(width)], "counts": counts}],
        int(height), int(width))[0]
    assert rle == mask_api.encode(full), (trial, counts)
  with pytest.raises(ValueError, match="not inside"):
    mask_paste.window_rle_counts(np.ones([3, 3], bool), 8, 0, 10, 10)


def test_paste_and_encode_equals_full_size_paste_on_real_predictions(
    val_coco, evalkit):
  """coco_tiny160 val: masks sampled from real objects, boxes jittered."""
  image_ids = sorted(val_coco.getImgIds())[:24]
  detections = evalkit.fixed_detections(val_coco, image_ids, seed=3)
  checked = 0
  for predictions, groundtruths in evalkit.batches(val_coco, image_ids,
                                                   detections, 8):
    outer = coco_utils.boxes_to_original(predictions["detection_outer_boxes"],
                                         predictions["image_info"])
    for b in range(8):
      n = int(predictions["num_detections"][b])
      height = int(groundtruths["height"][b])
      width = int(groundtruths["width"][b])
      masks = predictions["detection_masks"][b, :n]
      assert mask_paste.paste_and_encode(
          masks, outer[b, :n], height, width) == _old_path(
              masks, outer[b, :n], height, width)
      checked += n
  assert checked > 100
