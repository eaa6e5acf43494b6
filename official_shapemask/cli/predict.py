r"""Runs ShapeMask on images: PNG overlays and a COCO results JSON.

From an export of tools/export_saved_model.py:

  python tools/predict.py --saved_model=/tmp/run/saved_model \
      --images='/data/val2017/*.jpg' --output_dir=/tmp/run/predictions \
      --label_map=/data/val_label_map.json

or straight from a training checkpoint (same gin as the training run):

  python tools/predict.py --gin_file=tiny_cpu.gin \
      --gin_bindings="TRAIN_FILE_PATTERN='unused'" --checkpoint=/tmp/run \
      --images='/data/val2017/*.jpg' --output_dir=/tmp/run/predictions

Writes, in --output_dir:
  <image name without extension>.png: the image with the detections scoring
    >= --score_threshold drawn: masks (pasted with the outer boxes, > 0.5),
    boxes, and `class name: score` tags; an image whose short side is below
    --min_short_side is drawn enlarged by an integer factor (masks by pixel
    replication; the long side at most 2048 px), so the tags stay legible;
    a photo with an EXIF orientation tag (a phone's portrait shot) is drawn
    upright, turned as viewers display it;
  coco_results.json: COCO results of every valid detection (all scores, as
    COCO evaluation expects): image_id, category_id, bbox [x, y, w, h] in
    original-image pixels, score, segmentation (compressed RLE);
  image_ids.json: {image file: image_id}.
Frames: the model sees the image file's stored pixels, as TensorFlow
decodes them (EXIF orientation ignored, like the SavedModel's image_bytes
signature, the COCO converter and COCO's own annotations), and
coco_results.json is in that stored-pixel frame (height x width of the
stored pixels); only the PNG is turned by the EXIF orientation.
image_id: the file name's stem as an integer when every matched file's stem
is a decimal number (COCO names such as 000000532481.jpg -> 532481);
otherwise the 1-based position of the file in the sorted list of matches.

Errors (exit status 1, the message names the flag or file): --images matching
no file, an image that cannot be read or decoded (the run stops there; the
PNGs of earlier images stay, the JSON files are not written), two images
that would share an output name, a missing or bad --label_map.

--label_map: the converter's {prefix}_label_map.json ({"1": "person"}), a
COCO annotation JSON, or a [{"id", "name"}] list; without it, classes are
drawn as "class <id>".
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

from official_shapemask import quiet_logs
from official_shapemask.cli import entry

FLAGS = flags.FLAGS


def _define_flags():
  """Defined on run only, so importing this module defines no global flags."""
  flags.DEFINE_string(
      'saved_model', None, 'SavedModel directory from '
      'tools/export_saved_model.py (or use --gin_file and --checkpoint).')
  flags.DEFINE_multi_string(
      'gin_file', [], 'gin config of the model, with --checkpoint instead of '
      '--saved_model (repeatable).')
  flags.DEFINE_multi_string('gin_bindings', [],
                            'gin binding NAME=VALUE (repeatable).')
  flags.DEFINE_string(
      'checkpoint', None, 'checkpoint prefix or model directory, with '
      '--gin_file.')
  flags.DEFINE_string(
      'images', None, 'glob of the input images (JPEG/PNG/BMP/GIF), e.g. '
      '"data/val2017/*.jpg".')
  flags.DEFINE_string('output_dir', None,
                      'where the PNGs and JSON files go.')
  flags.DEFINE_float(
      'score_threshold', 0.5, 'minimum score of the detections drawn (the '
      'results JSON keeps every valid detection).')
  flags.DEFINE_string('label_map', None,
                      'category id -> name JSON (see --help).')
  flags.DEFINE_integer(
      'min_short_side', 480, 'draw smaller images enlarged by an integer '
      'factor until their short side is at least this, the long side at '
      'most 2048 px (0: original size).')
  flags.DEFINE_integer(
      'batch_size', 1, 'images per model call with --checkpoint (a '
      'SavedModel uses its exported batch size).')


RESULTS_FILE = 'coco_results.json'
IMAGE_IDS_FILE = 'image_ids.json'


class PredictError(Exception):
  """Bad input; the message names the flag, file or image."""


def check_output_dir(output_dir):
  """Raises PredictError when `--output_dir` cannot be a directory.

  Checked before the model is loaded: the path is a file, or a file stands
  where one of its parent directories must be. Creates nothing.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = output_dir.rstrip('/') or '/'
  while path:
    if tf.io.gfile.exists(path):
      if not tf.io.gfile.isdir(path):
        what = ('is a file' if path == output_dir.rstrip('/') else
                f'cannot be created: {path} is a file')
        raise PredictError(f'--output_dir={output_dir} {what}; give a '
                           f'directory (created when missing).')
      return
    parent = os.path.dirname(path)
    if parent == path:
      return
    path = parent


