"""COCO instance annotations -> TFRecord shards in the ShapeMask schema.

Builds on Model Garden's ``official/vision/data/create_coco_tf_record.py`` and
``tfrecord_lib``: the image feature dict, the typed feature helpers and the
PNG mask encoder are theirs, so on input both accept the records hold the same
features (tested). What this module adds:

- validation with named errors (:class:`ConversionError`): malformed JSON,
  missing / undecodable image files, image size that disagrees with the JSON,
  annotations naming an unknown image or category, malformed RLE, an image
  file listed twice under two ids (an error, not a warning: its two records
  would each claim that the other one's objects are background, and no
  choice of the converter can tell which id the user's evaluation JSON
  means);
- masks from every COCO segmentation form: polygons, uncompressed RLE and
  compressed RLE, crowd or not (Model Garden crashes on compressed RLE and on
  RLE for non-crowd instances);
- images that do not decode to 3 channels (grayscale, CMYK, RGBA, palette
  PNG, ...) are re-encoded so that ``tf.io.decode_image`` yields RGB;
- degenerate polygons, zero-area / outside boxes and masks without a pixel
  inside the image (a polygon entirely outside it) are dropped, counted and
  their annotation ids listed (the first few per reason);
- more shards than images: the shard count is capped at the image count
  (an empty shard would leave an input pipeline nothing to read), saying so;
- output that cannot be written (a read-only directory, a parent path that
  is a file) fails with a one-line error naming the path;
- atomic output: shards are written under a temporary directory inside the
  output directory and renamed only once all of them are complete;
- parallel encoding, a progress bar, a label map and a closing summary.

EXIF orientation is ignored, on purpose. COCO's annotations (polygons,
RLE, boxes, and the image ``height``/``width``) refer to the pixels as they
are stored in the file, which is also what TensorFlow's decoders give the
parser; turning an image by its EXIF tag would move every annotation off its
object. So a JPEG is kept byte for byte (tag included) and every other
image is re-encoded from its stored pixels, and the size check compares the
stored size with the JSON (its error says when the JSON gives the size the
image is displayed at). ``tools/predict.py`` turns its drawings only.

Record schema (reference §7.1), one ``tf.train.Example`` per image:

  image/encoded              bytes   JPEG (kept as is) or PNG, 3 channels
  image/format               bytes   b'jpg' or b'png'
  image/source_id            bytes   COCO image id as a decimal string
  image/height, image/width  int64
  image/filename             bytes
  image/key/sha256           bytes   of image/encoded
  image/object/bbox/{xmin,xmax,ymin,ymax}  float list, normalised to [0, 1]
  image/object/class/label   int64 list, raw COCO category id
  image/object/class/text    bytes list, category name
  image/object/is_crowd      int64 list
  image/object/area          float list (the annotation's ``area``)
  image/object/mask          bytes list, one PNG per instance, full image
                             size, uint8 values in {0, 1}

Shards are named ``{prefix}-{i:05d}-of-{n:05d}.tfrecord`` (Model Garden's
names); image ``k`` of the JSON goes to shard ``k % n``. The label map is
``{prefix}_label_map.json``: ``{"<category id>": "<name>"}``.
"""

import collections
import contextlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util
import tensorflow as tf

from official.vision.data import tfrecord_lib

# Reasons an annotation is dropped (not fatal); the summary counts each.
DROP_REASONS = ('zero_area_box', 'box_outside_image', 'degenerate_polygon',
                'empty_mask')
# Dropped annotation ids listed per reason in the summary line.
SHOWN_DROPPED_IDS = 5

# A box may spill over the image border by this many pixels (float rounding
# in COCO exports) and is then clipped; beyond it the annotation is dropped.
_SPILL_TOLERANCE = 1.0

_JPEG_REENCODE_QUALITY = 95
_EXIF_ORIENTATION = 274  # The EXIF orientation tag (ignored; see above).


class ConversionError(ValueError):
  """Bad converter input; the message names the file / image / annotation."""


# ----------------------------------------------------------------------------
# Loading and validating the annotation JSON.


