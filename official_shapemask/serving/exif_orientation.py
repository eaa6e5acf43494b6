"""EXIF orientation: from the stored pixels to the image as it is displayed.

A phone stores a portrait photo as landscape pixels plus an EXIF
orientation tag (274, values 1-8) that tells viewers how to turn it.
TensorFlow's image decoders (and so the model, the SavedModel's
`image_bytes` signature and the COCO converter) read the stored pixels and
ignore the tag; COCO's annotations refer to those stored pixels too.

`tools/predict.py` runs the model on the stored pixels and reports
detections in their frame (the results JSON), and uses `to_display` to draw
the overlay the way viewers show the photo. Tag values (EXIF 2.3, the
transform from stored to displayed pixels):

  1 as stored          5 transposed (main diagonal)
  2 mirrored left-right 6 turned 90 degrees clockwise
  3 turned 180 degrees 7 transposed along the anti-diagonal
  4 mirrored top-bottom 8 turned 90 degrees counter-clockwise

Boxes are `[ymin, xmin, ymax, xmax]` in pixels (continuous coordinates, the
image spanning `[0, H] x [0, W]`).
"""

import io

import numpy as np
from PIL import Image

ORIENTATION_TAG = 274  # 0x0112
SWAPS_SIDES = (5, 6, 7, 8)


def read(encoded):
  """The EXIF orientation (1-8) of encoded image bytes; 1 without a valid
  tag, or when the bytes are no image PIL reads."""
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      value = image.getexif().get(ORIENTATION_TAG, 1)
  except Exception:  # pylint: disable=broad-except
    return 1  # PIL raises many types; the decoder reports real damage.
  return value if isinstance(value, int) and 1 <= value <= 8 else 1


def transform_array(array, orientation):
  """Stored `[H, W, ...]` array -> displayed array (see the module doc)."""
  a = np.asarray(array)
  if orientation == 2:
    a = a[:, ::-1]
  elif orientation == 3:
    a = a[::-1, ::-1]
  elif orientation == 4:
    a = a[::-1]
  elif orientation == 5:
    a = np.swapaxes(a, 0, 1)
  elif orientation == 6:
    a = np.swapaxes(a, 0, 1)[:, ::-1]
  elif orientation == 7:
    a = np.swapaxes(a, 0, 1)[::-1, ::-1]
  elif orientation == 8:
    a = np.swapaxes(a, 0, 1)[::-1]
  return np.ascontiguousarray(a)


def transform_boxes(boxes, orientation, height, width):
  """Stored-frame boxes `[n, 4]` of an `height x width` image -> displayed.

  Returns:
    float32 `[n, 4]` `[ymin, xmin, ymax, xmax]` in the displayed frame.
  """
  b = np.asarray(boxes, np.float32).reshape(-1, 4)
  ymin, xmin, ymax, xmax = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
  if orientation == 2:
    out = (ymin, width - xmax, ymax, width - xmin)
  elif orientation == 3:
    out = (height - ymax, width - xmax, height - ymin, width - xmin)
  elif orientation == 4:
    out = (height - ymax, xmin, height - ymin, xmax)
  elif orientation == 5:
    out = (xmin, ymin, xmax, ymax)
  elif orientation == 6:
    out = (xmin, height - ymax, xmax, height - ymin)
  elif orientation == 7:
    out = (width - xmax, height - ymax, width - xmin, height - ymin)
  elif orientation == 8:
    out = (width - xmax, ymin, width - xmin, ymax)
  else:
    return b
  return np.stack(out, axis=-1).astype(np.float32)


def to_display(image, boxes, masks, orientation):
  """The image, boxes and masks of one prediction, as the photo displays.

  Args:
    image: uint8 `[H, W, 3]` stored pixels.
    boxes: `[n, 4]` boxes in stored pixels.
    masks: `[n, H, W]` masks over the stored pixels (or None).
    orientation: the EXIF orientation (1-8).

  Returns:
    `(image, boxes, masks)` in the displayed frame (`[W, H, ...]` for
    orientations 5-8).
  """
  height, width = np.asarray(image).shape[:2]
  image = transform_array(image, orientation)
  boxes = transform_boxes(boxes, orientation, height, width)
  if masks is not None:
    masks = np.moveaxis(
        transform_array(np.moveaxis(np.asarray(masks), 0, -1), orientation),
        -1, 0)
  return image, boxes, masks
