r"""A procedural COCO-format instance segmentation dataset of coloured shapes.

Six classes with distinct silhouettes (circle, square, triangle, star, cross,
ring) are drawn in saturated colours, with mild shading, over muted textured
backgrounds (gradients, stripes, checkerboards, colour blobs). Shapes are
drawn in order; a later shape hides what it covers of the earlier ones, and
every annotation holds the **visible** mask only. Each placement keeps at
least ``min_visible`` of every earlier shape visible, so no instance is
occluded beyond recognition.

Segmentations are exact: a shape left whole (and not a ring) is annotated by
the very polygon it was rasterised from (pycocotools rasterises it back to
the same pixels); an occluded shape or a ring (it has a hole) is annotated
by the compressed RLE of its visible mask. ``bbox`` is the tight box of the
visible mask and ``area`` its pixel count; ``iscrowd`` is 0.

Layout written under ``output_dir``::

  train/000000000001.png ...      val/000001000001.png ...
  annotations/instances_train.json  annotations/instances_val.json

Usage (from the repository root):

  python tools/make_synthetic_coco.py --output_dir=/tmp/shapes \
    --num_train=200 --num_val=50 --image_size=160 --seed=0

The same arguments give byte-identical files.
"""

import json
import math
import os
import sys
import time

import cv2
import numpy as np
from pycocotools import mask as mask_util

CATEGORIES = (
    {'id': 1, 'name': 'circle', 'supercategory': 'shape'},
    {'id': 2, 'name': 'square', 'supercategory': 'shape'},
    {'id': 3, 'name': 'triangle', 'supercategory': 'shape'},
    {'id': 4, 'name': 'star', 'supercategory': 'shape'},
    {'id': 5, 'name': 'cross', 'supercategory': 'shape'},
    {'id': 6, 'name': 'ring', 'supercategory': 'shape'},
)
_RING_ID = 6
_RING_INNER = 0.55  # Inner radius of the ring, relative to the outer.
# Image ids of the val split start here, so ids never clash across splits.
VAL_ID_OFFSET = 1_000_000


def _regular(num_vertices, radius=1.0, phase=0.0):
  angles = phase + 2 * np.pi * np.arange(num_vertices) / num_vertices
  return np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius


def _unit_outline(category_id):
  """Outer outline of a shape inscribed in the unit circle, ``[V, 2]`` xy."""
  if category_id in (1, _RING_ID):
    return _regular(48)
  if category_id == 2:
    return _regular(4, phase=np.pi / 4)
  if category_id == 3:
    return _regular(3, phase=-np.pi / 2)
  if category_id == 4:
    outer = _regular(5, 1.0, -np.pi / 2)
    inner = _regular(5, 0.45, -np.pi / 2 + np.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)
  if category_id == 5:
    a, b = 0.32, 0.95
    return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a],
                     [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]])
  raise ValueError(f'unknown category id {category_id}')


def _place(unit, centre, radius, angle, stretch):
  """Scales (anisotropically), rotates and moves a unit outline.

  Returns a flat COCO polygon ``[x0, y0, x1, y1, ...]`` rounded to 2
  decimals; the rounded numbers are both rasterised and written out, so the
  annotation reproduces the rendered pixels exactly.
  """
  points = unit * radius * np.array([stretch, 1.0 / stretch])
  c, s = math.cos(angle), math.sin(angle)
  points = points @ np.array([[c, s], [-s, c]]) + np.asarray(centre)
  return [round(float(v), 2) for v in points.reshape(-1)]


def _rasterise(polygon, size):
  rle = mask_util.frPyObjects([polygon], size, size)
  return mask_util.decode(rle)[..., 0].astype(bool)


def _random_shape(rng, size, size_range):
  """Draws one shape: category, polygon(s) and its full mask."""
  category_id = int(rng.integers(1, len(CATEGORIES) + 1))
  radius = 0.5 * size * rng.uniform(*size_range)
  stretch = rng.uniform(0.85, 1.18)
  reach = radius * max(stretch, 1.0 / stretch)
  centre = rng.uniform(reach, size - reach, size=2)
  angle = rng.uniform(0, 2 * np.pi)
  unit = _unit_outline(category_id)
  outer = _place(unit, centre, radius, angle, stretch)
  mask = _rasterise(outer, size)
  if category_id == _RING_ID:
    mask &= ~_rasterise(_place(unit, centre, radius * _RING_INNER, angle,
                               stretch), size)
  return {'category_id': category_id, 'polygon': outer, 'mask': mask,
          'centre': centre, 'radius': radius}


