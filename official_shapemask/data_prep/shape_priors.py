"""Shape priors for ShapeMask: k-means centroids of box-normalised masks.

No public ShapeMask release ships the generator of its prior file
(reference §5.1), so this module implements the recipe the reference
recommends, with numpy, pycocotools and OpenCV only (no TensorFlow):

1. Every non-crowd instance of a COCO annotation file is turned into a soft
   ``S x S`` mask in its TIGHT-box frame (the box spanned by the mask itself
   fills the grid). Polygons are rasterised directly in the box frame at
   ``4 S x 4 S`` and area-averaged down to ``S x S`` (each value is the covered
   fraction of the cell, in [0, 1]); RLE masks are decoded, cropped to their
   extent and area-resized. Masks are held as uint8 (1/255 steps).
2. Per category (or over all instances with ``class_agnostic``), k-means with
   K clusters: k-means++ seeding then Lloyd iterations, in numpy, seeded by
   ``(seed, category id)``, so the result is bitwise reproducible.
3. Clusters are ordered by size, largest first (equal sizes: the centre
   closest to the class mean first), so prior 0 is the dominant shape of the
   class.

Fill rules (also printed by ``tools/generate_shape_priors.py --help``):

* a category with ``n >= K`` instances: its K k-means centroids;
* a category with ``1 <= n < K`` instances: the class mean mask, then the
  ``n`` instances (closest to the class mean first), then their left-right
  mirror images (the training pipeline flips images, so these are shapes the
  model sees), this sequence repeated until K slots are filled;
* a category with no instance, row 0 (background) and every id unused by the
  annotation file: K copies of the mean mask of all instances.

The output array is float32 ``[num_classes, K, S, S]`` with the row index equal
to the raw category id (COCO: ``[91, 20, 32, 32]``, the layout of the
reference's ``kmeans_class_priors_91x20x32x32.npy``), or ``[1, K, S, S]`` in
class-agnostic mode.
"""

import io
import json
import os
import tempfile

import cv2
import numpy as np
from pycocotools import mask as mask_api

# Polygons are rasterised at this multiple of the prior size, then
# area-averaged, which gives soft coverage values.
_SUPERSAMPLE = 4
_CHUNK = 16384


def _polygon_parts(segmentation):
  return [np.asarray(p, np.float64) for p in segmentation if len(p) >= 6]


def _polygon_mask(parts, prior_size):
  """Rasterises polygon parts into the tight-box frame; None if degenerate."""
  xs = np.concatenate([p[0::2] for p in parts])
  ys = np.concatenate([p[1::2] for p in parts])
  x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
  if x1 - x0 < 1e-3 or y1 - y0 < 1e-3:
    return None
  res = prior_size * _SUPERSAMPLE
  scaled = []
  for part in parts:
    part = part.copy()
    part[0::2] = (part[0::2] - x0) / (x1 - x0) * res
    part[1::2] = (part[1::2] - y0) / (y1 - y0) * res
    # pycocotools counts a pixel as inside when its integer corner point is;
    # the half-pixel shift samples pixel centres instead.
    scaled.append((part - 0.5).tolist())
  rle = mask_api.merge(mask_api.frPyObjects(scaled, res, res))
  fine = mask_api.decode(rle).astype(np.float32)
  if not fine.any():
    return None
  return cv2.resize(fine, (prior_size, prior_size),
                    interpolation=cv2.INTER_AREA)


