"""SavedModel export of a ShapeMask model (reference §9.5).

`ShapeMaskServingModule` wraps a built `ShapeMaskModel` in a `tf.Module` with
two `tf.function` entry points, each taking raw images and returning the
detections in canvas and in original-image coordinates:

* `serve_images(images)`: uint8 `[B, H, W, 3]` (one `H x W` per batch, any
  size); exported as the signatures `serving_default` and `image_tensor`
  (input key `images`).
* `serve_bytes(image_bytes)`: tf.string `[B]` of encoded JPEG/PNG (also
  BMP/GIF, first frame), each of its own size; exported as the signature
  `image_bytes` (input key `image_bytes`).

Preprocessing is the eval parser's (spec §7.3): ImageNet mean/std
normalisation (`preprocess_ops.normalize_image`), the long side scaled to the
model's `S`, bottom/right zero padding to `S x S`
(`image_ops.resize_and_crop_image` with scale 1.0, as in the parser), and
`image_info = [[h, w], [S, S], [scale_y, scale_x], [0, 0]]`.

Outputs (`B` = batch, `n` = `max_num_detections` = 100, `M` = mask side
`m * u` = 128; boxes `[ymin, xmin, ymax, xmax]` float32):

* `num_detections` int32 `[B]`: valid slots come first.
* `detection_boxes`, `detection_outer_boxes` `[B, n, 4]`: canvas pixels.
* `detection_boxes_original`, `detection_outer_boxes_original` `[B, n, 4]`:
  original-image pixels, `(box + offset) / scale` (not clipped to the
  image; padded slots hold `offset / scale`).
* `detection_classes` int32 `[B, n]`, `detection_scores` `[B, n]` (-1 in
  padded slots).
* `detection_masks` `[B, n, M, M]`: probabilities in the frame of the
  **outer** box (paste with `official_shapemask.evaluation.
  paste_instance_masks` and the original outer boxes).
* `image_info` `[B, 4, 2]`.
"""

import json
import os
import time
import uuid

import tensorflow as tf

from official.vision.ops import preprocess_ops
from official_shapemask.dataloaders import image_ops
from official_shapemask.serving import export_dirs
from official_shapemask.training import engine_switch
from official_shapemask.weights import any_engine
from official_shapemask.weights import checkpoints
from official_shapemask.weights import errors
from official_shapemask.weights import paths

SIGNATURE_IMAGE_TENSOR = 'image_tensor'
SIGNATURE_IMAGE_BYTES = 'image_bytes'
DEFAULT_SIGNATURE = 'serving_default'
IMAGES_INPUT_KEY = 'images'
BYTES_INPUT_KEY = 'image_bytes'
OUTPUT_KEYS = (
    'num_detections',
    'detection_boxes',
    'detection_outer_boxes',
    'detection_classes',
    'detection_scores',
    'detection_masks',
    'image_info',
    'detection_boxes_original',
    'detection_outer_boxes_original',
)
# Written next to the SavedModel (SavedModel's place for extra files).
METADATA_FILE = os.path.join('assets.extra', 'shapemask_export.json')


def preprocess_image(image, image_size):
  """The eval parser's preprocessing of one image.

  Args:
    image: uint8 `[H, W, 3]`.
    image_size: int, the model's square canvas side `S`.

  Returns:
    image: float32 `[S, S, 3]`, normalised, long side scaled to `S`, padded
      bottom/right with zeros.
    image_info: float32 `[4, 2]`: `[[H, W], [S, S], [scale_y, scale_x],
      [offset_y, offset_x]]` (offset 0).
  """
  image = preprocess_ops.normalize_image(image)
  # The parser's own resize (scale range 1.0: deterministic, no crop).
  image, image_info = image_ops.resize_and_crop_image(
      image, (image_size, image_size), 1.0, 1.0, seed=None)
  image = tf.ensure_shape(image, [image_size, image_size, 3])
  return image, image_info