def _is_int(value):
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def load_coco_annotations(object_annotations_file):
  """Reads and validates a COCO instances JSON.

  Args:
    object_annotations_file: path of the JSON (``images`` and ``categories``
      required; ``annotations`` optional; ``info`` / ``licenses`` ignored).

  Returns:
    ``(images, annotations_by_image, id_to_name)``: the image entries in file
    order, a dict ``image id -> [annotation, ...]`` (file order) and a dict
    ``category id -> name``.

  Raises:
    ConversionError: the file is missing or not valid JSON, a required key is
      missing, ids are duplicated, an image file is listed under two ids,
      or an annotation names an unknown image or category.
  """
  path = object_annotations_file
  try:
    with open(path, 'rb') as f:
      data = json.load(f)
  except FileNotFoundError:
    raise ConversionError(f'{path}: annotation file not found') from None
  except json.JSONDecodeError as e:
    raise ConversionError(
        f'{path}: malformed JSON at line {e.lineno} column {e.colno}: '
        f'{e.msg}') from None
  except (OSError, UnicodeDecodeError) as e:
    raise ConversionError(f'{path}: cannot read annotation file: {e}') from None
  if not isinstance(data, dict):
    raise ConversionError(f'{path}: top level must be a JSON object')
  for key in ('images', 'categories'):
    if not isinstance(data.get(key), list):
      raise ConversionError(f'{path}: missing or non-list "{key}"')
  annotations = data.get('annotations', [])
  if not isinstance(annotations, list):
    raise ConversionError(f'{path}: "annotations" must be a list')

  id_to_name = {}
  for category in data['categories']:
    cat_id = category.get('id') if isinstance(category, dict) else None
    if not _is_int(cat_id) or not isinstance(category.get('name'), str):
      raise ConversionError(
          f'{path}: category entry {category!r} needs an integer "id" and a '
          f'string "name"')
    if cat_id < 1:
      raise ConversionError(
          f'{path}: category id {cat_id} ({category["name"]!r}) is < 1; id 0 '
          f'is the background class slot')
    if cat_id in id_to_name:
      raise ConversionError(f'{path}: duplicate category id {cat_id}')
    id_to_name[int(cat_id)] = category['name']

  images = []
  image_ids = set()
  id_of_file = {}
  for image in data['images']:
    if not isinstance(image, dict):
      raise ConversionError(f'{path}: image entry {image!r} is not an object')
    image_id = image.get('id')
    if not _is_int(image_id) or image_id < 0:
      raise ConversionError(
          f'{path}: image entry {image.get("file_name")!r} needs a '
          f'non-negative integer "id" (got {image_id!r})')
    for key in ('height', 'width'):
      if not _is_int(image.get(key)) or image[key] < 1:
        raise ConversionError(
            f'{path}: image id {image_id} has no positive integer "{key}"')
    if not isinstance(image.get('file_name'), str) or not image['file_name']:
      raise ConversionError(f'{path}: image id {image_id} has no "file_name"')
    if image_id in image_ids:
      raise ConversionError(f'{path}: duplicate image id {image_id}')
    file_key = os.path.normpath(image['file_name'])
    if file_key in id_of_file:
      raise ConversionError(
          f'{path}: image file {image["file_name"]!r} is listed twice, as '
          f'image id {id_of_file[file_key]} and image id {image_id}: each '
          f'listing would be a training example labelled without the other '
          f"one's objects. Keep one entry and give it all the annotations")
    id_of_file[file_key] = image_id
    image_ids.add(image_id)
    images.append(image)

  by_image = collections.defaultdict(list)
  for index, annotation in enumerate(annotations):
    if not isinstance(annotation, dict):
      raise ConversionError(
          f'{path}: annotation #{index} is not an object: {annotation!r}')
    ann_id = annotation.get('id', f'#{index}')
    image_id = annotation.get('image_id')
    if image_id not in image_ids:
      raise ConversionError(
          f'{path}: annotation id {ann_id} names unknown image id '
          f'{image_id!r}')
    cat_id = annotation.get('category_id')
    if cat_id not in id_to_name:
      raise ConversionError(
          f'{path}: annotation id {ann_id} names unknown category id '
          f'{cat_id!r}')
    bbox = annotation.get('bbox')
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or
        not all(isinstance(v, (int, float)) and math.isfinite(v)
                for v in bbox)):
      raise ConversionError(
          f'{path}: annotation id {ann_id} needs "bbox" = 4 finite numbers '
          f'(got {bbox!r})')
    if 'segmentation' not in annotation:
      raise ConversionError(
          f'{path}: annotation id {ann_id} has no "segmentation"')
    by_image[image_id].append(annotation)
  return images, dict(by_image), id_to_name