def _rle_mask(segmentation, height, width, prior_size):
  """Decodes an RLE mask, crops it to its extent; None if empty."""
  if isinstance(segmentation.get('counts'), list):
    segmentation = mask_api.frPyObjects(segmentation, height, width)
  full = mask_api.decode(segmentation)
  rows = np.flatnonzero(full.any(axis=1))
  cols = np.flatnonzero(full.any(axis=0))
  if rows.size == 0:
    return None
  crop = full[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
  return cv2.resize(crop, (prior_size, prior_size),
                    interpolation=cv2.INTER_AREA)


def _load_annotations(annotation_file):
  annotation_file = os.fspath(annotation_file)
  if not os.path.isfile(annotation_file):
    raise FileNotFoundError(
        f'COCO annotation file not found: {annotation_file}')
  with open(annotation_file) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(
          f'{annotation_file} is not valid JSON: {e}') from None
  if not isinstance(data, dict) or 'annotations' not in data:
    raise ValueError(
        f'{annotation_file} has no "annotations" list; expected a COCO '
        'instances file.')
  return data


def instance_masks(annotation_file, prior_size=32):
  """Box-normalised soft masks of all non-crowd instances.

  Args:
    annotation_file: path of a COCO instances JSON.
    prior_size: int, side ``S`` of the output masks.

  Returns:
    ``(masks, category_ids, skipped)``: ``masks`` uint8 ``[n, S, S]`` with the
    covered fraction of each cell times 255 (rounded), in the tight-box frame
    of the instance; ``category_ids`` int64 ``[n]`` raw category ids;
    ``skipped`` a dict with the counts of ``'crowd'`` and ``'empty'``
    (degenerate or empty mask) annotations left out.

  Raises:
    FileNotFoundError / ValueError: naming the file, for a missing or
      malformed file; ValueError naming the annotation id for a segmentation
      that cannot be read.
  """
  data = _load_annotations(annotation_file)
  image_sizes = {
      img['id']: (img['height'], img['width']) for img in data.get(
          'images', [])
  }
  masks, category_ids = [], []
  skipped = {'crowd': 0, 'empty': 0}
  for ann in data['annotations']:
    if ann.get('iscrowd', 0):
      skipped['crowd'] += 1
      continue
    segmentation = ann.get('segmentation')
    try:
      if isinstance(segmentation, list):
        parts = _polygon_parts(segmentation)
        mask = _polygon_mask(parts, prior_size) if parts else None
      elif isinstance(segmentation, dict):
        height, width = segmentation.get('size') or image_sizes[
            ann['image_id']]
        mask = _rle_mask(segmentation, height, width, prior_size)
      else:
        raise ValueError(f'unsupported segmentation {type(segmentation)}')
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(
          f'{annotation_file}: annotation id {ann.get("id")} (image '
          f'{ann.get("image_id")}): cannot read its segmentation: '
          f'{e!r}') from None
    if mask is None:
      skipped['empty'] += 1
      continue
    masks.append(np.round(np.clip(mask, 0.0, 1.0) * 255.0).astype(np.uint8))
    category_ids.append(int(ann['category_id']))
  if masks:
    masks = np.stack(masks)
  else:
    masks = np.zeros((0, prior_size, prior_size), np.uint8)
  return masks, np.asarray(category_ids, np.int64), skipped


def _squared_distances(x, x_norms, centers):
  """``[n, k]`` float64 squared distances; float32 products, in row chunks."""
  centers32 = centers.astype(np.float32)
  center_norms = np.sum(centers * centers, axis=1)
  out = np.empty((x.shape[0], centers.shape[0]), np.float64)
  for start in range(0, x.shape[0], _CHUNK):
    products = x[start:start + _CHUNK] @ centers32.T
    d = (x_norms[start:start + _CHUNK, None] - 2.0 * products +
         center_norms[None, :])
    out[start:start + _CHUNK] = np.maximum(d, 0.0)
  return out


def kmeans(x, num_clusters, rng, max_iterations=100):
  """k-means++ seeding and Lloyd iterations.

  Args:
    x: float ``[n, d]`` with ``n >= num_clusters`` (used as float32).
    num_clusters: int K >= 1.
    rng: ``np.random.Generator`` used for the seeding (the only randomness).
    max_iterations: int, cap on Lloyd iterations; they stop earlier when the
      assignment no longer changes.

  Returns:
    ``(centers, counts)``: float64 ``[K, d]`` and int64 ``[K]`` cluster sizes,
    in the order found (not sorted). An emptied cluster is re-seeded with the
    point farthest from its centre; if the data have fewer than K distinct
    points, duplicate centres with count 0 can remain.
  """
  x = np.ascontiguousarray(x, np.float32)
  n = x.shape[0]
  if n < num_clusters:
    raise ValueError(f'kmeans needs at least {num_clusters} points, got {n}.')
  x_norms = np.einsum('ij,ij->i', x, x).astype(np.float64)
  centers = np.empty((num_clusters, x.shape[1]), np.float64)
  centers[0] = x[rng.integers(n)]
  closest = _squared_distances(x, x_norms, centers[:1])[:, 0]
  for j in range(1, num_clusters):
    total = closest.sum()
    if total > 0.0:
      index = rng.choice(n, p=closest / total)
    else:  # Every point coincides with a centre already.
      index = rng.integers(n)
    centers[j] = x[index]
    closest = np.minimum(
        closest, _squared_distances(x, x_norms, centers[j:j + 1])[:, 0])
  assignment = None
  for _ in range(max_iterations):
    distances = _squared_distances(x, x_norms, centers)
    new_assignment = np.argmin(distances, axis=1)
    counts = np.bincount(new_assignment, minlength=num_clusters)
    for j in np.flatnonzero(counts == 0):
      own = distances[np.arange(n), new_assignment]
      farthest = int(np.argmax(own))
      if own[farthest] <= 0.0:
        break
      counts[new_assignment[farthest]] -= 1
      new_assignment[farthest] = j
      counts[j] = 1
      distances[farthest] = 0.0
    if assignment is not None and np.array_equal(new_assignment, assignment):
      break
    assignment = new_assignment
    sums = np.zeros_like(centers)
    for start in range(0, n, _CHUNK):
      labels = assignment[start:start + _CHUNK]
      one_hot = np.zeros((labels.size, num_clusters), np.float32)
      one_hot[np.arange(labels.size), labels] = 1.0
      sums += one_hot.T @ x[start:start + _CHUNK]
    filled = counts > 0
    centers[filled] = sums[filled] / counts[filled, None]
  counts = np.bincount(assignment, minlength=num_clusters)
  return centers, counts


def _class_priors(masks_u8, num_clusters, rng, max_iterations):
  """K priors ``[K, S, S]`` float32 for one class's uint8 masks."""
  n, size, _ = masks_u8.shape
  flat = masks_u8.reshape(n, -1).astype(np.float32) / 255.0
  mean = flat.mean(axis=0, dtype=np.float64)
  if n >= num_clusters:
    centers, counts = kmeans(flat, num_clusters, rng, max_iterations)
    # Largest cluster first; equal sizes: the centre closest to the class
    # mean first.
    closeness = np.sum((centers - mean)**2, axis=1)
    order = np.lexsort((closeness, -counts))
    priors = centers[order]
    method = 'kmeans'
  else:
    by_closeness = np.argsort(
        np.sum((flat.astype(np.float64) - mean)**2, axis=1), kind='stable')
    ordered = flat[by_closeness].astype(np.float64).reshape(n, size, size)
    sequence = np.concatenate([
        mean.reshape(1, size, size), ordered, ordered[:, :, ::-1]
    ]).reshape(2 * n + 1, -1)
    priors = sequence[np.arange(num_clusters) % sequence.shape[0]]
    method = 'fill'
  return np.clip(priors, 0.0, 1.0).reshape(num_clusters, size,
                                           size).astype(np.float32), method


def compute_shape_priors(annotation_file,
                         num_clusters=20,
                         prior_size=32,
                         class_agnostic=False,
                         seed=0,
                         num_classes=None,
                         max_iterations=100):
  """Shape priors from a COCO instances file (see the module docstring).

  Args:
    annotation_file: path of a COCO instances JSON (train split).
    num_clusters: int K >= 1, priors per class. Default 20.
    prior_size: int S >= 1, side of each prior. Default 32.
    class_agnostic: bool; True clusters all instances together and returns
      one row. Default False.
    seed: int >= 0; with the same file and arguments the output is bitwise
      identical.
    num_classes: int or None, number of rows; default: the largest category
      id (of ``categories`` and ``annotations``) + 1 (COCO: 91).
    max_iterations: int, cap on Lloyd iterations per class.

  Returns:
    ``(priors, summary)``. ``priors``: float32 ``[num_classes, K, S, S]`` in
    [0, 1], row = raw category id, prior 0 = largest cluster (or ``[1, K, S,
    S]`` when ``class_agnostic``). ``summary``: dict with
    ``instances_per_class`` ``{category id: n}`` (every category of the file,
    0 included), ``method_per_class`` ``{category id: 'kmeans' | 'fill' |
    'global_mean'}``, ``category_names`` ``{id: name}``, ``num_instances``,
    ``num_crowd_skipped``, ``num_empty_skipped``, ``num_classes``,
    ``num_clusters``, ``prior_size``, ``class_agnostic``, ``seed``,
    ``annotation_file``.

  Raises:
    FileNotFoundError / ValueError naming the file or setting: missing or
    malformed file, no usable instance, bad K / S / seed, ``num_classes`` too
    small for the file's category ids.
  """
  for name, value in (('num_clusters', num_clusters),
                      ('prior_size', prior_size),
                      ('max_iterations', max_iterations)):
    if int(value) != value or value < 1:
      raise ValueError(f'{name} must be a positive integer, got {value!r}.')
  if int(seed) != seed or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}.')
  num_clusters, prior_size, seed = int(num_clusters), int(prior_size), int(
      seed)
  data = _load_annotations(annotation_file)
  categories = {
      int(c['id']): str(c.get('name', c['id']))
      for c in data.get('categories', [])
  }
  masks_u8, category_ids, skipped = instance_masks(annotation_file,
                                                   prior_size)
  if masks_u8.shape[0] == 0:
    raise ValueError(
        f'{annotation_file}: no non-crowd instance with a non-empty mask; '
        'cannot compute shape priors.')
  all_ids = set(categories) | set(category_ids.tolist())
  max_id = max(all_ids)
  if min(all_ids) < 0:
    raise ValueError(
        f'{annotation_file}: negative category id {min(all_ids)}.')
  if num_classes is None:
    num_classes = max_id + 1
  elif int(num_classes) != num_classes or num_classes < max_id + 1:
    raise ValueError(
        f'num_classes = {num_classes!r} is too small or not an integer: '
        f'{annotation_file} uses '
        f'category id {max_id}, which needs num_classes >= {max_id + 1}.')
  num_classes = int(num_classes)
  # Masks stay uint8 (COCO train: ~0.9 GB); classes are converted one at a
  # time.
  global_mean = np.clip(
      masks_u8.mean(axis=0, dtype=np.float64) / 255.0, 0.0, 1.0)
  counts = {cid: int(np.sum(category_ids == cid)) for cid in sorted(all_ids)}
  methods = {}
  if class_agnostic:
    rng = np.random.default_rng([seed, 0])
    row, _ = _class_priors(masks_u8, num_clusters, rng, max_iterations)
    priors = row[None]
  else:
    priors = np.broadcast_to(
        global_mean.astype(np.float32),
        (num_classes, num_clusters, prior_size, prior_size)).copy()
    for cid in sorted(all_ids):
      if counts[cid] == 0:
        methods[cid] = 'global_mean'
        continue
      rng = np.random.default_rng([seed, cid])
      priors[cid], methods[cid] = _class_priors(masks_u8[category_ids == cid],
                                                num_clusters, rng,
                                                max_iterations)
  summary = {
      'annotation_file': os.fspath(annotation_file),
      'num_classes': int(priors.shape[0]),
      'num_clusters': num_clusters,
      'prior_size': prior_size,
      'class_agnostic': bool(class_agnostic),
      'seed': seed,
      'num_instances': int(masks_u8.shape[0]),
      'num_crowd_skipped': skipped['crowd'],
      'num_empty_skipped': skipped['empty'],
      'instances_per_class': counts,
      'method_per_class': methods,
      'category_names': {cid: categories.get(cid, str(cid))
                         for cid in sorted(all_ids)},
  }
  return priors, summary