def list_images(pattern):
  """Sorted files matching `pattern` (directories skipped)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  paths = sorted(p for p in tf.io.gfile.glob(pattern)
                 if not tf.io.gfile.isdir(p))
  if not paths:
    raise PredictError(f'--images={pattern!r} matched no files.')
  return paths


def assign_image_ids(paths):
  """Image ids and the rule used (see the module docstring).

  Returns:
    (list of int ids, str naming the rule).
  """
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  if all(s.isdigit() for s in stems):
    ids = [int(s) for s in stems]
    if len(set(ids)) == len(ids):
      return ids, 'file name stems'
  return list(range(1, len(paths) + 1)), 'positions in the sorted file list'



def output_names(paths):
  """`<stem>.png` per image; an error when two images share a stem."""
  names = {}
  for path in paths:
    name = os.path.splitext(os.path.basename(path))[0] + '.png'
    if name in names:
      raise PredictError(
          f'{names[name]} and {path} would both be written to {name}; '
          f'narrow --images or rename one of them.')
    names[name] = path
  return [os.path.splitext(os.path.basename(p))[0] + '.png' for p in paths]


def read_image(path):
  """Reads and decodes one image: (encoded bytes, uint8 RGB [H, W, 3])."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_shapemask.serving import export  # pylint: disable=g-import-not-at-top
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      data = f.read()
  except (tf.errors.OpError, OSError) as e:
    raise PredictError(f'cannot read image {path}: {e}') from e
  try:
    image = export.decode_image(tf.constant(data)).numpy()
  except (tf.errors.InvalidArgumentError, ValueError) as e:
    message = getattr(e, 'message', str(e)).splitlines()[0]
    raise PredictError(f'cannot decode image {path} (not a JPEG/PNG/BMP/GIF '
                       f'image?): {message}') from e
  return data, image


def _write_atomic(path, data):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tmp = f'{path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(tmp, 'wb') as f:
    f.write(data)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_png(path, image_rgb):
  import cv2  # pylint: disable=g-import-not-at-top
  ok, encoded = cv2.imencode('.png', image_rgb[:, :, ::-1])
  if not ok:
    raise PredictError(f'PNG encoding failed for {path}')
  _write_atomic(path, encoded.tobytes())


def _load_predictor():
  from official_shapemask.serving import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  if FLAGS.saved_model:
    if FLAGS.gin_file or FLAGS.checkpoint:
      raise app.UsageError('give either --saved_model or --gin_file with '
                           '--checkpoint, not both')
    return predictor_lib.Predictor.from_saved_model(FLAGS.saved_model)
  if not (FLAGS.gin_file and FLAGS.checkpoint):
    raise app.UsageError('give --saved_model, or --gin_file with '
                         '--checkpoint')
  if FLAGS.batch_size < 1:
    raise app.UsageError('--batch_size must be >= 1')
  # pylint: disable=g-import-not-at-top
  from official_shapemask.modeling import factory
  from official_shapemask.training import gin_utils
  from official_shapemask.training import shape_prior_files
  # pylint: enable=g-import-not-at-top
  gin_utils.parse_config(FLAGS.gin_file, FLAGS.gin_bindings)
  return predictor_lib.Predictor.from_checkpoint(
      factory.build_shapemask_model(**shape_prior_files.model_overrides()),
      FLAGS.checkpoint,
      batch_size=FLAGS.batch_size)


