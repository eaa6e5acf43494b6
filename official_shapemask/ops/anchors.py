"""RetinaNet anchor boxes, computed with numpy from static sizes.

The same function serves the TensorFlow input pipeline (anchor labelling) and
the keras.ops model (box decoding), so both agree on the anchor order:
level-major (``min_level`` first), then row y, column x, then the anchors of a
location (scale-major, then aspect ratio). Boxes are ``[ymin, xmin, ymax,
xmax]`` in pixels of the padded ``image_size`` canvas.
"""

import math

import numpy as np


def level_sizes(image_size, min_level=3, max_level=7):
  """Feature-map sizes per level.

  Args:
    image_size: ``(height, width)`` of the padded canvas.
    min_level: int, lowest pyramid level.
    max_level: int, highest pyramid level.

  Returns:
    dict ``{level: (height_l, width_l)}`` with ``ceil(size / 2**level)``.
  """
  height, width = image_size
  return {
      level: (int(math.ceil(height / 2**level)),
              int(math.ceil(width / 2**level)))
      for level in range(min_level, max_level + 1)
  }


def anchors_per_location(num_scales=3, aspect_ratios=(1.0, 2.0, 0.5)):
  """Number of anchors at one feature-map location."""
  return num_scales * len(aspect_ratios)


def generate_anchors(image_size,
                     min_level=3,
                     max_level=7,
                     num_scales=3,
                     aspect_ratios=(1.0, 2.0, 0.5),
                     anchor_size=4.0):
  """All anchors of a feature pyramid, flattened.

  Per level ``l`` the stride is ``2**l``; centres lie at
  ``stride / 2 + i * stride``; the base side of scale ``s`` is
  ``anchor_size * 2**l * 2**(s / num_scales)``; an aspect ratio ``ar``
  (width / height) gives width ``base * sqrt(ar)`` and height
  ``base / sqrt(ar)``.

  Args:
    image_size: ``(height, width)`` of the padded canvas.
    min_level: int, lowest pyramid level.
    max_level: int, highest pyramid level.
    num_scales: int, octave scales per level.
    aspect_ratios: sequence of float, width / height ratios.
    anchor_size: float, base anchor size relative to the stride.

  Returns:
    float32 array ``[A_total, 4]``, ``[ymin, xmin, ymax, xmax]``.
  """
  sizes = level_sizes(image_size, min_level, max_level)
  per_level = []
  for level in range(min_level, max_level + 1):
    stride = 2.0**level
    half_sizes = []
    for scale in range(num_scales):
      base = anchor_size * stride * 2.0**(scale / num_scales)
      for ratio in aspect_ratios:
        half_sizes.append((base / math.sqrt(ratio) / 2.0,
                           base * math.sqrt(ratio) / 2.0))
    half_sizes = np.asarray(half_sizes, np.float64)  # [A, 2] (h/2, w/2)
    height_l, width_l = sizes[level]
    ys = stride / 2.0 + np.arange(height_l) * stride
    xs = stride / 2.0 + np.arange(width_l) * stride
    cy, cx = np.meshgrid(ys, xs, indexing="ij")  # [H, W]
    cy = cy[:, :, None]
    cx = cx[:, :, None]
    boxes = np.stack([
        cy - half_sizes[:, 0], cx - half_sizes[:, 1],
        cy + half_sizes[:, 0], cx + half_sizes[:, 1]
    ], axis=-1)  # [H, W, A, 4]
    per_level.append(boxes.reshape(-1, 4))
  return np.concatenate(per_level, axis=0).astype(np.float32)


def num_anchors(image_size, min_level=3, max_level=7, num_scales=3,
                aspect_ratios=(1.0, 2.0, 0.5)):
  """Total number of anchors ``A_total`` for a canvas."""
  per_loc = anchors_per_location(num_scales, aspect_ratios)
  return sum(h * w * per_loc
             for h, w in level_sizes(image_size, min_level, max_level).values())
