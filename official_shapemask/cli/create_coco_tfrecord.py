r"""Converts a COCO instances JSON and its images into ShapeMask TFRecords.

Flags follow Model Garden's ``create_coco_tf_record.py``; masks are always
included. Example (from the repository root):

  python tools/create_coco_tfrecord.py \
    --image_dir=../shared/data/coco_tiny160/val2017 \
    --object_annotations_file=../shared/data/coco_tiny160/annotations/instances_val2017.json \
    --output_file_prefix=out/val --num_shards=4

Writes ``out/val-0000{0..3}-of-00004.tfrecord`` and ``out/val_label_map.json``
(``train.py`` checks its category ids against ``NUM_CLASSES`` before it
starts). Bad input stops the run with a one-line error and exit status 1; an
image file listed twice under two image ids is bad input (name both ids).
EXIF orientation tags are ignored: COCO annotations refer to the stored
pixels, and the records keep them as stored.
"""

import sys

from absl import app
from absl import flags

from official_shapemask import quiet_logs
from official_shapemask.cli import entry

FLAGS = flags.FLAGS


def _define_flags():
  """Defined on run only, so importing this module defines no global flags."""
  flags.DEFINE_string('image_dir', None, 'Directory containing the images.')
  flags.DEFINE_string('object_annotations_file', None,
                      'COCO instances JSON (boxes and segmentations).')
  flags.DEFINE_string('output_file_prefix', None,
                      'Output path prefix; shards are '
                      '<prefix>-<i>-of-<n>.tfrecord.')
  flags.DEFINE_integer('num_shards', 32, 'Number of output shards.')
  flags.DEFINE_integer('num_workers', 1,
                       'Processes encoding images in parallel.')
  for name in ('image_dir', 'object_annotations_file', 'output_file_prefix'):
    flags.mark_flag_as_required(name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Imported here so that --help answers without loading TensorFlow.
  from official_shapemask.data_prep import coco_tfrecord  # pylint: disable=g-import-not-at-top
  try:
    summary = coco_tfrecord.convert_coco_to_tfrecords(
        image_dir=FLAGS.image_dir,
        object_annotations_file=FLAGS.object_annotations_file,
        output_file_prefix=FLAGS.output_file_prefix,
        num_shards=FLAGS.num_shards,
        num_workers=FLAGS.num_workers,
        show_progress=True)
  except coco_tfrecord.ConversionError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  first, last = summary['shards'][0], summary['shards'][-1]
  print(f'Shards: {first}' + (f' .. {last}' if last != first else ''))
  print(f'Label map: {summary["label_map"]}')
  if summary['images_without_instances']:
    print(f'Images without instances: {summary["images_without_instances"]}')
  for path in summary['removed_stale_shards']:
    print(f'Removed stale shard of an earlier run: {path}')
  return 0


def console_entry():
  """Entry point of the console script and of the tools/ launcher."""
  quiet_logs.install()  # Before TensorFlow is imported.
  _define_flags()
  entry.run(main, __name__)


if __name__ == '__main__':
  console_entry()