def decode_image(image_bytes):
  """Decodes one encoded image (JPEG, PNG, BMP, GIF first frame).

  Args:
    image_bytes: scalar tf.string.

  Returns:
    uint8 `[H, W, 3]` (grey images are expanded to 3 channels).
  """
  image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8,
                             expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def boxes_to_original(boxes, image_info):
  """`(box + offset) / scale`: canvas `[B, n, 4]` -> original pixels."""
  scale = tf.tile(image_info[:, 2:3, :], [1, 1, 2])  # [B, 1, 4]
  offset = tf.tile(image_info[:, 3:4, :], [1, 1, 2])
  return (boxes + offset) / scale


class ShapeMaskServingModule(tf.Module):
  """Raw images in, detections and masks out; see the module docstring.

  Args:
    model: a built `ShapeMaskModel` (weights restored).
    batch_size: int, the static batch of the exported signatures, or None
      for a dynamic batch.
  """

  def __init__(self, model, batch_size=1):
    super().__init__(name='shapemask_serving')
    if batch_size is not None and int(batch_size) < 1:
      raise ValueError(f'batch_size must be >= 1 or None (dynamic), got '
                       f'{batch_size}.')
    self.model = model
    self.image_size = int(model.image_size)
    self.batch_size = None if batch_size is None else int(batch_size)
    # Keras 3 variables are not tf.Variables; expose their TF values so the
    # loaded object lists them (the functions capture them either way).
    self.model_variables = [v.value for v in model.variables]
    self.serve_images = tf.function(
        self._serve_images,
        input_signature=[tf.TensorSpec([self.batch_size, None, None, 3],
                                       tf.uint8, name=IMAGES_INPUT_KEY)])
    self.serve_bytes = tf.function(
        self._serve_bytes,
        input_signature=[tf.TensorSpec([self.batch_size], tf.string,
                                       name=BYTES_INPUT_KEY)])

  def _preprocess_batch(self, images_or_bytes, decode):
    size = self.image_size

    def one(value):
      image = decode_image(value) if decode else value
      return preprocess_image(image, size)

    return tf.map_fn(
        one, images_or_bytes,
        fn_output_signature=(tf.TensorSpec([size, size, 3], tf.float32),
                             tf.TensorSpec([4, 2], tf.float32)))

  def _run(self, images, image_info):
    outputs = self.model({'images': images, 'image_info': image_info},
                         training=False)
    outputs = {k: tf.convert_to_tensor(v) for k, v in outputs.items()}
    outputs['num_detections'] = tf.cast(outputs['num_detections'], tf.int32)
    outputs['detection_classes'] = tf.cast(outputs['detection_classes'],
                                           tf.int32)
    outputs['image_info'] = image_info
    outputs['detection_boxes_original'] = boxes_to_original(
        outputs['detection_boxes'], image_info)
    outputs['detection_outer_boxes_original'] = boxes_to_original(
        outputs['detection_outer_boxes'], image_info)
    return {k: outputs[k] for k in OUTPUT_KEYS}

  def _serve_images(self, images):
    """uint8 `[B, H, W, 3]` -> output dict."""
    return self._run(*self._preprocess_batch(images, decode=False))

  def _serve_bytes(self, image_bytes):
    """tf.string `[B]` encoded images -> output dict."""
    return self._run(*self._preprocess_batch(image_bytes, decode=True))

  def signatures(self):
    """The concrete functions to export, by signature name."""
    images_fn = self.serve_images.get_concrete_function()
    return {
        DEFAULT_SIGNATURE: images_fn,
        SIGNATURE_IMAGE_TENSOR: images_fn,
        SIGNATURE_IMAGE_BYTES: self.serve_bytes.get_concrete_function(),
    }


