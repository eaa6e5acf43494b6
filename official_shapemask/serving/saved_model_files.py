"""Names the damaged file of a SavedModel that does not load.

`tf.saved_model.load` reports a damaged export in terms that often name no
file: `IndexError: Read less bytes than requested` for truncated variable
data, `not an sstable (bad magic number)` for a damaged variable index, a
`ValueError` about "0 MetaGraphs" for an empty `saved_model.pb`.
`find_damage` looks at the export's files one by one (only after a load
failed, so a healthy load costs nothing extra) and names the first that
does not read:

1. `saved_model.pb` (or `saved_model.pbtxt`): missing, does not parse, or
   holds no MetaGraph;
2. `variables/variables.index`: missing or not a checkpoint index;
3. `variables/variables.data-*`: missing, or a tensor that reads short or
   fails its checksum (every tensor is read).
"""

import os

from google.protobuf import message as protobuf_message
from google.protobuf import text_format
import tensorflow as tf

from tensorflow.core.protobuf import saved_model_pb2

PROTO_FILE = 'saved_model.pb'
PROTO_TEXT_FILE = 'saved_model.pbtxt'
VARIABLES_PREFIX = os.path.join('variables', 'variables')


def _first_line(error):
  text = getattr(error, 'message', None) or str(error) or ''
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return f'{type(error).__name__}: {lines[0] if lines else ""}'.strip(': ')


def _proto_problem(export_dir):
  """`(path, why)` for a missing, unparsable or empty SavedModel proto."""
  binary = os.path.join(export_dir, PROTO_FILE)
  text = os.path.join(export_dir, PROTO_TEXT_FILE)
  proto = saved_model_pb2.SavedModel()
  if tf.io.gfile.exists(binary):
    path = binary
    try:
      with tf.io.gfile.GFile(binary, 'rb') as f:
        proto.ParseFromString(f.read())
    except (protobuf_message.DecodeError, tf.errors.OpError) as e:
      return path, f'does not parse ({_first_line(e)})'
  elif tf.io.gfile.exists(text):
    path = text
    try:
      with tf.io.gfile.GFile(text, 'r') as f:
        text_format.Parse(f.read(), proto)
    except (text_format.ParseError, tf.errors.OpError) as e:
      return path, f'does not parse ({_first_line(e)})'
  else:
    return binary, 'is missing'
  if not proto.meta_graphs:
    size = tf.io.gfile.stat(path).length
    return path, f'holds no MetaGraph ({size} bytes: empty or cut short)'
  return None


def _variables_problem(export_dir):
  """`(path, why)` for a missing or unreadable variables file."""
  prefix = os.path.join(export_dir, VARIABLES_PREFIX)
  index = prefix + '.index'
  data_files = sorted(tf.io.gfile.glob(prefix + '.data-*'))
  if not tf.io.gfile.exists(index):
    if not data_files:
      return None  # A SavedModel without variables.
    return index, 'is missing'
  if not data_files:
    return prefix + '.data-00000-of-00001', 'is missing'
  try:
    reader = tf.train.load_checkpoint(prefix)
  except (tf.errors.OpError, ValueError, OSError) as e:
    return index, f'cannot be read ({_first_line(e)})'
  data = data_files[0] if len(data_files) == 1 else prefix + '.data-*'
  try:
    for name in sorted(reader.get_variable_to_shape_map()):
      reader.get_tensor(name)
  except (IndexError, tf.errors.OpError, ValueError, OSError) as e:
    return data, f'cannot be read ({_first_line(e)})'
  return None


def find_damage(export_dir):
  """The first damaged file of a SavedModel, or None.

  Returns:
    `(path, why)`: e.g. `('.../variables/variables.data-00000-of-00001',
    'cannot be read (IndexError: Read less bytes than requested)')`.
  """
  return _proto_problem(export_dir) or _variables_problem(export_dir)
