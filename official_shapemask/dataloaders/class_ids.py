"""Checks that the data's category ids fit the model's class slots.

A model with ``num_classes`` class slots (background 0 included; COCO: 91)
can only learn the raw category ids ``0 .. num_classes - 1``. A larger id
would train without a word: the focal loss's one-hot row of such an id is
all zeros (its objects are taught as background) and the mask heads clamp it
to the last class. Two checks stop that before the first step:

* ``check_label_maps``: the converter writes ``{prefix}_label_map.json``
  beside its shards ``{prefix}-NNNNN-of-NNNNN.tfrecord``
  (``data_prep/coco_tfrecord.py``); its largest id is compared with
  ``num_classes`` before anything starts, naming the id and the file.
* ``check_in_graph``: for records without a label map (another writer), the
  parser asserts on every record's decoded ids; the failing record's shard
  travels with the record through tf.data (``input_reader.build_dataset``
  pairs each record with its file), so ``describe_error`` turns the
  ``InvalidArgumentError`` into one line naming the id, the image and the
  shard.
"""

import json
import os
import re

import tensorflow as tf

# The converter's shard names (coco_tfrecord.shard_paths).
_SHARD_NAME = re.compile(r'^(.*)-\d{5}-of-\d{5}\.tfrecord$')
LABEL_MAP_SUFFIX = '_label_map.json'
# The phrase the in-graph assertion carries; `describe_error` finds it.
_IN_GRAPH = re.compile(r'(category id -?\d+ \(image [^)]*\) in .*? is '
                       r'outside 0\.\.-?\d+, the class slots of '
                       r'num_classes=\d+)')


def label_map_path(record_file):
  """`{prefix}_label_map.json` of a converter shard name (whether it exists
  or not); None for a file not named like the converter's shards."""
  match = _SHARD_NAME.match(os.fspath(record_file))
  return match.group(1) + LABEL_MAP_SUFFIX if match else None


def label_map_of(record_file):
  """The converter's label map beside `record_file`, or None (none there)."""
  path = label_map_path(record_file)
  return path if path and tf.io.gfile.exists(path) else None


def _read_label_map(path):
  """``{id: name}`` of a converter label map; ValueError naming the file."""
  try:
    with tf.io.gfile.GFile(path, 'r') as f:
      data = json.load(f)
    return {int(k): str(v) for k, v in data.items()}
  except (ValueError, TypeError, AttributeError, tf.errors.OpError) as e:
    raise ValueError(f'{path} is not a label map of '
                     f'tools/create_coco_tfrecord.py ({{"<id>": "<name>"}}): '
                     f'{e}') from None


def too_large(num_classes):
  """What to do about ids that do not fit `num_classes` (message tail)."""
  return (f'set NUM_CLASSES (build_shapemask_model.num_classes) above the '
          f'largest id, with a shape-prior file of as many rows, or '
          f'renumber the categories below {num_classes}')


def check_label_maps(files, num_classes, extra_label_maps=()):
  """Raises ValueError when a label map of `files` has an id that does not
  fit `num_classes`.

  Args:
    files: TFRecord paths (the label map of each converter shard is read
      once).
    num_classes: the model's class slots, background 0 included.
    extra_label_maps: label map paths the file pattern matched itself.

  Returns:
    the label maps read (sorted paths).

  Raises:
    ValueError: one line naming the largest bad id, its name and the label
      map file; or a label map that cannot be read.
  """
  maps = set(extra_label_maps)
  for path in files:
    found = label_map_of(path)
    if found:
      maps.add(found)
  for path in sorted(maps):
    names = _read_label_map(path)
    bad = sorted(i for i in names if i >= num_classes or i < 0)
    if bad:
      worst = bad[-1] if bad[-1] >= num_classes else bad[0]
      more = (f', one of {len(bad)} ids outside 0..{num_classes - 1}'
              if len(bad) > 1 else '')
      raise ValueError(
          f'category id {worst} ({names[worst]!r}{more}) in {path} does not '
          f'fit num_classes={num_classes} (class slots 0..{num_classes - 1}, '
          f'0 = background): {too_large(num_classes)}')
  return sorted(maps)


def check_in_graph(classes, num_classes, source_id, source_file=None):
  """`classes` with an assertion that every id is in ``[0, num_classes)``.

  Args:
    classes: int32 ``[n]`` raw category ids of one record.
    num_classes: python int.
    source_id: tf.string scalar, the record's image id (for the message).
    source_file: optional tf.string scalar, the file the record came from.

  Returns:
    `classes`, depending on the assertion.
  """
  ok = tf.reduce_all(tf.logical_and(classes >= 0, classes < num_classes))

  def fail():  # The message is built only for a bad record.
    largest = tf.reduce_max(tf.concat([classes, [0]], 0))
    smallest = tf.reduce_min(tf.concat([classes, [0]], 0))
    worst = tf.where(largest >= num_classes, largest, smallest)
    where = source_file if source_file is not None else tf.constant(
        'a record')
    message = tf.strings.join([
        'category id ', tf.strings.as_string(worst), ' (image ', source_id,
        ') in ', where, f' is outside 0..{num_classes - 1}, the class '
        f'slots of num_classes={num_classes}'])
    with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
      return tf.identity(classes)

  return tf.cond(ok, lambda: tf.identity(classes), fail)


def describe_error(error):
  """The in-graph check's text in a tf.data error, or None.

  Args:
    error: a `tf.errors.OpError` (or its message).

  Returns:
    ``'category id N (image I) in FILE is outside 0..C-1, the class slots
    of num_classes=C: <what to do>'``, or None when `error` is another
    error.
  """
  match = _IN_GRAPH.search(getattr(error, 'message', None) or str(error))
  if not match:
    return None
  num_classes = int(match.group(1).rsplit('=', 1)[1])
  return f'{match.group(1)}: {too_large(num_classes)}'


