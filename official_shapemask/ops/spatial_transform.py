"""Bilinear resampling for the ShapeMask mask branch (keras.ops only).

Two operations, both with static output shapes and implemented as integer
gathers plus a weighted 2x2 average, so that they trace under XLA on every
backend:

- ``multilevel_crop_and_resize``: RoIAlign-style pooling of box features from
  the FPN level chosen by the box size (reference spec section 5.2).
- ``crop_mask_in_target_box``: resample an ``[m, m]`` mask defined in one box
  into the frame of another box (reference spec section 5.3), used to move
  shape priors from the tight-box frame into the outer-box frame.

Boxes are ``[ymin, xmin, ymax, xmax]`` in pixels of the padded canvas.

Both follow the reference's bilinear rule: for a sample coordinate ``y`` the
neighbours are ``y0 = clip(floor(y), 0, bound)`` and ``y1 = min(y0 + 1,
bound)``, and the weights are ``1 - (y - y0)`` and ``y - y0``, computed from
the clamped ``y0``. Above the upper bound this reproduces the edge value;
below zero it extrapolates linearly from the first two rows, exactly as the
reference does.
"""

import math

from keras import ops

# Guards the divisions by the tight-box size in `crop_mask_in_target_box`
# (padded instance slots have all-zero boxes); same value as the reference.
_BOX_EPSILON = 1e-8
# Box-size level assignment: canonical size 224 maps to level 4.
_CANONICAL_SIZE = 224.0
_CANONICAL_LEVEL = 4.0


def _dim(x, axis):
  """Static size of `axis` when known, else the dynamic size."""
  size = x.shape[axis]
  return size if size is not None else ops.shape(x)[axis]


def _axis_samples(start, extent, output_size, sample_offset, bound):
  """Neighbour indices and weights along one axis.

  Args:
    start: float32 ``[B, N]`` grid origin.
    extent: float32 ``[B, N]`` grid extent (the box size in grid units).
    output_size: int, number of samples.
    sample_offset: float, sample ``i`` lies at
      ``start + (i + sample_offset) * extent / output_size``.
    bound: float32 ``[B, N]`` (or scalar) largest valid index.

  Returns:
    ``(i0, i1, w0, w1)``: int32 indices and float32 weights, each
    ``[B, N, output_size]``.
  """
  steps = ops.arange(output_size, dtype="float32") + sample_offset
  grid = (start[..., None] +
          steps * extent[..., None] / float(output_size))
  # Non-finite boxes (from a diverged model at inference) must not become
  # out-of-range gather indices: they sample position 0 instead.
  grid = ops.where(ops.isnan(grid), ops.zeros_like(grid), grid)
  if not isinstance(bound, (int, float)):
    bound = bound[..., None]
  low = ops.minimum(ops.maximum(ops.floor(grid), 0.0), bound)
  high = ops.minimum(low + 1.0, bound)
  w1 = grid - low
  w0 = 1.0 - w1
  return (ops.cast(low, "int32"), ops.cast(high, "int32"), w0, w1)


def _gather_bilinear(flat_values, base, row_stride, y_samples, x_samples):
  """Gathers the 4 neighbours of every grid point and averages them.

  Args:
    flat_values: ``[M, C]`` values; row ``base + y * row_stride + x`` holds
      position (y, x) of the map a box samples from.
    base: int32 ``[B, N]`` flat offset of each box's map.
    row_stride: int32 ``[B, N]`` width of each box's map.
    y_samples: ``_axis_samples`` output for rows.
    x_samples: ``_axis_samples`` output for columns.

  Returns:
    ``[B, N, m_y, m_x, C]`` in the dtype of `flat_values`.
  """
  y0, y1, wy0, wy1 = y_samples
  x0, x1, wx0, wx1 = x_samples
  base = base[:, :, None, None]
  row_stride = row_stride[:, :, None, None]
  batch = _dim(y0, 0)
  num_boxes = _dim(y0, 1)
  size_y = y0.shape[2]
  size_x = x0.shape[2]
  channels = flat_values.shape[-1]
  dtype = flat_values.dtype

  def corner(yi, xi, wy, wx):
    index = base + yi[:, :, :, None] * row_stride + xi[:, :, None, :]
    values = ops.take(flat_values, ops.reshape(index, (-1,)), axis=0)
    values = ops.reshape(values, (batch, num_boxes, size_y, size_x, channels))
    weight = wy[:, :, :, None] * wx[:, :, None, :]
    return values * ops.cast(weight, dtype)[..., None]

  return (corner(y0, x0, wy0, wx0) + corner(y0, x1, wy0, wx1) +
          corner(y1, x0, wy1, wx0) + corner(y1, x1, wy1, wx1))


