"""Anchor golden numbers from the reference (§4, §14)."""
import numpy as np

from official_shapemask.ops import anchors


def test_anchor_counts_match_reference():
  assert anchors.num_anchors((1024, 1024)) == 196_416
  assert anchors.num_anchors((640, 640)) == 76_725
  assert anchors.generate_anchors((640, 640)).shape == (76_725, 4)


def test_first_level_anchor_geometry():
  boxes = anchors.generate_anchors((256, 256))
  # First location of P3: centre (4, 4); scale 0, ratio 1 -> side 32.
  np.testing.assert_allclose(boxes[0], [-12, -12, 20, 20])
  # Ratio 2.0 (width / height): wider than tall.
  h, w = boxes[1, 2] - boxes[1, 0], boxes[1, 3] - boxes[1, 1]
  np.testing.assert_allclose(w / h, 2.0, rtol=1e-6)
  # Scale 1 of P3: side 32 * 2^(1/3) = 40.3.
  np.testing.assert_allclose(boxes[3, 2] - boxes[3, 0], 32 * 2**(1 / 3),
                             rtol=1e-6)
  # Second location steps along x by the stride 8.
  np.testing.assert_allclose(boxes[9] - boxes[0], [0, 8, 0, 8])


def test_level_major_order():
  boxes = anchors.generate_anchors((256, 256), min_level=3, max_level=7)
  n3 = 32 * 32 * 9
  # The first P4 anchor is centred at 8 with side 64.
  np.testing.assert_allclose(boxes[n3], [-24, -24, 40, 40])
  # P7 base side is 512.
  np.testing.assert_allclose(boxes[-9, 2] - boxes[-9, 0], 512.0)
