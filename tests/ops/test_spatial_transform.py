"""Golden and reference checks of the mask-branch resampling ops (§5.2, §5.3)."""
import math

import numpy as np
import pytest
from keras import ops

from official_shapemask.ops import spatial_transform as st

CANVAS = 512


def _np(x):
  return ops.convert_to_numpy(x)


def _coordinate_pyramid(batch=1, levels=range(3, 8)):
  """Channel 0 = row index, 1 = column index, 2 = 100 * level."""
  features = {}
  for level in levels:
    size = CANVAS // 2**level
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    level_map = np.stack([rows, cols, np.full_like(rows, 100 * level)], -1)
    features[str(level)] = np.broadcast_to(
        level_map, (batch,) + level_map.shape).astype(np.float32)
  return features


def _bilinear_axis(coord, bound):
  """Reference rule: clamped floor neighbours, weights from the clamped y0."""
  low = min(max(math.floor(coord), 0), bound)
  high = min(low + 1, bound)
  return low, high, 1.0 - (coord - low), coord - low


def _numpy_multilevel_crop(features, boxes, size):
  """Loop re-implementation of §5.2 for random-input comparisons."""
  levels = sorted(int(k) for k in features)
  batch, num_boxes, _ = boxes.shape
  channels = features[str(levels[0])].shape[-1]
  out = np.zeros((batch, num_boxes, size, size, channels), np.float64)
  for b in range(batch):
    for n in range(num_boxes):
      y0, x0, y1, x1 = boxes[b, n].astype(np.float64)
      side = math.sqrt(max((y1 - y0) * (x1 - x0), 1e-8))
      level = math.floor(math.log2(side / 224.0)) + 4
      level = min(max(level, levels[0]), levels[-1])
      fmap = features[str(level)][b].astype(np.float64)
      stride = 2.0**level
      for i in range(size):
        yy = y0 / stride + (i + 0.5) * ((y1 - y0) / stride) / size
        ya, yb, wya, wyb = _bilinear_axis(yy, fmap.shape[0] - 1)
        for j in range(size):
          xx = x0 / stride + (j + 0.5) * ((x1 - x0) / stride) / size
          xa, xb, wxa, wxb = _bilinear_axis(xx, fmap.shape[1] - 1)
          out[b, n, i, j] = (wya * wxa * fmap[ya, xa] + wya * wxb * fmap[ya, xb]
                             + wyb * wxa * fmap[yb, xa] +
                             wyb * wxb * fmap[yb, xb])
  return out


def _numpy_crop_mask(masks, boxes, targets, size):
  """Loop re-implementation of §5.3 (offset 0, 2-pixel zero padding)."""
  batch, num, height, width = masks.shape
  out = np.zeros((batch, num, size, size), np.float64)
  for b in range(batch):
    for n in range(num):
      padded = np.pad(masks[b, n].astype(np.float64), 2)
      by0, bx0, by1, bx1 = boxes[b, n].astype(np.float64)
      ty0, tx0, ty1, tx1 = targets[b, n].astype(np.float64)
      bh, bw = by1 - by0 + 1e-8, bx1 - bx0 + 1e-8
      oy, ox = (ty0 - by0) * height / bh + 2, (tx0 - bx0) * width / bw + 2
      ey, ex = (ty1 - ty0) * height / bh, (tx1 - tx0) * width / bw
      for i in range(size):
        ya, yb, wya, wyb = _bilinear_axis(oy + i * ey / size, height + 3)
        for j in range(size):
          xa, xb, wxa, wxb = _bilinear_axis(ox + j * ex / size, width + 3)
          out[b, n, i, j] = (wya * wxa * padded[ya, xa] +
                             wya * wxb * padded[ya, xb] +
                             wyb * wxa * padded[yb, xa] +
                             wyb * wxb * padded[yb, xb])
  return out


