r"""Training-parser throughput (images/s) of the ShapeMask input pipeline.

For every ``--output_sizes`` entry, runs the training parser (decode, flip,
scale jitter, anchor labels, mask sampling and targets) over records read
from ``--file_pattern`` and prints one JSON line per measurement:

- ``per_core``: one parse at a time on one thread (``map`` with one parallel
  call, private thread pool of 1, intra-op parallelism 1), i.e. images/s a
  single core delivers;
- ``all_cores``: ``map`` with AUTOTUNE on all the cores of the machine.

Records are cached in memory and repeated, so disk reads are not measured;
the first ``--warmup`` images (tracing, pools) are not timed. Without
``--file_pattern`` the coco_tiny160 train split (../shared/data, relative to
the repository root) is converted into a temporary directory first.

Example:
  python -m tools.bench.benchmark_input --num_images=200 --output_sizes=1024,640
"""

import datetime
import json
import os
import platform
import tempfile
import time

from absl import app
from absl import flags

from official_shapemask import help_flags
from official_shapemask import quiet_logs

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

FLAGS = flags.FLAGS
_COCO_TINY = os.path.join(_REPO_ROOT, '..', 'shared', 'data', 'coco_tiny160')


def _define_flags():
  flags.DEFINE_string('file_pattern', None,
                      'TFRecord glob; default: convert coco_tiny160 train '
                      'into a temporary directory.')
  flags.DEFINE_integer('num_images', 200, 'Timed images per measurement.')
  flags.DEFINE_integer('warmup', 10, 'Untimed images before timing.')
  flags.DEFINE_list('output_sizes', ['1024', '640'], 'Canvas sizes S.')
  flags.DEFINE_list('modes', ['per_core', 'all_cores'],
                    'Which measurements: per_core, all_cores.')


def _convert_coco_tiny(out_dir):
  from official_shapemask.data_prep import coco_tfrecord  # pylint: disable=g-import-not-at-top
  root = os.path.abspath(_COCO_TINY)
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'coco_tiny160 not found at {root}; pass --file_pattern.')
  prefix = os.path.join(out_dir, 'train')
  coco_tfrecord.convert_coco_to_tfrecords(
      image_dir=os.path.join(root, 'train2017'),
      object_annotations_file=os.path.join(root, 'annotations',
                                           'instances_train2017.json'),
      output_file_prefix=prefix, num_shards=4, num_workers=1,
      show_progress=False)
  return prefix + '-*'


def measure(file_pattern, output_size, num_images, warmup, per_core):
  """Images/s of the training parser; see the module docstring."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from official_shapemask.dataloaders import input_reader  # pylint: disable=g-import-not-at-top
  from official_shapemask.dataloaders import shapemask_parser  # pylint: disable=g-import-not-at-top

  parser = shapemask_parser.Parser(output_size, mode='train')
  files = input_reader.list_files(file_pattern)
  dataset = tf.data.TFRecordDataset(files).cache().repeat()
  seeds = tf.data.Dataset.random(seed=0).batch(2, drop_remainder=True)
  dataset = tf.data.Dataset.zip((dataset, seeds))
  dataset = dataset.map(lambda record, seed: parser(record, seed=seed),
                        num_parallel_calls=1 if per_core else tf.data.AUTOTUNE)
  dataset = dataset.prefetch(1 if per_core else tf.data.AUTOTUNE)
  options = tf.data.Options()
  if per_core:
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
  dataset = dataset.with_options(options)

  iterator = iter(dataset)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_images):
    next(iterator)
  seconds = time.perf_counter() - start
  return {
      'measure': 'per_core' if per_core else 'all_cores',
      'output_size': output_size,
      'images_per_s': round(num_images / seconds, 2),
      'num_images': num_images,
      'seconds': round(seconds, 2),
      'num_files': len(files),
      'machine_cores': os.cpu_count(),
      'tensorflow': tf.__version__,
      'date': datetime.date.today().isoformat(),
      'processor': platform.processor() or platform.machine(),
  }


def main(argv):
  del argv
  for mode in FLAGS.modes:
    if mode not in ('per_core', 'all_cores'):
      raise app.UsageError(f'--modes: unknown measurement {mode!r}.')
  with tempfile.TemporaryDirectory(prefix='benchmark_input_') as tmp:
    pattern = FLAGS.file_pattern or _convert_coco_tiny(tmp)
    for size in FLAGS.output_sizes:
      for mode in FLAGS.modes:
        result = measure(pattern, int(size), FLAGS.num_images, FLAGS.warmup,
                         per_core=mode == 'per_core')
        print(json.dumps(result), flush=True)


if __name__ == '__main__':
  quiet_logs.install()  # Before TensorFlow is imported.
  _define_flags()
  help_flags.run(main)  # absl's app.run; --help exits 0.