def _pyramid_levels(features):
  """Maps int level -> dict key; checks that the levels are contiguous."""
  if not features:
    raise ValueError("multilevel_crop_and_resize: `features` is empty.")
  keys = {int(key): key for key in features}
  levels = sorted(keys)
  if levels != list(range(levels[0], levels[-1] + 1)):
    raise ValueError(
        "multilevel_crop_and_resize: feature levels must be contiguous, got "
        f"{levels}.")
  return keys, levels


def assign_pyramid_levels(boxes, min_level, max_level):
  """FPN level of each box: ``floor(log2(sqrt(h * w) / 224)) + 4``, clamped.

  Args:
    boxes: float ``[B, N, 4]`` boxes in canvas pixels.
    min_level: int, lowest available level.
    max_level: int, highest available level.

  Returns:
    int32 ``[B, N]`` levels in ``[min_level, max_level]``.
  """
  boxes = ops.cast(boxes, "float32")
  height = boxes[..., 2] - boxes[..., 0]
  width = boxes[..., 3] - boxes[..., 1]
  # Degenerate (e.g. padded, all-zero) boxes land on min_level; the floor
  # keeps log(0) finite so no inf/NaN reaches the cast.
  area_sqrt = ops.sqrt(ops.maximum(height * width, 1e-8))
  level = ops.floor(ops.log(area_sqrt / _CANONICAL_SIZE) / math.log(2.0))
  level = ops.clip(level + _CANONICAL_LEVEL, float(min_level),
                   float(max_level))
  return ops.cast(level, "int32")


def multilevel_crop_and_resize(features, boxes, output_size=32):
  """RoIAlign crops of FPN features, one level per box.

  Each box is assigned the level ``floor(log2(sqrt(w * h) / 224)) + 4``
  clamped to the levels present in `features`, divided by ``2**level`` and
  sampled on an ``output_size x output_size`` grid with one bilinear sample
  per bin at ``y0 + (i + 0.5) * h / output_size`` (no half-pixel shift of the
  feature grid); neighbour indices are clamped to ``[0, size_l - 1]``.

  All levels are flattened into one ``[B * sum(H_l * W_l), C]`` table and
  sampled with four gathers, so the op has static shapes and no per-level
  control flow.

  Args:
    features: dict ``{level: [B, H_l, W_l, C]}``; keys are ints or strings
      of ints (``'3'`` .. ``'7'``), levels contiguous, same C everywhere.
    boxes: float ``[B, N, 4]`` boxes in canvas pixels.
    output_size: int, crop side ``m``.

  Returns:
    ``[B, N, m, m, C]`` in the dtype of the features.
  """
  keys, levels = _pyramid_levels(features)
  min_level, max_level = levels[0], levels[-1]
  first = features[keys[min_level]]
  channels = first.shape[-1]
  batch = _dim(first, 0)

  flat, heights, widths, offsets = [], [], [], []
  offset = 0
  for level in levels:
    feature = features[keys[level]]
    height, width = feature.shape[1], feature.shape[2]
    if feature.shape[-1] != channels:
      raise ValueError(
          "multilevel_crop_and_resize: all levels need the same channels; "
          f"level {min_level} has {channels}, level {level} has "
          f"{feature.shape[-1]}.")
    flat.append(ops.reshape(feature, (batch, height * width, channels)))
    heights.append(height)
    widths.append(width)
    offsets.append(offset)
    offset += height * width
  per_image = offset
  table = ops.reshape(ops.concatenate(flat, axis=1), (-1, channels))

  boxes = ops.cast(boxes, "float32")
  level = assign_pyramid_levels(boxes, min_level, max_level)
  level_index = level - min_level
  scale = ops.power(2.0, ops.cast(level, "float32"))
  ymin = boxes[..., 0] / scale
  xmin = boxes[..., 1] / scale
  box_h = (boxes[..., 2] - boxes[..., 0]) / scale
  box_w = (boxes[..., 3] - boxes[..., 1]) / scale

  bound_y = ops.take(
      ops.convert_to_tensor([h - 1.0 for h in heights], "float32"),
      level_index)
  bound_x = ops.take(
      ops.convert_to_tensor([w - 1.0 for w in widths], "float32"),
      level_index)
  row_stride = ops.take(ops.convert_to_tensor(widths, "int32"), level_index)
  level_offset = ops.take(ops.convert_to_tensor(offsets, "int32"),
                          level_index)
  num_batch = _dim(boxes, 0)
  image_offset = ops.arange(num_batch, dtype="int32")[:, None] * per_image
  base = image_offset + level_offset

  y_samples = _axis_samples(ymin, box_h, output_size, 0.5, bound_y)
  x_samples = _axis_samples(xmin, box_w, output_size, 0.5, bound_x)
  return _gather_bilinear(table, base, row_stride, y_samples, x_samples)