def _outer_box(box, scale=1.25):
  y0, x0, y1, x1 = box
  cy, cx, h, w = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0), (x1 - x0)
  return [cy - scale * h / 2, cx - scale * w / 2, cy + scale * h / 2,
          cx + scale * w / 2]


@pytest.mark.parametrize("side,level", [(224, 4), (112, 3), (448, 5),
                                        (223.5, 3), (896, 6), (1792, 7),
                                        (4000, 7), (20, 3), (0, 3)])
def test_level_assignment(side, level):
  boxes = np.array([[[10.0, 20.0, 10.0 + side, 20.0 + side]]], np.float32)
  assert int(_np(st.assign_pyramid_levels(boxes, 3, 7))[0, 0]) == level


def test_level_assignment_clamps_to_available_levels():
  boxes = np.array([[[0, 0, 1000, 1000], [0, 0, 8, 8]]], np.float32)
  np.testing.assert_array_equal(_np(st.assign_pyramid_levels(boxes, 4, 5)),
                                [[5, 4]])


@pytest.mark.parametrize("side,level", [(224, 4), (112, 3), (448, 5)])
def test_crop_pools_from_the_expected_level_with_linear_values(side, level):
  top, left = 32.0, 48.0
  boxes = np.array([[[top, left, top + side, left + side]]], np.float32)
  m = 8
  crops = _np(st.multilevel_crop_and_resize(_coordinate_pyramid(), boxes, m))
  assert crops.shape == (1, 1, m, m, 3)
  np.testing.assert_array_equal(crops[..., 2], 100.0 * level)
  # One sample per bin at y0 + (i + 0.5) * h / m in level-l pixels.
  stride = 2.0**level
  expected_rows = top / stride + (np.arange(m) + 0.5) * side / stride / m
  expected_cols = left / stride + (np.arange(m) + 0.5) * side / stride / m
  np.testing.assert_allclose(crops[0, 0, :, 0, 0], expected_rows, rtol=1e-6)
  np.testing.assert_allclose(crops[0, 0, 0, :, 1], expected_cols, rtol=1e-6)