# ----------------------------------------------------------------------------
# Masks.


def _compressed_rle_counts(counts):
  """Decodes pycocotools' compressed RLE string into run lengths.

  Mirrors ``rleFrString`` in pycocotools' maskApi.c, so a malformed string is
  caught here instead of making the C decoder read past its buffers.
  """
  runs = []
  pos = 0
  while pos < len(counts):
    value, shift, more = 0, 0, True
    while more:
      if pos >= len(counts):
        raise ValueError('truncated counts string')
      c = ord(counts[pos]) - 48
      if not 0 <= c < 64:
        raise ValueError(f'invalid character {counts[pos]!r}')
      value |= (c & 0x1f) << (5 * shift)
      more = bool(c & 0x20)
      pos += 1
      shift += 1
      if not more and (c & 0x10):
        value |= -1 << (5 * shift)
    if len(runs) > 2:
      value += runs[-2]
    runs.append(value)
  return runs


def _rle_to_mask(rle, height, width, where):
  """Decodes one RLE dict (compressed or not) after checking it."""
  size = rle.get('size')
  counts = rle.get('counts')
  if list(size or []) != [height, width]:
    raise ConversionError(
        f'{where}: RLE size {size!r} differs from the image size '
        f'[{height}, {width}]')
  if isinstance(counts, list):
    runs = counts
  elif isinstance(counts, (str, bytes)):
    text = counts.decode('ascii') if isinstance(counts, bytes) else counts
    try:
      runs = _compressed_rle_counts(text)
    except ValueError as e:
      raise ConversionError(f'{where}: malformed compressed RLE: {e}') from None
    counts = text.encode('ascii')
  else:
    raise ConversionError(f'{where}: RLE counts must be a list or a string')
  if (not all(_is_int(r) and r >= 0 for r in runs) or
      sum(runs) != height * width):
    raise ConversionError(
        f'{where}: RLE run lengths must be non-negative integers summing to '
        f'height * width = {height * width}')
  if isinstance(counts, list):
    encoded = mask_util.frPyObjects({'size': [height, width],
                                     'counts': counts}, height, width)
  else:
    encoded = {'size': [height, width], 'counts': counts}
  return mask_util.decode(encoded)


def _valid_polygon(polygon):
  """True for >= 3 finite vertices enclosing a non-zero area."""
  if (not isinstance(polygon, (list, tuple)) or len(polygon) < 6 or
      len(polygon) % 2):
    return False
  if not all(isinstance(v, (int, float)) and math.isfinite(v)
             for v in polygon):
    return False
  xs = np.asarray(polygon[0::2], np.float64)
  ys = np.asarray(polygon[1::2], np.float64)
  doubled_area = np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))
  return abs(doubled_area) > 0


def segmentation_to_mask(segmentation, height, width, where='segmentation'):
  """Rasterises a COCO segmentation to a full-size binary mask.

  Args:
    segmentation: a list of polygons ``[[x0, y0, x1, y1, ...], ...]``, an RLE
      dict (``counts`` a list = uncompressed, a string = compressed), or a
      list of RLE dicts.
    height: int, image height.
    width: int, image width.
    where: str naming the annotation in error messages.

  Returns:
    ``uint8 [height, width]`` array of 0/1 (the union of all parts), or None
    when the segmentation is a polygon list whose polygons are all
    degenerate (fewer than 3 vertices or zero area); degenerate parts of an
    otherwise valid list are ignored.

  Raises:
    ConversionError: malformed RLE or an unknown segmentation form.
  """
  if isinstance(segmentation, dict):
    return np.ascontiguousarray(
        _rle_to_mask(segmentation, height, width, where))
  if not isinstance(segmentation, list):
    raise ConversionError(
        f'{where}: segmentation must be a polygon list or an RLE dict')
  if segmentation and all(isinstance(s, dict) for s in segmentation):
    masks = [_rle_to_mask(s, height, width, where) for s in segmentation]
    return np.ascontiguousarray(np.amax(np.stack(masks), axis=0))
  polygons = [[float(v) for v in p] for p in segmentation if _valid_polygon(p)]
  if not polygons:
    return None
  # pycocotools reads a list whose first polygon has 4 values as boxes; every
  # kept polygon has >= 6 values, so it always rasterises polygons here.
  rles = mask_util.frPyObjects(polygons, height, width)
  return np.ascontiguousarray(mask_util.decode(mask_util.merge(rles)))