def restore_model(model, checkpoint, print_fn=print):
  """Restores `model`'s weights from a training checkpoint.

  Args:
    model: a built `ShapeMaskModel`.
    checkpoint: a checkpoint prefix (`.../ckpt-200`), a model directory, a
      JAX run's Orbax step (`.../checkpoints/<step>`) or a whole model's
      `*.weights.h5` file. A model directory gives its newest step of
      either engine: a TensorFlow checkpoint, an Orbax checkpoint or a
      `shapemask-<step>.weights.h5` (at one step, the one that needs no
      conversion); which one is printed.
    print_fn: where the line naming the step goes (model directories).

  Returns:
    the checkpoint prefix, weights file or Orbax folder restored.

  Raises:
    FileNotFoundError: no checkpoint at `checkpoint`.
    ValueError: the checkpoint does not hold every model variable, or a
      shape differs (the gin config does not match the training run), or
      its files cannot be read (truncated, overwritten, missing), or an
      Orbax step needs JAX, which is not installed; names it.
  """
  checkpoint = str(checkpoint)
  ref = any_engine.orbax_step(checkpoint)
  if ref is None and tf.io.gfile.isdir(checkpoint) and (
      paths.saved_model_variables(checkpoint) is None):
    ref = _newest_in(checkpoint, print_fn)
  if ref is not None and ref.format == any_engine.ORBAX:
    engine_switch.load(ref, model, instead=_readable_instead(ref))
    return ref.path
  path = paths.resolve_checkpoint(ref.path if ref else checkpoint)
  if paths.is_keras_weights_file(path):
    return checkpoints.load_model_weights(model, path)
  root = tf.train.Checkpoint(model=model)
  try:
    status = root.restore(path)
    status.expect_partial()  # The optimizer slots are not needed.
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError) as e:
    raise ValueError(
        f'checkpoint {path} does not match the model built from the gin '
        f'config (same gin files and bindings as in training?): {e}') from e
  except (IndexError, tf.errors.DataLossError, tf.errors.NotFoundError) as e:
    # Truncated data reads short (IndexError), overwritten bytes fail the
    # checksum, a data file is missing.
    raise ValueError(
        f'checkpoint {path} cannot be read ({errors.first_line(e)}); '
        f'give an earlier one, e.g. --checkpoint={path.rsplit("-", 1)[0]}-N '
        f'(see {os.path.dirname(path) or "."}/checkpoint)') from e
  untracked = untracked_variables(model)
  if untracked:
    raise ValueError(
        f'{len(untracked)} of {len(model.variables)} model variables are not '
        f'reachable from the model through tf.train.Checkpoint, so no '
        f'checkpoint of it holds them and they would keep their initial '
        f'values (Keras 3 does not checkpoint layers kept in Python lists or '
        f'dicts), e.g. {", ".join(untracked[:3])}. Refusing to export '
        f'{path} with uninitialised weights.')
  return path


def _newest_in(model_dir, print_fn):
  """The newest step of either engine in a model directory (said), or None
  when it holds none (then the resolver names the directory)."""
  found = any_engine.list_steps(model_dir, weights_files=True)
  if not found:
    return None
  ref = found[-1]
  older = [r for r in found if r.engine != ref.engine]
  if print_fn is not None:
    other = (f' (newer than {any_engine.ENGINE_NAMES[older[-1].engine]}\'s '
             f'step {older[-1].step})' if older else '')
    print_fn(f'Using step {ref.step} of {model_dir}: {ref.describe()}{other}')
  return ref


def _readable_instead(ref):
  """What to give instead of an Orbax step when JAX is not installed."""
  found = [r for r in any_engine.list_steps(any_engine.model_dir_of(ref),
                                            weights_files=True)
           if r.format != any_engine.ORBAX]
  if not found:
    return ('export from a JAX run\'s shapemask-<step>.weights.h5 (written '
            'when it reaches its total steps)')
  return (f'give {found[-1].describe()} (step {found[-1].step}) instead: '
          f'--checkpoint={found[-1].path}')


