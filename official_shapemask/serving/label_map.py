"""Category id -> name maps for drawing detections.

Accepted files (JSON):
* the converter's `{prefix}_label_map.json`: `{"1": "person", ...}`;
* a COCO annotation file or any dict with `"categories": [{"id", "name"}]`;
* a list `[{"id": 1, "name": "person"}, ...]`.
"""

import json


def _from_categories(categories, path):
  names = {}
  for i, category in enumerate(categories):
    if not isinstance(category, dict) or 'id' not in category or (
        'name' not in category):
      raise ValueError(f'label map {path}: category #{i} needs "id" and '
                       f'"name", got {category!r}.')
    names[int(category['id'])] = str(category['name'])
  return names


def load_label_map(path):
  """Reads a label map file (formats in the module docstring).

  Args:
    path: JSON file path (local or gs://).

  Returns:
    dict int category id -> str name.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the JSON has none of the accepted layouts.
  """
  # Imported here so that drawing (visualize.py) needs no TensorFlow.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f'label map {path} does not exist.')
  with tf.io.gfile.GFile(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'label map {path} is not valid JSON: {e}') from e
  if isinstance(data, list):
    return _from_categories(data, path)
  if isinstance(data, dict) and 'categories' in data:
    return _from_categories(data['categories'], path)
  if isinstance(data, dict):
    try:
      return {int(k): str(v) for k, v in data.items()}
    except (TypeError, ValueError) as e:
      raise ValueError(
          f'label map {path}: keys must be integer category ids '
          f'({{"1": "person"}}), got {list(data)[:3]}.') from e
  raise ValueError(f'label map {path}: expected a JSON object or list, got '
                   f'{type(data).__name__}.')


def class_name(label_map, class_id):
  """The name of `class_id`, or `class <id>` when unknown."""
  if label_map and int(class_id) in label_map:
    return label_map[int(class_id)]
  return f'class {int(class_id)}'
