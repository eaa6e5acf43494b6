"""Tests of official_shapemask.serving.visualize: enlargement, tags, sheets."""
import itertools

import cv2
import numpy as np
import pytest

from official_shapemask.serving import visualize


def _overlaps(rects):
  return [(a, b) for a, b in itertools.combinations(rects, 2)
          if min(a[2], b[2]) > max(a[0], b[0])
          and min(a[3], b[3]) > max(a[1], b[1])]


@pytest.mark.parametrize("size,minimum,scale", [
    ((160, 160), 480, 3), ((120, 160), 480, 4), ((426, 640), 480, 2),
    ((480, 640), 480, 1), ((1000, 900), 480, 1), ((160, 160), 0, 1),
    ((100, 300), 250, 3), ((3, 2000), 480, 1), ((2000, 3), 480, 1),
    ((40, 900), 480, 2), ((30, 3000), 480, 1)])
def test_drawing_scale(size, minimum, scale):
  assert visualize.drawing_scale(*size, min_short_side=minimum) == scale
  if minimum and max(size) * (scale + 1) <= visualize.MAX_LONG_SIDE:
    assert min(size) * scale >= minimum
  assert scale == 1 or max(size) * scale <= visualize.MAX_LONG_SIDE


def test_small_image_drawn_enlarged_with_replicated_masks():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, [160, 200, 3], dtype=np.uint8)
  mask = np.zeros([1, 160, 200], np.uint8)
  mask[0, 60:100, 50:120] = 1
  mask[0, 80, 130] = 1  # One isolated pixel: a 3 x 3 block when drawn.
  drawn = visualize.draw_detections(image, [[50, 40, 110, 140]], [3], [0.8],
                                    mask, mask_alpha=0.5)
  assert drawn.shape == (480, 600, 3)
  base = visualize.enlarge(image, 3)
  color = np.array(visualize.class_color(3), np.float32)
  blended = np.round(base * 0.5 + color * 0.5).astype(np.uint8)
  # Inside the mask, away from its outline: exactly the blend.
  np.testing.assert_array_equal(drawn[200:280, 170:340],
                                blended[200:280, 170:340])
  block = np.any(drawn[240:243, 390:393] != base[240:243, 390:393], axis=-1)
  assert block.all()
  # Box edge at 3x the coordinates.
  assert (drawn[150, 130:410] == visualize.class_color(3)).all()
  # Far from the detection nothing changes.
  np.testing.assert_array_equal(drawn[420:, 450:], base[420:, 450:])


def test_tags_are_legible():
  font_scale, thickness = visualize.text_style(480, 640)
  (_, text_h), _ = cv2.getTextSize("person: 0.93", cv2.FONT_HERSHEY_SIMPLEX,
                                   font_scale, thickness)
  assert text_h >= 12  # Cap height in pixels of the drawing.
  big_scale, big_thickness = visualize.text_style(1200, 1600)
  assert big_scale > font_scale and big_thickness == 2
  image = np.full([160, 160, 3], 128, np.uint8)
  drawn = visualize.draw_detections(image, [[60, 40, 120, 120]], [1], [0.93],
                                    label_map={1: "person"})
  # The tag sits above the box (scaled to y = 180): a filled bar of the class
  # colour with text that contrasts with it (white on this dark blue).
  tag = drawn[180 - text_h - 8:180, 120:200].astype(np.float64)
  color = np.array(visualize.class_color(1))
  assert (np.all(tag == color, axis=-1)).mean() > 0.5
  luma = tag @ [0.299, 0.587, 0.114]
  assert (np.abs(luma - color @ [0.299, 0.587, 0.114]) > 100).sum() > 30


def test_layout_keeps_tags_apart_where_there_is_room():
  # Three boxes with the same top-left corner: the tags go above, inside and
  # below, not on top of each other.
  boxes = [[100, 100, 200, 300], [100, 100, 250, 250], [100, 100, 180, 400]]
  sizes = [[120, 24]] * 3
  rects = visualize.layout_tags(boxes, sizes, 480, 640)
  assert not _overlaps(rects)
  # The first box served gets the preferred place: above its corner.
  assert rects[0] == (100, 76, 220, 100)
  # Order decides who gets it.
  reordered = visualize.layout_tags(boxes, sizes, 480, 640, order=[2, 0, 1])
  assert reordered[2] == (100, 76, 220, 100)
  # A box at the top edge: its tag goes inside, still within the image.
  (top,) = visualize.layout_tags([[0, 600, 50, 639]], [[120, 24]], 480, 640)
  assert top == (520, 0, 640, 24)
  # Many boxes spread over a large drawing: no two tags overlap.
  rng = np.random.default_rng(1)
  corners = rng.uniform(0, 1, [12, 2]) * [900, 1300]
  boxes = np.concatenate([corners, corners + rng.uniform(60, 200, [12, 2])],
                         axis=1)
  sizes = rng.integers(60, 160, [12, 2]) * [1, 0] + [0, 22]
  rects = visualize.layout_tags(boxes, sizes, 1200, 1600)
  assert not _overlaps(rects)
  for x0, y0, x1, y1 in rects:
    assert 0 <= x0 < x1 <= 1600 and 0 <= y0 < y1 <= 1200


def test_contact_sheet_layout():
  red = np.zeros([100, 100, 3], np.uint8)
  red[..., 0] = 255
  tall = np.zeros([200, 100, 3], np.uint8)
  tall[..., 1] = 255
  blue = np.zeros([50, 100, 3], np.uint8)
  blue[..., 2] = 255
  sheet = visualize.contact_sheet([red, tall, blue, red], columns=3,
                                  cell_size=100, gap=10)
  # 2 rows of 3 cells of 100 px, 10 px apart and from the border.
  assert sheet.shape == (2 * 110 + 10, 3 * 110 + 10, 3)
  np.testing.assert_array_equal(sheet[10:110, 10:110], red)
  # The tall image fits its cell at half width, centred.
  assert (sheet[10:110, 145:195] == [0, 255, 0]).all()
  assert (sheet[10:110, 120:144] == 255).all()
  # The flat one is centred vertically; row-major order continues below.
  assert (sheet[35:85, 230:330] == [0, 0, 255]).all()
  np.testing.assert_array_equal(sheet[120:220, 10:110], red)
  assert (sheet[120:220, 120:340] == 255).all()  # Empty cells stay blank.
  titled = visualize.contact_sheet([red, blue], columns=2, cell_size=100,
                                   gap=10, titles=["a.png", "b.png"])
  assert titled.shape[1] == 2 * 110 + 10 and titled.shape[0] > 120
  assert (titled[112:titled.shape[0] - 10, 10:110] < 128).any()  # Text.
  with pytest.raises(ValueError, match="at least one image"):
    visualize.contact_sheet([])
  with pytest.raises(ValueError, match="titles"):
    visualize.contact_sheet([red], titles=["a", "b"])
