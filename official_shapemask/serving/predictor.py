"""Runs ShapeMask on encoded images, from a SavedModel or a checkpoint.

`Predictor` feeds encoded image bytes to the `image_bytes` serving function
(loaded from an export, or built in-process from gin + checkpoint with the
same `ShapeMaskServingModule`), in batches of the function's static batch
size (the last batch padded by repeating its last image). `image_detections`
turns one image's outputs into numpy detections in original-image pixels with
full-size binary masks (pasted with the outer boxes, reference §9.6), and
`coco_results` into COCO result dicts.
"""

from google.protobuf import message as protobuf_message
import numpy as np
import tensorflow as tf

from official_shapemask.evaluation import coco_utils
from official_shapemask.evaluation import mask_paste
from official_shapemask.serving import export
from official_shapemask.serving import saved_model_files

# What `tf.saved_model.load` raises for a damaged or incomplete export.
_LOAD_ERRORS = (OSError, ValueError, IndexError, RuntimeError,
                tf.errors.OpError, protobuf_message.DecodeError)


class SavedModelError(ValueError):
  """A SavedModel that does not load; the message names the file."""


class Predictor:
  """Encoded images -> serving outputs (numpy).

  Args:
    serve_bytes: callable, tf.string `[B]` -> dict of output tensors
      (`export.OUTPUT_KEYS`).
    batch_size: the static batch size `B` of `serve_bytes`, or None when it
      takes any batch.
    source: str describing where the model came from (for messages).
  """

  def __init__(self, serve_bytes, batch_size, source):
    self._serve_bytes = serve_bytes
    self.batch_size = batch_size
    self.source = source

  @classmethod
  def from_saved_model(cls, export_dir):
    """Loads an export of `tools/export_saved_model.py`.

    Raises:
      FileNotFoundError: `export_dir` does not exist.
      SavedModelError: it does not load; names the damaged file
        (`saved_model_files.find_damage`).
      ValueError: it has no `image_bytes` signature.
    """
    if not tf.io.gfile.exists(export_dir):
      raise FileNotFoundError(f'SavedModel directory {export_dir} does not '
                              f'exist.')
    if not tf.io.gfile.isdir(export_dir):
      raise SavedModelError(f'SavedModel {export_dir} is a file; give the '
                            f'directory tools/export_saved_model.py wrote.')
    try:
      loaded = tf.saved_model.load(export_dir)
    except _LOAD_ERRORS as e:
      damage = saved_model_files.find_damage(export_dir)
      if damage:
        path, why = damage
        raise SavedModelError(
            f'SavedModel {export_dir} cannot be loaded: {path} {why}; export '
            f'it again (tools/export_saved_model.py)') from None
      lines = (getattr(e, 'message', None) or str(e)).strip().splitlines()
      raise SavedModelError(
          f'SavedModel {export_dir} cannot be loaded: {type(e).__name__}: '
          f'{lines[0] if lines else ""}') from None
    signatures = dict(loaded.signatures)
    if export.SIGNATURE_IMAGE_BYTES not in signatures:
      raise ValueError(
          f'SavedModel {export_dir} has no {export.SIGNATURE_IMAGE_BYTES!r} '
          f'signature (found {sorted(signatures)}); export it with '
          f'tools/export_saved_model.py.')
    signature = signatures[export.SIGNATURE_IMAGE_BYTES]
    spec = signature.structured_input_signature[1][export.BYTES_INPUT_KEY]
    batch_size = spec.shape[0]

    def serve_bytes(image_bytes):
      return signature(**{export.BYTES_INPUT_KEY: image_bytes})

    predictor = cls(serve_bytes, batch_size, f'SavedModel {export_dir}')
    predictor._loaded = loaded  # Keeps the variables alive.  pylint: disable=protected-access
    return predictor

  @classmethod
  def from_checkpoint(cls, model, checkpoint, batch_size=1):
    """Restores a training checkpoint into `model` and serves it.

    Args:
      model: a `ShapeMaskModel` built as in training (the run's gin config:
        `tools/predict.py --gin_file` parses it and builds the model).
      checkpoint: what `export.restore_model` takes.
      batch_size: images per call of the model.
    """
    path = export.restore_model(model, checkpoint)
    module = export.ShapeMaskServingModule(model, batch_size=batch_size)
    predictor = cls(module.serve_bytes, batch_size, f'checkpoint {path}')
    predictor._module = module  # pylint: disable=protected-access
    return predictor

  def predict_bytes(self, image_bytes):
    """Runs the model on a list of encoded images.

    Args:
      image_bytes: list of `bytes` (JPEG/PNG/...), length `n`.

    Returns:
      dict of numpy arrays, each with leading dimension `n`.
    """
    image_bytes = list(image_bytes)
    if not image_bytes:
      raise ValueError('predict_bytes needs at least one image.')
    chunk = self.batch_size or len(image_bytes)
    parts = []
    for start in range(0, len(image_bytes), chunk):
      batch = image_bytes[start:start + chunk]
      count = len(batch)
      batch = batch + [batch[-1]] * (chunk - count)
      outputs = self._serve_bytes(tf.constant(batch, tf.string))
      parts.append({k: np.asarray(v)[:count] for k, v in outputs.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def image_detections(outputs, index, score_threshold=None):
  """The detections of one image, in original-image pixels.

  Args:
    outputs: dict of numpy serving outputs with a batch dimension.
    index: which image of the batch.
    score_threshold: optional float; keep only scores >= it (default: every
      valid slot).

  Returns:
    dict with `boxes` float `[k, 4]` yxyx, `outer_boxes` `[k, 4]`, `classes`
    int `[k]`, `scores` `[k]`, `masks` uint8 `[k, H, W]` in {0, 1} (pasted
    with the outer boxes) and `image_size` `(H, W)`.
  """
  num = int(outputs['num_detections'][index])
  scores = np.asarray(outputs['detection_scores'][index][:num], np.float32)
  keep = np.arange(num)
  if score_threshold is not None:
    keep = keep[scores >= score_threshold]
  info = np.asarray(outputs['image_info'][index])
  height, width = (int(round(v)) for v in info[0])
  outer = np.asarray(outputs['detection_outer_boxes_original'][index])[keep]
  masks = mask_paste.paste_instance_masks(
      np.asarray(outputs['detection_masks'][index])[keep], outer, height,
      width)
  return {
      'boxes': np.asarray(outputs['detection_boxes_original'][index])[keep],
      'outer_boxes': outer,
      'classes': np.asarray(outputs['detection_classes'][index])[keep],
      'scores': np.asarray(outputs['detection_scores'][index])[keep],
      'masks': masks,
      'image_size': (height, width),
  }


def coco_results(image_id, detections):
  """COCO result dicts (bbox xywh, RLE segmentation) of `image_detections`."""
  rles = coco_utils.encode_binary_masks(
      np.transpose(detections['masks'], (1, 2, 0)))
  return coco_utils.detections_to_coco_results(
      image_id, coco_utils.yxyx_to_xywh(detections['boxes']),
      detections['classes'], detections['scores'], rles)
