"""Decodes ShapeMask TFRecords (reference schema, spec section 7.1) to tensors.

Model Garden's ``official.vision.dataloaders.tf_example_decoder`` already
parses exactly this schema (normalised boxes, raw class ids, optional crowd
flags and areas with the same defaults, one PNG mask per instance, source id
generated from the image hash when empty, height/width taken from the image
when missing), so it is reused unchanged; this module only renames its outputs
to the short keys used throughout ``official_shapemask`` and fixes the dtypes
the parser relies on.
"""

import tensorflow as tf

from official.vision.dataloaders import tf_example_decoder as mg_decoder


class TfExampleDecoder:
  """Decodes one serialized ``tf.train.Example`` of the ShapeMask schema.

  ``decode(serialized)`` returns a dict (``n`` = instances in the record,
  ``H, W`` = original image size):

  - ``image``: uint8 ``[H, W, 3]``.
  - ``source_id``: tf.string scalar (COCO image id as a decimal string).
  - ``height``, ``width``: int32 scalars.
  - ``boxes``: float32 ``[n, 4]``, ``[ymin, xmin, ymax, xmax]`` normalised
    to [0, 1].
  - ``classes``: int32 ``[n]`` raw category ids.
  - ``is_crowds``: bool ``[n]``.
  - ``areas``: float32 ``[n]`` (pixels of the original image).
  - ``masks``: float32 ``[n, H, W]`` in {0, 1}, decoded from PNG.
  - ``masks_png``: tf.string ``[n]``, the PNG bytes exactly as stored.
  """

  def __init__(self):
    self._decoder = mg_decoder.TfExampleDecoder(include_mask=True)

  def decode(self, serialized_example):
    """Decodes a scalar tf.string tensor; see the class docstring."""
    data = self._decoder.decode(serialized_example)
    height = tf.cast(data['height'], tf.int32)
    width = tf.cast(data['width'], tf.int32)
    masks = data['groundtruth_instance_masks']
    # The Model Garden decoder leaves the mask spatial dims unknown; the
    # masks have the image size (the writer stores full-image masks).
    masks = tf.reshape(masks, [-1, height, width])
    num_masks = tf.shape(masks)[0]
    num_instances = tf.shape(data['groundtruth_classes'])[0]
    check = tf.debugging.Assert(
        tf.equal(num_masks, num_instances),
        ['ShapeMask records need one image/object/mask PNG per instance; '
         'record with image/source_id', data['source_id'], 'has',
         num_instances, 'instances and', num_masks, 'masks'])
    with tf.control_dependencies([check]):
      masks = tf.identity(masks)
    return {
        'image': data['image'],
        'source_id': data['source_id'],
        'height': height,
        'width': width,
        'boxes': tf.cast(data['groundtruth_boxes'], tf.float32),
        'classes': tf.cast(data['groundtruth_classes'], tf.int32),
        'is_crowds': tf.cast(data['groundtruth_is_crowd'], tf.bool),
        'areas': tf.cast(data['groundtruth_area'], tf.float32),
        'masks': masks,
        'masks_png': data['groundtruth_instance_masks_png'],
    }

  def __call__(self, serialized_example):
    return self.decode(serialized_example)