def untracked_variables(model):
  """Paths of `model` variables that `tf.train.Checkpoint(model=model)`
  cannot save or restore (not reachable in its object graph)."""
  reachable = {id(t) for t in tf.train.TrackableView(model).descendants()}
  return [v.path for v in model.variables
          if id(v) not in reachable and id(v.value) not in reachable]


def _model_metadata(model, batch_size, checkpoint):
  generator = model.detection_generator.get_config()
  return {
      'image_size': model.image_size,
      'batch_size': batch_size,
      'num_classes': int(model.head.get_config()['num_classes']),
      'max_num_detections': int(generator['max_num_detections']),
      'mask_size': int(model.prior_head.mask_crop_size *
                       model.fine_head.upsample_factor),
      'checkpoint': checkpoint,
      'signatures': {
          DEFAULT_SIGNATURE: IMAGES_INPUT_KEY,
          SIGNATURE_IMAGE_TENSOR: IMAGES_INPUT_KEY,
          SIGNATURE_IMAGE_BYTES: BYTES_INPUT_KEY,
      },
      'outputs': list(OUTPUT_KEYS),
  }


def export_saved_model(model, export_dir, batch_size=1, checkpoint=None,
                       overwrite=False, extra_metadata=None):
  """Writes `model` as a SavedModel with the serving signatures.

  The SavedModel is written to a temporary directory next to `export_dir`
  and swapped into place when complete (`export_dirs.swap_in`), so
  `export_dir` never holds a partial export and a failed export leaves an
  earlier one whole. Also writes `assets.extra/shapemask_export.json`
  (image size, batch size, classes, checkpoint, signatures).

  Args:
    model: a built `ShapeMaskModel` with its weights.
    export_dir: output directory.
    batch_size: static batch size of the signatures, or None for dynamic.
    checkpoint: optional checkpoint path, recorded in the metadata.
    overwrite: replace an earlier SavedModel in `export_dir` (never a
      directory holding anything else, such as a training run).
    extra_metadata: optional dict merged into the metadata JSON.

  Returns:
    dict: the metadata written, plus `export_dir`, `seconds` and
    `left_over` (an earlier export that could not be deleted, or None).

  Raises:
    FileExistsError: `export_dir` is a file, or not empty and either not a
      SavedModel or not `overwrite` (`export_dirs.check_export_dir`).
  """
  start = time.perf_counter()
  export_dir = export_dir.rstrip('/')
  export_dirs.check_export_dir(export_dir, overwrite)
  parent = os.path.dirname(export_dir)
  if parent:
    tf.io.gfile.makedirs(parent)
  token = uuid.uuid4().hex[:8]
  tmp_dir = f'{export_dir}.tmp-{token}'
  module = ShapeMaskServingModule(model, batch_size=batch_size)
  metadata = _model_metadata(model, batch_size, checkpoint)
  metadata.update(extra_metadata or {})
  try:
    tf.saved_model.save(module, tmp_dir, signatures=module.signatures())
    tf.io.gfile.makedirs(os.path.join(tmp_dir, 'assets.extra'))
    with tf.io.gfile.GFile(os.path.join(tmp_dir, METADATA_FILE), 'w') as f:
      json.dump(metadata, f, indent=2)
    # Checked again: another process may have written there meanwhile.
    export_dirs.check_export_dir(export_dir, overwrite)
    left_over = export_dirs.swap_in(tmp_dir, export_dir, token)
  finally:
    if tf.io.gfile.exists(tmp_dir):
      tf.io.gfile.rmtree(tmp_dir)
  metadata = dict(metadata, export_dir=export_dir, left_over=left_over,
                  seconds=time.perf_counter() - start)
  return metadata


def read_metadata(export_dir):
  """The metadata JSON of an export (empty dict when absent)."""
  path = os.path.join(export_dir, METADATA_FILE)
  if not tf.io.gfile.exists(path):
    return {}
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)