# ----------------------------------------------------------------------------
# One image -> one tf.train.Example.


def _read_image(path, height, width, image_id):
  """Returns ``(encoded_bytes, format)`` that decode to ``height x width x 3``.

  RGB JPEG and RGB PNG files are kept byte for byte; anything else is
  decoded and re-encoded (JPEG sources as RGB JPEG, all others as RGB PNG).
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise ConversionError(
        f'image file not found: {path} (image id {image_id})') from None
  except OSError as e:
    raise ConversionError(
        f'cannot read image file {path} (image id {image_id}): {e}') from None
  try:
    with Image.open(io.BytesIO(data)) as image:
      image_format = image.format
      image.load()
      if image.size != (width, height):
        raise ConversionError(
            f'image file {path} (image id {image_id}) is '
            f'{image.size[1]}x{image.size[0]} (HxW) but the JSON says '
            f'{height}x{width}{_orientation_hint(image, height, width)}')
      if image_format in ('JPEG', 'MPO') and image.mode == 'RGB':
        return data, 'jpg'
      if image_format == 'PNG' and image.mode == 'RGB':
        return data, 'png'
      rgb = _to_rgb(image)
  except ConversionError:
    raise
  except Exception as e:  # PIL raises many types for corrupt files.
    raise ConversionError(
        f'cannot decode image file {path} (image id {image_id}): '
        f'{type(e).__name__}: {e}') from None
  out = io.BytesIO()
  if image_format in ('JPEG', 'MPO'):
    rgb.save(out, format='JPEG', quality=_JPEG_REENCODE_QUALITY)
    return out.getvalue(), 'jpg'
  rgb.save(out, format='PNG')
  return out.getvalue(), 'png'


def _orientation_hint(image, height, width):
  """Why the sizes may differ: the JSON gives the EXIF-turned size."""
  try:
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception:  # pylint: disable=broad-except
    return ''
  if orientation in (5, 6, 7, 8) and image.size == (height, width):
    return (f' (the size it is displayed at, turned by its EXIF orientation '
            f'{orientation}; COCO sizes and annotations refer to the stored '
            f'pixels, which the converter keeps)')
  return ''


def _to_rgb(image):
  """PIL image of any mode -> 8-bit RGB (alpha dropped, 16 bit scaled)."""
  if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'F'):
    array = np.asarray(image, np.float64)
    peak = array.max() if array.size else 0
    if peak > 255:
      array = array * (255.0 / (65535.0 if peak <= 65535 else peak))
    gray = np.clip(np.round(array), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, 'L').convert('RGB')
  return image.convert('RGB')


def _annotation_features(annotations, height, width, id_to_name, where):
  """Object features of one image plus per-image counters."""
  lists = {k: [] for k in ('xmin', 'xmax', 'ymin', 'ymax', 'label', 'text',
                           'is_crowd', 'area', 'mask')}
  dropped = collections.Counter()
  dropped_ids = collections.defaultdict(list)

  def drop(reason, annotation):
    dropped[reason] += 1
    dropped_ids[reason].append(annotation.get('id'))

  for annotation in annotations:
    ann_where = f'{where}, annotation id {annotation.get("id")}'
    x, y, w, h = (float(v) for v in annotation['bbox'])
    if w <= 0 or h <= 0:
      drop('zero_area_box', annotation)
      continue
    if (x < -_SPILL_TOLERANCE or y < -_SPILL_TOLERANCE or
        x + w > width + _SPILL_TOLERANCE or
        y + h > height + _SPILL_TOLERANCE):
      drop('box_outside_image', annotation)
      continue
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    mask = segmentation_to_mask(annotation['segmentation'], height, width,
                                ann_where)
    if mask is None:
      drop('degenerate_polygon', annotation)
      continue
    if not mask.any():  # E.g. a polygon entirely outside the image.
      drop('empty_mask', annotation)
      continue
    category_id = int(annotation['category_id'])
    lists['xmin'].append(x0 / width)
    lists['xmax'].append(x1 / width)
    lists['ymin'].append(y0 / height)
    lists['ymax'].append(y1 / height)
    lists['label'].append(category_id)
    lists['text'].append(id_to_name[category_id].encode('utf8'))
    lists['is_crowd'].append(int(bool(annotation.get('iscrowd', 0))))
    area = annotation.get('area')
    lists['area'].append(float(area) if isinstance(area, (int, float))
                         else float(mask.sum()))
    lists['mask'].append(tfrecord_lib.encode_mask_as_png(mask))

  def feature(values, value_type):
    return tfrecord_lib.convert_to_feature(values, value_type)

  features = {
      'image/object/bbox/xmin': feature(lists['xmin'], 'float_list'),
      'image/object/bbox/xmax': feature(lists['xmax'], 'float_list'),
      'image/object/bbox/ymin': feature(lists['ymin'], 'float_list'),
      'image/object/bbox/ymax': feature(lists['ymax'], 'float_list'),
      'image/object/class/label': feature(lists['label'], 'int64_list'),
      'image/object/class/text': feature(lists['text'], 'bytes_list'),
      'image/object/is_crowd': feature(lists['is_crowd'], 'int64_list'),
      'image/object/area': feature(lists['area'], 'float_list'),
      'image/object/mask': feature(lists['mask'], 'bytes_list'),
  }
  stats = {'instances': len(lists['label']), 'crowd': sum(lists['is_crowd']),
           'dropped': dropped, 'dropped_ids': dict(dropped_ids)}
  return features, stats


def build_example(image, image_dir, annotations, id_to_name):
  """Builds the tf.train.Example of one image.

  Args:
    image: the COCO image entry (``id``, ``file_name``, ``height``,
      ``width``).
    image_dir: directory holding ``image['file_name']``.
    annotations: list of the image's COCO annotations (validated by
      :func:`load_coco_annotations`).
    id_to_name: dict category id -> name.

  Returns:
    ``(example, stats)``: the ``tf.train.Example`` and a dict with
    ``instances``, ``crowd``, ``dropped`` (a Counter by reason) and
    ``dropped_ids`` (reason -> annotation ids).

  Raises:
    ConversionError: the image file is missing, unreadable, or of a size
      other than the JSON says; or an annotation's segmentation is malformed.
  """
  height, width = int(image['height']), int(image['width'])
  path = os.path.join(image_dir, image['file_name'])
  encoded, image_format = _read_image(path, height, width, image['id'])
  features = tfrecord_lib.image_info_to_feature_dict(
      height, width, image['file_name'], image['id'], encoded, image_format)
  object_features, stats = _annotation_features(
      annotations, height, width, id_to_name,
      f'image {path} (id {image["id"]})')
  features.update(object_features)
  example = tf.train.Example(features=tf.train.Features(feature=features))
  return example, stats


# Worker state (set once per process; inherited under fork, sent under spawn).
_WORKER = {}


def _init_worker(image_dir, id_to_name):
  _WORKER['image_dir'] = image_dir
  _WORKER['id_to_name'] = id_to_name


def _encode_one(task):
  image, annotations = task
  example, stats = build_example(image, _WORKER['image_dir'], annotations,
                                 _WORKER['id_to_name'])
  return example.SerializeToString(), stats


# ----------------------------------------------------------------------------
# Driver.


def shard_paths(output_file_prefix, num_shards):
  """Output shard names, as Model Garden's converter writes them."""
  return [f'{output_file_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord'
          for i in range(num_shards)]