def test_crop_of_constant_map_is_constant_even_past_the_edge():
  features = {str(l): np.full((2, CANVAS // 2**l, CANVAS // 2**l, 2), 3.5,
                              np.float32) for l in range(3, 8)}
  boxes = np.array([[[400, 450, 530, 600], [0, 0, 0, 0]],
                    [[10, 10, 60, 40], [0, 0, 512, 512]]], np.float32)
  crops = _np(st.multilevel_crop_and_resize(features, boxes, 6))
  np.testing.assert_allclose(crops, 3.5, rtol=1e-5)


def test_crop_clamps_samples_beyond_the_last_row():
  # Box reaches 64 px past the bottom of a 512 canvas: level 4 (side 224),
  # P4 has 32 rows; samples beyond row 31 read row 31.
  boxes = np.array([[[352.0, 0.0, 576.0, 224.0]]], np.float32)
  crops = _np(st.multilevel_crop_and_resize(_coordinate_pyramid(), boxes, 4))
  rows = 352 / 16 + (np.arange(4) + 0.5) * 14 / 4
  np.testing.assert_allclose(crops[0, 0, :, 0, 0], np.minimum(rows, 31.0),
                             rtol=1e-6)


def test_crop_matches_loop_reference_on_random_inputs():
  rng = np.random.default_rng(3)
  features = {str(l): rng.normal(size=(2, CANVAS // 2**l, CANVAS // 2**l, 3))
                      .astype(np.float32) for l in range(3, 8)}
  y0 = rng.uniform(0, 400, size=(2, 5))
  x0 = rng.uniform(0, 400, size=(2, 5))
  h = rng.uniform(5, 600, size=(2, 5))
  w = rng.uniform(5, 600, size=(2, 5))
  boxes = np.stack([y0, x0, np.minimum(y0 + h, 512), np.minimum(x0 + w, 512)],
                   -1).astype(np.float32)
  crops = _np(st.multilevel_crop_and_resize(features, boxes, 7))
  np.testing.assert_allclose(crops, _numpy_multilevel_crop(features, boxes, 7),
                             rtol=1e-4, atol=1e-4)


def test_crop_accepts_int_keys_and_rejects_gaps():
  features = {l: v for l, v in zip(range(3, 6), _coordinate_pyramid(
      levels=range(3, 6)).values())}
  boxes = np.array([[[0, 0, 224, 224]]], np.float32)
  crops = _np(st.multilevel_crop_and_resize(features, boxes, 2))
  np.testing.assert_array_equal(crops[..., 2], 400.0)
  with pytest.raises(ValueError, match="contiguous"):
    st.multilevel_crop_and_resize({3: features[3], 5: features[5]}, boxes, 2)


def test_ones_mask_in_outer_box_is_centred_25_6_pixel_square():
  m = 32
  box = [100.0, 140.0, 260.0, 220.0]
  outer = _outer_box(box)
  masks = np.ones((1, 1, m, m), np.float32)
  out = _np(st.crop_mask_in_target_box(
      masks, np.array([[box]], np.float32), np.array([[outer]], np.float32),
      m))[0, 0]
  # Per side 32 / 1.25 = 25.6 pixels of box: 25 full samples + 0.75 edge.
  full = np.argwhere(out > 0.999)
  assert full[:, 0].min() == 4 and full[:, 0].max() == 28
  assert full[:, 1].min() == 4 and full[:, 1].max() == 28
  np.testing.assert_allclose(out.sum(axis=0)[4:29], 25.75, rtol=1e-5)
  assert abs(np.sqrt(out.sum()) - 25.6) < 0.5
  rows, cols = np.nonzero(out)
  weights = out[rows, cols]
  centre = np.array([np.average(rows, weights=weights),
                     np.average(cols, weights=weights)])
  np.testing.assert_allclose(centre, (m - 1) / 2, atol=0.5)
  assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6


def test_crop_mask_identity_and_one_pixel_shift():
  rng = np.random.default_rng(0)
  masks = rng.uniform(size=(2, 3, 8, 8)).astype(np.float32)
  boxes = np.tile(np.array([10, 20, 50, 60], np.float32), (2, 3, 1))
  same = _np(st.crop_mask_in_target_box(masks, boxes, boxes, 8))
  np.testing.assert_allclose(same, masks, atol=1e-5)
  # Target moved down by one mask pixel (40 / 8 = 5 canvas px).
  shifted = _np(st.crop_mask_in_target_box(masks, boxes,
                                           boxes + [5, 0, 5, 0], 8))
  np.testing.assert_allclose(shifted[:, :, :-1], masks[:, :, 1:], atol=1e-5)
  np.testing.assert_allclose(shifted[:, :, -1], 0.0, atol=1e-6)


def test_crop_mask_matches_loop_reference_and_handles_padded_slots():
  rng = np.random.default_rng(1)
  masks = rng.uniform(size=(2, 3, 6, 6)).astype(np.float32)
  y0 = rng.uniform(0, 100, size=(2, 3))
  x0 = rng.uniform(0, 100, size=(2, 3))
  boxes = np.stack([y0, x0, y0 + rng.uniform(5, 50, (2, 3)),
                    x0 + rng.uniform(5, 50, (2, 3))], -1).astype(np.float32)
  targets = boxes + rng.uniform(-8, 8, size=boxes.shape).astype(np.float32)
  boxes[1, 2] = 0.0  # A padded (all-zero) slot.
  targets[1, 2] = 0.0
  out = _np(st.crop_mask_in_target_box(masks, boxes, targets, 9))
  assert out.shape == (2, 3, 9, 9) and np.all(np.isfinite(out))
  np.testing.assert_allclose(out, _numpy_crop_mask(masks, boxes, targets, 9),
                             rtol=1e-4, atol=1e-5)
