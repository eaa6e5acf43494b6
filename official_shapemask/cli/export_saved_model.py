r"""Exports a trained ShapeMask checkpoint as a SavedModel for serving.

  python tools/export_saved_model.py --gin_file=tiny_cpu.gin \
      --gin_bindings="TRAIN_FILE_PATTERN='unused'" \
      --checkpoint=/tmp/run --export_dir=/tmp/run/saved_model

Use the gin files and bindings of the training run (its
`model_dir/config.gin` works as the only --gin_file; a gin file is code, its
`import` lines import Python modules, so give only configs you trust).
--checkpoint is a
checkpoint prefix (`.../ckpt-200`), a model directory (latest checkpoint) or
a whole model's Keras weights file; a model directory of the JAX engine
(`KERAS_BACKEND=jax python train.py`) gives its newest
`shapemask-<step>.weights.h5`.

Signatures (see official_shapemask/serving/export.py for shapes):
  serving_default, image_tensor: `images` uint8 [B, H, W, 3], any H, W.
  image_bytes: `image_bytes` tf.string [B] of encoded JPEG/PNG images.
Outputs: num_detections, detection_boxes, detection_outer_boxes,
detection_classes, detection_scores, detection_masks (probabilities in the
outer-box frame), image_info, detection_boxes_original and
detection_outer_boxes_original (original-image pixels).
B is --batch_size (default 1; 0 = any batch size).

The export is written to a temporary directory next to --export_dir and
renamed into place when complete. --overwrite replaces an earlier SavedModel
only: a directory holding anything else (a training run's checkpoints,
config.gin, logs) is refused, before the checkpoint is read.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from official_shapemask import quiet_logs
from official_shapemask.cli import entry

FLAGS = flags.FLAGS


def _define_flags():
  """Defined on run only, so importing this module defines no global flags."""
  flags.DEFINE_multi_string(
      'gin_file', [], 'gin config of the model (repeatable; short names are '
      'found in gin/); the training run\'s config.gin works too.')
  flags.DEFINE_multi_string(
      'gin_bindings', [], 'gin binding NAME=VALUE (repeatable).')
  flags.DEFINE_string(
      'checkpoint', None, 'checkpoint prefix, model directory (latest '
      'checkpoint; JAX engine: newest shapemask-<step>.weights.h5) or a '
      'Keras *.weights.h5 file of the whole model.')
  flags.DEFINE_string('export_dir', None,
                      'output SavedModel directory.')
  flags.DEFINE_integer(
      'batch_size', 1, 'static batch size of the signatures; 0 = dynamic '
      '(any batch size).')
  flags.DEFINE_bool('overwrite', False,
                    'replace an earlier SavedModel in --export_dir (never a '
                    'directory holding anything else).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  for name in ('gin_file', 'checkpoint', 'export_dir'):
    if not FLAGS[name].value:
      raise app.UsageError(f'--{name} is required')
  if FLAGS.batch_size < 0:
    raise app.UsageError('--batch_size must be >= 0 (0 = dynamic)')
  # pylint: disable=g-import-not-at-top
  from official_shapemask.modeling import factory
  from official_shapemask.serving import export
  from official_shapemask.serving import export_dirs
  from official_shapemask.training import gin_utils
  from official_shapemask.training import shape_prior_files
  try:
    # Before anything is read: a wrong --export_dir fails at once.
    export_dirs.check_export_dir(FLAGS.export_dir, FLAGS.overwrite)
    gin_utils.parse_config(FLAGS.gin_file, FLAGS.gin_bindings)
    model = factory.build_shapemask_model(
        **shape_prior_files.model_overrides())
    checkpoint = export.restore_model(model, FLAGS.checkpoint)
    print(f'Restored {checkpoint}')
    result = export.export_saved_model(
        model, FLAGS.export_dir, batch_size=FLAGS.batch_size or None,
        checkpoint=checkpoint, overwrite=FLAGS.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  batch = result['batch_size'] or 'any'
  print(f'Exported {result["export_dir"]} in {result["seconds"]:.1f} s: '
        f'image size {result["image_size"]}, batch {batch}, '
        f'{result["num_classes"]} class slots')
  print(f'  serving_default / image_tensor: images uint8 [{batch}, H, W, 3]')
  print(f'  image_bytes: image_bytes string [{batch}]')
  print(f'  outputs: {", ".join(result["outputs"])}')
  if result['left_over']:
    print(f'The earlier export could not be deleted: {result["left_over"]}')
  return 0


def console_entry():
  """Entry point of the console script and of the tools/ launcher."""
  quiet_logs.install()  # Before TensorFlow is imported.
  _define_flags()
  entry.run(main, __name__)


if __name__ == '__main__':
  console_entry()