def run(paths, predictor, output_dir, score_threshold, label_map,
        print_fn=print, min_short_side=480):
  """Predicts every image; writes the PNGs and the JSON files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_shapemask.serving import exif_orientation  # pylint: disable=g-import-not-at-top
  from official_shapemask.serving import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from official_shapemask.serving import visualize  # pylint: disable=g-import-not-at-top
  image_ids, id_rule = assign_image_ids(paths)
  names = output_names(paths)
  print_fn(f'{len(paths)} images; image_id from {id_rule}; model: '
           f'{predictor.source}')
  check_output_dir(output_dir)
  try:
    tf.io.gfile.makedirs(output_dir)
  except (tf.errors.OpError, OSError) as e:
    message = getattr(e, 'message', None) or str(e)
    raise PredictError(f'--output_dir={output_dir} cannot be created: '
                       f'{message.splitlines()[0]}') from None
  batch = predictor.batch_size or 1
  results = []
  start = time.perf_counter()
  for first in range(0, len(paths), batch):
    chunk = list(range(first, min(first + batch, len(paths))))
    decoded = [read_image(paths[i]) for i in chunk]
    outputs = predictor.predict_bytes([d[0] for d in decoded])
    for j, i in enumerate(chunk):
      detections = predictor_lib.image_detections(outputs, j)
      # The results stay in the stored pixels' frame (COCO's).
      results.extend(predictor_lib.coco_results(image_ids[i], detections))
      shown = detections['scores'] >= score_threshold
      # The overlay is drawn the way viewers display the photo.
      orientation = exif_orientation.read(decoded[j][0])
      image, boxes, masks = exif_orientation.to_display(
          decoded[j][1], detections['boxes'][shown],
          detections['masks'][shown], orientation)
      overlay = visualize.draw_detections(
          image, boxes, detections['classes'][shown],
          detections['scores'][shown], masks, label_map=label_map,
          min_short_side=min_short_side)
      out_path = os.path.join(output_dir, names[i])
      write_png(out_path, overlay)
      turned = (f' (drawn upright: EXIF orientation {orientation}; results '
                f'in the stored pixels)' if orientation != 1 else '')
      print_fn(f'[{i + 1}/{len(paths)}] {paths[i]}: '
               f'{len(detections["scores"])} detections, {int(shown.sum())} '
               f'>= {score_threshold:g} -> {out_path}{turned}')
  results_path = os.path.join(output_dir, RESULTS_FILE)
  _write_atomic(results_path, json.dumps(results).encode('utf-8'))
  ids_path = os.path.join(output_dir, IMAGE_IDS_FILE)
  _write_atomic(ids_path, json.dumps(
      {p: image_id for p, image_id in zip(paths, image_ids)},
      indent=1).encode('utf-8'))
  seconds = time.perf_counter() - start
  print_fn(f'Wrote {len(paths)} PNGs, {results_path} ({len(results)} '
           f'detections) and {ids_path} in {seconds:.1f} s')
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  for name in ('images', 'output_dir'):
    if not FLAGS[name].value:
      raise app.UsageError(f'--{name} is required')
  if FLAGS.min_short_side < 0:
    raise app.UsageError('--min_short_side must be >= 0')
  from official_shapemask.serving import label_map as label_map_lib  # pylint: disable=g-import-not-at-top
  try:
    check_output_dir(FLAGS.output_dir)  # Before the model loads.
    paths = list_images(FLAGS.images)
    label_map = (label_map_lib.load_label_map(FLAGS.label_map)
                 if FLAGS.label_map else None)
    predictor = _load_predictor()
    run(paths, predictor, FLAGS.output_dir, FLAGS.score_threshold,
        label_map, min_short_side=FLAGS.min_short_side)
  except (PredictError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


def console_entry():
  """Entry point of the console script and of the tools/ launcher."""
  quiet_logs.install()  # Before TensorFlow is imported.
  _define_flags()
  entry.run(main, __name__)


if __name__ == '__main__':
  console_entry()