def format_summary(summary):
  """Human-readable lines (a list of str) for a ``compute_shape_priors`` summary."""
  lines = [
      f"{summary['annotation_file']}: {summary['num_instances']} instances "
      f"used ({summary['num_crowd_skipped']} crowd and "
      f"{summary['num_empty_skipped']} empty skipped); priors "
      f"[{summary['num_classes']}, {summary['num_clusters']}, "
      f"{summary['prior_size']}, {summary['prior_size']}]"
      + (' class-agnostic' if summary['class_agnostic'] else '')
  ]
  lines.append(f"{'id':>4}  {'category':<20} {'instances':>9}  priors")
  for cid, n in summary['instances_per_class'].items():
    method = summary['method_per_class'].get(
        cid, 'pooled' if summary['class_agnostic'] else '-')
    name = summary['category_names'].get(cid, str(cid))
    lines.append(f'{cid:>4}  {name:<20} {n:>9}  {method}')
  return lines


def _write_atomic(path, data, suffix):
  """Writes bytes to ``path`` through a temporary file in the same folder."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tmp_', suffix=suffix, dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates the file as 0600.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def save_array_atomic(array, path):
  """Writes ``array`` to ``path`` as ``.npy`` via a temporary file + rename."""
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array), allow_pickle=False)
  _write_atomic(path, buffer.getvalue(), '.npy')


def save_prior_grid_png(priors, path, category_names=None, class_ids=None,
                        cell_scale=2):
  """Writes a PNG grid of priors: one row per class, K columns.

  Args:
    priors: float ``[C, K, S, S]`` in [0, 1].
    path: output PNG path (written to a temporary name, then renamed).
    category_names: optional ``{class id: name}``; used for row labels and,
      when ``class_ids`` is None, to choose the rows (ids < C, sorted).
    class_ids: optional sequence of rows to draw; default: the keys of
      ``category_names``, else every row.
    cell_scale: int, each prior pixel becomes ``cell_scale`` pixels.

  Returns:
    ``(height, width)`` of the written image. Priors are drawn white = 1.
  """
  priors = np.asarray(priors, np.float32)
  if priors.ndim != 4:
    raise ValueError(f'priors must be [C, K, S, S], got {priors.shape}.')
  num_rows_all, k, size, _ = priors.shape
  if class_ids is None:
    class_ids = (sorted(c for c in category_names if 0 <= c < num_rows_all)
                 if category_names else range(num_rows_all))
  class_ids = [int(c) for c in class_ids]
  if not class_ids:
    raise ValueError('save_prior_grid_png: no class to draw.')
  for c in class_ids:
    if not 0 <= c < num_rows_all:
      raise ValueError(
          f'save_prior_grid_png: class id {c} is outside the {num_rows_all} '
          'rows of the priors.')
  cell = size * cell_scale
  gap = 2
  label_width = 150
  height = len(class_ids) * (cell + gap) + gap
  width = label_width + k * (cell + gap) + gap
  canvas = np.full((height, width), 64, np.uint8)
  for r, cid in enumerate(class_ids):
    top = gap + r * (cell + gap)
    name = (category_names or {}).get(cid, '')
    label = f'{cid} {name}'[:22]
    cv2.putText(canvas, label, (4, top + cell // 2 + 4),
                cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1, cv2.LINE_AA)
    for j in range(k):
      tile = np.round(np.clip(priors[cid, j], 0, 1) * 255).astype(np.uint8)
      tile = cv2.resize(tile, (cell, cell), interpolation=cv2.INTER_NEAREST)
      left = label_width + gap + j * (cell + gap)
      canvas[top:top + cell, left:left + cell] = tile
  ok, encoded = cv2.imencode('.png', canvas)
  if not ok:
    raise ValueError(f'could not encode the prior grid for {path}')
  _write_atomic(path, encoded.tobytes(), '.png')
  return height, width