def label_map_path(output_file_prefix):
  return f'{output_file_prefix}_label_map.json'


def format_summary(summary):
  """The closing line: images, instances, crowd, dropped (by reason, with
  the first annotation ids), time, shards (and a capped shard count)."""
  dropped = summary['dropped']
  reasons = ', '.join(f'{k} {v}' for k, v in dropped.items())
  line = (f'Converted {summary["images"]} images, {summary["instances"]} '
          f'instances ({summary["crowd"]} crowd), dropped '
          f'{sum(dropped.values())} ({reasons}) in {summary["seconds"]:.1f} s '
          f'-> {len(summary["shards"])} shards')
  capped = summary.get('num_shards_requested')
  if capped:
    line += (f' (num_shards={capped} capped at the {summary["images"]} '
             f'images: a shard without images is empty)')
  shown = []
  for reason, ids in summary.get('dropped_ids', {}).items():
    more = ', ...' if dropped[reason] > len(ids) else ''
    shown.append(f'{reason} {", ".join(str(i) for i in ids)}{more}')
  if shown:
    line += '; dropped annotation ids: ' + '; '.join(shown)
  return line


@contextlib.contextmanager
def _progress(total, desc, enabled):
  """Yields ``update(n)``: a tqdm bar, or a plain stderr counter."""
  if not enabled:
    yield lambda n=1: None
    return
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    tqdm = None
  if tqdm is not None:
    with tqdm(total=total, desc=desc, unit='img', file=sys.stderr) as bar:
      yield bar.update
    return
  done = [0]
  step = max(1, total // 20)

  def update(n=1):
    done[0] += n
    if done[0] % step == 0 or done[0] == total:
      print(f'\r{desc}: {done[0]}/{total} images', end='', file=sys.stderr,
            flush=True)

  yield update
  print(file=sys.stderr)


@contextlib.contextmanager
def _encoded_records(tasks, image_dir, id_to_name, num_workers):
  """Yields an iterator of ``(serialized_example, stats)`` in task order.

  With more than one worker the pool is started on entry (before any output
  file is opened, so the forked workers hold none) and torn down on exit.
  """
  if num_workers == 1:
    _init_worker(image_dir, id_to_name)
    yield map(_encode_one, tasks)
    return
  methods = multiprocessing.get_all_start_methods()
  context = multiprocessing.get_context('fork' if 'fork' in methods else None)
  pool = context.Pool(num_workers, initializer=_init_worker,
                      initargs=(image_dir, id_to_name))
  try:
    chunksize = max(1, min(16, len(tasks) // (4 * num_workers)))
    yield pool.imap(_encode_one, tasks, chunksize=chunksize)
    pool.close()
  finally:
    pool.terminate()
    pool.join()


def convert_coco_to_tfrecords(image_dir,
                              object_annotations_file,
                              output_file_prefix,
                              num_shards=32,
                              num_workers=1,
                              show_progress=True):
  """Converts a COCO instances JSON and its images into TFRecord shards.

  Args:
    image_dir: directory holding the images named by ``file_name``.
    object_annotations_file: the COCO instances JSON.
    output_file_prefix: shards go to ``{prefix}-{i:05d}-of-{n:05d}.tfrecord``
      and the label map to ``{prefix}_label_map.json``; the directory is
      created if missing.
    num_shards: int >= 1, number of output shards.
    num_workers: int >= 1, processes encoding images (1 = in this process).
    show_progress: bool, show a progress bar and print the summary line.

  Returns:
    dict with ``images``, ``instances`` (written, crowd included), ``crowd``,
    ``images_without_instances``, ``dropped`` (dict reason -> count, reasons
    in ``DROP_REASONS``), ``dropped_ids`` (reason -> the first
    ``SHOWN_DROPPED_IDS`` dropped annotation ids, reasons with drops only),
    ``num_shards_requested`` (the ``num_shards`` asked for when it exceeded
    the image count and was capped, else None), ``seconds``, ``shards`` (list
    of paths),
    ``label_map`` (path) and ``removed_stale_shards`` (shards of an earlier
    run with the same prefix but another shard count, deleted so that
    ``{prefix}-*`` matches this run only).

  Raises:
    ConversionError: bad settings, bad input or output that cannot be
      written (the message names the file, image, annotation or path). No
      output shard is left behind; earlier outputs with the same names stay
      untouched.
  """
  start = time.perf_counter()
  if not _is_int(num_shards) or num_shards < 1:
    raise ConversionError(f'num_shards must be an integer >= 1, got '
                          f'{num_shards!r}')
  if not _is_int(num_workers) or num_workers < 1:
    raise ConversionError(f'num_workers must be an integer >= 1, got '
                          f'{num_workers!r}')
  output_file_prefix = os.fspath(output_file_prefix)
  output_dir, base = os.path.split(os.path.abspath(output_file_prefix))
  if not os.path.basename(output_file_prefix):
    raise ConversionError(
        f'output_file_prefix {output_file_prefix!r} must end in a file name '
        f'prefix, not a directory')
  if not os.path.isdir(image_dir):
    raise ConversionError(f'image_dir {image_dir} is not a directory')

  images, by_image, id_to_name = load_coco_annotations(object_annotations_file)
  # Cheap existence check first, so a missing file fails before any encoding.
  for image in images:
    path = os.path.join(image_dir, image['file_name'])
    if not os.path.isfile(path):
      raise ConversionError(
          f'image file not found: {path} (image id {image["id"]})')
  tasks = [(image, by_image.get(image['id'], [])) for image in images]
  requested = None
  if num_shards > max(1, len(tasks)):
    requested, num_shards = num_shards, max(1, len(tasks))

  final_paths = shard_paths(output_file_prefix, num_shards)
  final_label_map = label_map_path(output_file_prefix)
  try:
    os.makedirs(output_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f'.{base}.tmp-', dir=output_dir)
  except OSError as e:
    raise ConversionError(_output_error(e, output_dir)) from None
  totals = {'instances': 0, 'crowd': 0, 'images_without_instances': 0}
  dropped = collections.Counter({reason: 0 for reason in DROP_REASONS})
  dropped_ids = collections.defaultdict(list)
  try:
    tmp_paths = [os.path.join(tmp_dir, os.path.basename(p))
                 for p in final_paths]
    with _encoded_records(tasks, image_dir, id_to_name,
                          num_workers) as records:
      writers = [tf.io.TFRecordWriter(p) for p in tmp_paths]
      try:
        with _progress(len(tasks), base, show_progress) as update:
          for index, (record, stats) in enumerate(records):
            writers[index % num_shards].write(record)
            totals['instances'] += stats['instances']
            totals['crowd'] += stats['crowd']
            totals['images_without_instances'] += int(
                stats['instances'] == 0)
            dropped.update(stats['dropped'])
            for reason, ids in stats['dropped_ids'].items():
              shown = dropped_ids[reason]
              shown.extend(ids[:SHOWN_DROPPED_IDS - len(shown)])
            update(1)
      finally:
        for writer in writers:
          writer.close()
    tmp_label_map = os.path.join(tmp_dir, os.path.basename(final_label_map))
    with open(tmp_label_map, 'w') as f:
      json.dump({str(k): v for k, v in sorted(id_to_name.items())}, f,
                indent=1)
    for tmp_path, final_path in zip(tmp_paths, final_paths):
      os.replace(tmp_path, final_path)
    os.replace(tmp_label_map, final_label_map)
  except OSError as e:
    raise ConversionError(_output_error(e, output_dir)) from None
  except tf.errors.OpError as e:
    raise ConversionError(
        f'cannot write the output in {output_dir}: {e.message}') from None
  finally:
    shutil.rmtree(tmp_dir, ignore_errors=True)

  try:
    removed = _remove_stale_shards(output_dir, base, set(final_paths))
  except OSError as e:
    raise ConversionError(_output_error(e, output_dir)) from None
  summary = {
      'images': len(tasks),
      'instances': totals['instances'],
      'crowd': totals['crowd'],
      'images_without_instances': totals['images_without_instances'],
      'dropped': dict(dropped),
      'dropped_ids': dict(dropped_ids),
      'num_shards_requested': requested,
      'seconds': time.perf_counter() - start,
      'shards': final_paths,
      'label_map': final_label_map,
      'removed_stale_shards': removed,
  }
  if show_progress:
    print(format_summary(summary), flush=True)
  return summary


def _output_error(error, output_dir):
  """One line naming the output path an OSError is about."""
  path = error.filename or output_dir
  reason = error.strerror or str(error)
  if isinstance(error, (FileExistsError, NotADirectoryError)):
    reason += ' (a file stands where a directory must be)'
  return f'cannot write output to {path}: {reason}'


def _remove_stale_shards(output_dir, base, keep):
  """Deletes ``{base}-?????-of-?????.tfrecord`` files not written now."""
  pattern = re.compile(re.escape(base) + r'-\d{5}-of-\d{5}\.tfrecord')
  keep = {os.path.abspath(p) for p in keep}
  removed = []
  for name in sorted(os.listdir(output_dir)):
    path = os.path.join(output_dir, name)
    if pattern.fullmatch(name) and os.path.abspath(path) not in keep:
      os.remove(path)
      removed.append(path)
  return removed