def _hsv_to_rgb(h, s, v):
  hsv = np.array([[[h * 179.0, s * 255.0, v * 255.0]]], np.float32)
  return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(
      np.float32)


def _muted(rng):
  return _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.3),
                     rng.uniform(0.25, 0.85))


def _background(rng, size):
  """A muted textured background, ``[size, size, 3]`` float32."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  c0, c1 = _muted(rng), _muted(rng)
  kind = int(rng.integers(4))
  if kind == 0:  # Linear gradient.
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / (size * math.sqrt(2))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  elif kind == 1:  # Soft stripes.
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24)
    phase = xx * math.cos(angle) + yy * math.sin(angle)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * phase / period)
  elif kind == 2:  # Checkerboard.
    cell = int(rng.integers(8, 33))
    t = ((xx // cell + yy // cell) % 2).astype(np.float32)
  else:  # Colour blobs: a coarse random grid, smoothly upsampled.
    grid = int(rng.integers(3, 7))
    coarse = np.stack([_muted(rng) for _ in range(grid * grid)])
    coarse = coarse.reshape(grid, grid, 3)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return image + rng.normal(0, 6, size=(size, size, 3)).astype(np.float32)
  t = t[..., None]
  image = c0 * (1 - t) + c1 * t
  return image + rng.normal(0, 6, size=(size, size, 3)).astype(np.float32)


def _paint(image, shape, rng):
  """Paints a shape in a saturated, gently shaded colour (in place)."""
  colour = _hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 1.0),
                       rng.uniform(0.6, 1.0))
  size = image.shape[0]
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  angle = rng.uniform(0, 2 * np.pi)
  cx, cy = shape['centre']
  ramp = ((xx - cx) * math.cos(angle) +
          (yy - cy) * math.sin(angle)) / shape['radius']
  shaded = colour + 18.0 * np.clip(ramp, -1, 1)[..., None]
  mask = shape['mask']
  image[mask] = shaded[mask]


def _make_image(rng, size, max_instances, size_range, min_visible,
                max_tries=25):
  """Renders one image; returns ``(uint8 RGB image, [shape, ...])``."""
  image = _background(rng, size)
  shapes = []
  target = int(rng.integers(1, max_instances + 1))
  for _ in range(target):
    for _ in range(max_tries):
      new = _random_shape(rng, size, size_range)
      remaining = [s['visible'] & ~new['mask'] for s in shapes]
      if all(r.sum() >= min_visible * s['mask'].sum()
             for r, s in zip(remaining, shapes)):
        break
    else:
      continue  # No placement keeps the others visible enough; skip it.
    for shape, visible in zip(shapes, remaining):
      shape['visible'] = visible
    new['visible'] = new['mask'].copy()
    _paint(image, new, rng)
    shapes.append(new)
  image += rng.normal(0, 2.5, size=image.shape).astype(np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8), shapes


def _annotation(shape, ann_id, image_id):
  visible = shape['visible']
  rle = mask_util.encode(np.asfortranarray(visible.astype(np.uint8)))
  whole = bool((visible == shape['mask']).all())
  if whole and shape['category_id'] != _RING_ID:
    segmentation = [shape['polygon']]
  else:
    segmentation = {'size': [int(s) for s in rle['size']],
                    'counts': rle['counts'].decode('ascii')}
  return {
      'id': ann_id,
      'image_id': image_id,
      'category_id': shape['category_id'],
      'segmentation': segmentation,
      'area': float(mask_util.area(rle)),
      'bbox': [float(v) for v in mask_util.toBbox(rle)],
      'iscrowd': 0,
  }


def _write_atomic(path, data):
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def _make_split(output_dir, split, num_images, image_size, seed, split_index,
                max_instances, size_range, min_visible):
  rng = np.random.default_rng(np.random.SeedSequence([seed, split_index]))
  image_dir = os.path.join(output_dir, split)
  os.makedirs(image_dir, exist_ok=True)
  id_offset = VAL_ID_OFFSET if split == 'val' else 0
  images, annotations, occluded = [], [], 0
  for index in range(num_images):
    image_id = id_offset + index + 1
    pixels, shapes = _make_image(rng, image_size, max_instances, size_range,
                                 min_visible)
    file_name = f'{image_id:012d}.png'
    ok, png = cv2.imencode('.png', cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    if not ok:
      raise RuntimeError(f'PNG encoding failed for {file_name}')
    _write_atomic(os.path.join(image_dir, file_name), png.tobytes())
    images.append({'id': image_id, 'file_name': file_name,
                   'height': image_size, 'width': image_size})
    for shape in shapes:
      annotations.append(_annotation(shape, len(annotations) + 1, image_id))
      occluded += int(not (shape['visible'] == shape['mask']).all())
  annotation_file = os.path.join(output_dir, 'annotations',
                                 f'instances_{split}.json')
  dataset = {
      'info': {'description': 'official_shapemask synthetic shapes',
               'split': split, 'seed': seed, 'image_size': image_size},
      'licenses': [],
      'images': images,
      'annotations': annotations,
      'categories': [dict(c) for c in CATEGORIES],
  }
  _write_atomic(annotation_file, json.dumps(dataset).encode('utf8'))
  return {'images': len(images), 'instances': len(annotations),
          'occluded_instances': occluded, 'image_dir': image_dir,
          'annotation_file': annotation_file}


def make_synthetic_coco(output_dir,
                        num_train=200,
                        num_val=50,
                        image_size=160,
                        seed=0,
                        max_instances=10,
                        size_range=(0.15, 0.5),
                        min_visible=0.5):
  """Writes the synthetic shapes dataset (train and val splits).

  Args:
    output_dir: root directory (created if missing).
    num_train: int, number of train images.
    num_val: int, number of val images.
    image_size: int, side of the square RGB images in pixels.
    seed: int; identical arguments give identical files. Image ``k`` of a
      split does not depend on the split's length.
    max_instances: int, each image asks for 1..max_instances shapes (a shape
      is skipped when no placement keeps the others ``min_visible``).
    size_range: ``(low, high)`` shape diameter as a fraction of image_size.
    min_visible: float, fraction of each shape's pixels that stay visible.

  Returns:
    dict with ``train`` and ``val`` (each: ``images``, ``instances``,
    ``occluded_instances``, ``image_dir``, ``annotation_file``),
    ``categories`` (list of COCO category dicts) and ``seconds``.
  """
  start = time.perf_counter()
  if image_size < 32:
    raise ValueError(f'image_size must be >= 32, got {image_size}')
  if not 0 < size_range[0] <= size_range[1] <= 1:
    raise ValueError(f'size_range must satisfy 0 < low <= high <= 1, got '
                     f'{size_range}')
  if num_train < 0 or num_val < 0 or max_instances < 1:
    raise ValueError('num_train, num_val must be >= 0, max_instances >= 1')
  os.makedirs(os.path.join(output_dir, 'annotations'), exist_ok=True)
  summary = {}
  for split_index, (split, count) in enumerate((('train', num_train),
                                                ('val', num_val))):
    summary[split] = _make_split(output_dir, split, count, image_size, seed,
                                 split_index, max_instances, size_range,
                                 min_visible)
  summary['categories'] = [dict(c) for c in CATEGORIES]
  summary['seconds'] = time.perf_counter() - start
  return summary


def _define_flags():
  """Defined on run only, so importing this module defines no global flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('output_dir', None, 'Root directory of the dataset.')
  flags.DEFINE_integer('num_train', 200, 'Number of train images.')
  flags.DEFINE_integer('num_val', 50, 'Number of val images.')
  flags.DEFINE_integer('image_size', 160, 'Side of the square images (px).')
  flags.DEFINE_integer('seed', 0, 'Random seed.')
  flags.mark_flag_as_required('output_dir')


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    summary = make_synthetic_coco(f.output_dir, num_train=f.num_train,
                                  num_val=f.num_val, image_size=f.image_size,
                                  seed=f.seed)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for split in ('train', 'val'):
    s = summary[split]
    print(f'{split}: {s["images"]} images, {s["instances"]} instances '
          f'({s["occluded_instances"]} occluded) -> {s["annotation_file"]}')
  names = ', '.join(c['name'] for c in summary['categories'])
  print(f'{len(summary["categories"])} categories ({names}); '
        f'{summary["seconds"]:.1f} s')
  return 0


def console_entry():
  """Entry point of the console script and of the tools/ launcher."""
  from official_shapemask.cli import entry  # pylint: disable=g-import-not-at-top
  _define_flags()
  entry.run(main, __name__)


if __name__ == '__main__':
  console_entry()