def crop_mask_in_target_box(masks, boxes, target_boxes, output_size=None,
                            sample_offset=0.0):
  """Resamples masks defined in `boxes` into the frame of `target_boxes`.

  The ``[h, w]`` mask is padded with 2 zeros on each side, then sampled
  bilinearly on an ``output_size`` grid with origin
  ``((t_y0 - b_y0) * h / h_b + 2, (t_x0 - b_x0) * w / w_b + 2)`` and extent
  ``(h_t * h / h_b, w_t * w / w_b)`` (padded-mask pixels); sample ``i`` lies
  at ``origin + (i + sample_offset) * extent / output_size`` with the
  reference's offset 0, indices clamped to the padded mask. ``h_b`` and
  ``w_b`` get ``+1e-8`` so all-zero (padded) boxes stay finite.

  Args:
    masks: ``[B, N, h, w]`` masks in the frame of `boxes`.
    boxes: float ``[B, N, 4]`` boxes the masks are defined in (tight boxes).
    target_boxes: float ``[B, N, 4]`` boxes of the output frame (outer boxes).
    output_size: int, output side; defaults to the mask height.
    sample_offset: float in [0, 1], sub-pixel offset of the samples.

  Returns:
    ``[B, N, output_size, output_size]`` in the dtype of `masks`.
  """
  dtype = masks.dtype
  batch = _dim(masks, 0)
  num_masks = _dim(masks, 1)
  height, width = masks.shape[2], masks.shape[3]
  if output_size is None:
    output_size = height
  padded = ops.pad(ops.cast(masks, "float32"), ((0, 0), (0, 0), (2, 2), (2, 2)))
  padded_h, padded_w = height + 4, width + 4
  table = ops.reshape(padded, (-1, 1))

  boxes = ops.cast(boxes, "float32")
  target_boxes = ops.cast(target_boxes, "float32")
  box_h = boxes[..., 2] - boxes[..., 0] + _BOX_EPSILON
  box_w = boxes[..., 3] - boxes[..., 1] + _BOX_EPSILON
  start_y = (target_boxes[..., 0] - boxes[..., 0]) * height / box_h + 2.0
  start_x = (target_boxes[..., 1] - boxes[..., 1]) * width / box_w + 2.0
  extent_y = (target_boxes[..., 2] - target_boxes[..., 0]) * height / box_h
  extent_x = (target_boxes[..., 3] - target_boxes[..., 1]) * width / box_w

  instance = ops.reshape(
      ops.arange(batch * num_masks, dtype="int32"), (batch, num_masks))
  base = instance * (padded_h * padded_w)
  row_stride = ops.full((batch, num_masks), padded_w, dtype="int32")
  y_samples = _axis_samples(start_y, extent_y, output_size, sample_offset,
                            float(padded_h - 1))
  x_samples = _axis_samples(start_x, extent_x, output_size, sample_offset,
                            float(padded_w - 1))
  cropped = _gather_bilinear(table, base, row_stride, y_samples, x_samples)
  return ops.cast(cropped[..., 0], dtype)
