"""Image resizing shared by the input parser and the SavedModel export.

TensorFlow ops (the input pipeline and serving run TensorFlow on the host).
"""

import tensorflow as tf


def resize_and_crop_image(image, output_size, scale_min, scale_max, seed):
  """RetinaNet-style scale jitter, random crop and zero padding.

  Draws ``r ~ U[scale_min, scale_max)``; target ``round(r * S)``;
  ``scale = min(target_h / h, target_w / w)``; bilinear resize to
  ``max(round([h, w] * scale), 1)`` (a side that would scale below one pixel,
  as in a 3x2000 image at S = 128, becomes one pixel, and its scale in
  ``image_info`` is ``1 / side``); when that exceeds ``S``, a random crop offset in
  ``[0, scaled - S]`` (truncated to an integer); pad bottom/right with zeros.
  With ``scale_min == scale_max == 1`` nothing is random and the offset is 0.

  Args:
    image: float32 ``[h, w, 3]``.
    output_size: python ``(S_h, S_w)``.
    scale_min: python float.
    scale_max: python float.
    seed: int ``[2]`` stateless seed.

  Returns:
    image: float32 ``[S_h, S_w, 3]``.
    image_info: float32 ``[4, 2]``: ``[[h, w], [S_h, S_w], [scale_y,
      scale_x], [offset_y, offset_x]]``.
  """
  image_size = tf.cast(tf.shape(image)[0:2], tf.float32)
  desired = tf.constant(output_size, tf.float32)
  jitter = not (scale_min == 1.0 and scale_max == 1.0)
  if jitter:
    scale_seed, offset_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    random_scale = tf.random.stateless_uniform([], scale_seed, scale_min,
                                               scale_max)
    target = tf.round(random_scale * desired)
  else:
    target = desired
  scale = tf.minimum(target[0] / image_size[0], target[1] / image_size[1])
  scaled_size = tf.maximum(tf.round(image_size * scale), 1.0)
  image_scale = scaled_size / image_size
  if jitter:
    max_offset = tf.maximum(scaled_size - desired, 0.0)
    offset = tf.cast(
        max_offset * tf.random.stateless_uniform([2], offset_seed), tf.int32)
  else:
    offset = tf.zeros([2], tf.int32)
  image = tf.image.resize(image, tf.cast(scaled_size, tf.int32),
                          method=tf.image.ResizeMethod.BILINEAR)
  if jitter:
    image = image[offset[0]:offset[0] + output_size[0],
                  offset[1]:offset[1] + output_size[1], :]
  image = tf.image.pad_to_bounding_box(image, 0, 0, output_size[0],
                                       output_size[1])
  image_info = tf.stack([image_size, desired, image_scale,
                         tf.cast(offset, tf.float32)])
  return image, image_info
