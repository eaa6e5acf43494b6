"""tf.data input pipeline for ShapeMask TFRecords (spec section 7.3, reader).

Pipeline: list files -> shard by ``tf.distribute.InputContext`` -> parallel
interleave of ``TFRecordDataset`` (each record paired with its file name when
the parser takes ``source_file``) -> (cache) -> shuffle -> repeat (training)
-> parallel map of the parser with a per-element stateless seed -> batch ->
prefetch. Every batch has static shapes.

Training batches drop the last partial batch (the stream repeats forever).
Evaluation never drops images: ``batch_size - 1`` dummy examples are appended
and the batch is taken with ``drop_remainder=True``, so the last real images
are completed with dummies (``groundtruths['source_id'] == -1``,
``num_detections == 0``) and every real image appears exactly once. This fixes
pitfall 8 of the reference (trailing eval images never evaluated).

Files a pattern matches that are not TFRecords by name (``*.json``: the
converter writes ``{prefix}_label_map.json`` beside its shards, so
``data/train*`` matches it) are skipped, with an INFO log line.
``check_record_headers`` reads the first record header of each file (12
bytes, no pass over the data) to name a file that is not a TFRecord file
before a train step is built, and ``find_corrupt_files`` names the shard
behind a ``corrupted record at <offset>`` error of tf.data, which names none.
"""

import concurrent.futures
import inspect
import logging
import re
import struct

import gin
import tensorflow as tf

_DEFAULT_SEED = 0

# File names a record pattern may match that are never TFRecords.
NON_RECORD_SUFFIXES = ('.json',)


def split_record_files(file_pattern):
  """TFRecord files matching ``file_pattern`` and the files skipped by name.

  Args:
    file_pattern: a glob, a comma-separated string of globs, or a list of
      globs.

  Returns:
    ``(files, skipped)``: sorted unique paths, and the sorted matches whose
    name ends in one of ``NON_RECORD_SUFFIXES``.

  Raises:
    ValueError: when a pattern matches no file, or only skipped files (the
      pattern is named).
  """
  if isinstance(file_pattern, str):
    patterns = [p for p in file_pattern.split(',') if p]
  else:
    patterns = list(file_pattern)
  if not patterns:
    raise ValueError(f'No file pattern given: {file_pattern!r}.')
  files, skipped = set(), set()
  for pattern in patterns:
    matched = tf.io.gfile.glob(pattern)
    if not matched:
      raise ValueError(f'File pattern {pattern!r} matches no file.')
    records = [m for m in matched
               if not m.lower().endswith(NON_RECORD_SUFFIXES)]
    if not records:
      raise ValueError(
          f'File pattern {pattern!r} matches no TFRecord file, only '
          f'{", ".join(sorted(matched))}.')
    files.update(records)
    skipped.update(set(matched) - set(records))
  return sorted(files), sorted(skipped)


def list_files(file_pattern):
  """Sorted TFRecord files matching ``file_pattern`` (see
  ``split_record_files``); skipped files are logged (INFO)."""
  files, skipped = split_record_files(file_pattern)
  if skipped:
    logging.info('%s: skipping %s (not TFRecord files)', file_pattern,
                    ', '.join(skipped))
  return files


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data):
  """The TFRecord format's masked CRC-32C (Castagnoli) of ``data``."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_HEADER = 12  # uint64 length + masked CRC of the length.
_FOOTER = 4  # masked CRC of the data.


def _header_problem(path):
  """Why ``path`` is not a TFRecord file, from its first header; or None."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    header = f.read(_HEADER)
  if not header:
    return None  # An empty file holds no records.
  if len(header) < _HEADER:
    return (f'{len(header)} bytes, shorter than one record header '
            f'({_HEADER} bytes)')
  length_bytes, crc = header[:8], struct.unpack('<I', header[8:])[0]
  if _masked_crc32c(length_bytes) != crc:
    return 'its first record header fails its checksum'
  return None


def check_record_headers(files, max_workers=16):
  """Raises ValueError naming the first file that is not a TFRecord file.

  Reads 12 bytes per file (in parallel), so it is cheap even for hundreds of
  shards on a remote file system. A shard damaged after its first record is
  caught while reading (``find_corrupt_files``).
  """
  with concurrent.futures.ThreadPoolExecutor(
      max(1, min(max_workers, len(files)))) as pool:
    problems = list(pool.map(_header_problem, files))
  for path, problem in zip(files, problems):
    if problem:
      raise ValueError(f'{path} is not a TFRecord file: {problem}.')


_RECORD_ERROR = re.compile(r'(corrupted|truncated) record at (\d+)')


def record_error_offset(error):
  """``(kind, offset)`` of a TFRecord read error message, or None."""
  match = _RECORD_ERROR.search(str(error))
  if not match:
    return None
  return match.group(1), int(match.group(2))


def _record_near(path, offset):
  """True when a record of ``path`` starts at ``offset`` or its data does.

  TensorFlow reports a bad header or a truncated record at the record's
  start, and bad data at the start of the data (12 bytes later). Walks the
  record headers only.
  """
  position = 0
  with tf.io.gfile.GFile(path, 'rb') as f:
    while position < offset - _HEADER:
      f.seek(position)
      header = f.read(_HEADER)
      if len(header) < _HEADER:
        return False
      length = struct.unpack('<Q', header[:8])[0]
      position += _HEADER + length + _FOOTER
  return position in (offset, offset - _HEADER)


def _read_error(path):
  """The error reading every record of ``path`` gives, or None."""
  try:
    for _ in tf.data.TFRecordDataset(path):
      pass
  except tf.errors.DataLossError as e:
    return e
  return None


def find_corrupt_files(files, error):
  """The files behind a tf.data ``corrupted/truncated record at N`` error.

  Only files longer than ``N`` with a record (or its data) starting at byte
  ``N`` are read in full (normally one), so this costs little next to the
  run it ends.

  Args:
    files: the files the failing dataset read.
    error: the error (or its message).

  Returns:
    list of ``(path, description)``; empty when the message names no offset
    or no file fails at it.
  """
  found = record_error_offset(error)
  if found is None:
    return []
  kind, offset = found
  if offset == 0:  # The first header: no need to read whole files.
    return [(path, f'{kind} record at byte 0 ({problem})')
            for path, problem in zip(files, map(_header_problem, files))
            if problem]
  corrupt = []
  for path in files:
    if tf.io.gfile.stat(path).length <= offset:
      continue
    if not _record_near(path, offset):
      continue
    failure = _read_error(path)
    if failure is not None and record_error_offset(failure) == found:
      corrupt.append((path, f'{kind} record at byte {offset}'))
  return corrupt


def shard_files(files, input_context=None):
  """Files read by this input pipeline.

  Args:
    files: list of file paths (all pipelines must see the same order).
    input_context: optional ``tf.distribute.InputContext``.

  Returns:
    ``files[input_pipeline_id::num_input_pipelines]``; all files without a
    context or with a single pipeline.

  Raises:
    ValueError: when there are fewer files than input pipelines.
  """
  if input_context is None or input_context.num_input_pipelines <= 1:
    return list(files)
  num = input_context.num_input_pipelines
  if len(files) < num:
    raise ValueError(
        f'{len(files)} files cannot be sharded over {num} input pipelines; '
        'write at least one shard per pipeline.')
  return list(files)[input_context.input_pipeline_id::num]


def _accepts(parser, argument):
  try:
    return argument in inspect.signature(parser).parameters
  except (TypeError, ValueError):
    return False


def _eval_padding_element(element_spec):
  """A dummy eval example with the given (static) element spec.

  Images are zeros, ``image_info`` says an ``S x S`` image at scale 1,
  ground truths are empty (``source_id`` -1, ``num_detections`` 0, boxes,
  classes and areas -1, crowd flags 0, PNG strings empty).
  """
  def zeros(spec):
    if not spec.shape.is_fully_defined():
      raise ValueError(
          f'Parser output {spec} is not static-shaped; cannot pad eval data.')
    return tf.zeros(spec.shape, spec.dtype)

  image_spec, labels_spec = element_spec
  image = zeros(image_spec)
  labels = tf.nest.map_structure(zeros, labels_spec)
  height, width = image_spec.shape[0], image_spec.shape[1]
  labels['image_info'] = tf.constant(
      [[height, width], [height, width], [1.0, 1.0], [0.0, 0.0]],
      labels_spec['image_info'].dtype)
  gt = labels.get('groundtruths')
  if gt is not None:
    gt['source_id'] = tf.constant(-1, gt['source_id'].dtype)
    for key in ('boxes', 'classes', 'areas'):
      gt[key] = -tf.ones_like(gt[key])
  return image, labels


@gin.configurable(module='official_shapemask')
def build_dataset(file_pattern,
                  parser,
                  batch_size,
                  is_training,
                  input_context=None,
                  shuffle_buffer=64,
                  cycle_length=32,
                  deterministic=False,
                  cache=False,
                  seed=None):
  """Builds the batched ShapeMask dataset.

  Args:
    file_pattern: glob(s) of TFRecord files (see ``list_files``).
    parser: callable ``parser(serialized, seed=None, source_file=None) ->
      (image, labels)``, normally ``shapemask_parser.Parser``; ``seed`` and
      ``source_file`` (the record's file, a tf.string scalar: each file's
      records are paired with its name before the files are interleaved)
      are passed only to a callable that takes them.
    batch_size: per-replica batch size (the leading dimension of each
      element). Under ``tf.distribute`` pass
      ``input_context.get_per_replica_batch_size(global_batch)``.
    is_training: shuffle and repeat forever, drop the last partial batch;
      otherwise one pass in file order, the last batch padded with dummies.
    input_context: optional ``tf.distribute.InputContext``; files are sharded
      over its input pipelines.
    shuffle_buffer: examples in the shuffle buffer (training).
    cycle_length: files read in parallel.
    deterministic: reproducible order and augmentation (seeded shuffles,
      ordered parallel ops, per-element seeds from ``seed``).
    cache: cache the serialized records in memory after the first pass.
    seed: python int for the shuffles and per-element parser seeds; defaults
      to 0 when ``deterministic``, otherwise random.

  Returns:
    ``tf.data.Dataset`` of ``(images [B, S, S, 3], labels)`` batches with
    static shapes (see ``docs/contracts.md``).

  Raises:
    ValueError: when the pattern matches no file or the files cannot be
      sharded.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  if deterministic and seed is None:
    seed = _DEFAULT_SEED
  files = shard_files(list_files(file_pattern), input_context)

  dataset = tf.data.Dataset.from_tensor_slices(files)
  if is_training:
    dataset = dataset.shuffle(len(files), seed=seed)
  with_file = _accepts(parser, 'source_file')

  def read_file(path):
    records = tf.data.TFRecordDataset(path)
    if with_file:  # Each record carries its file, for error messages.
      records = records.map(lambda record: (record, path))
    return records

  dataset = dataset.interleave(
      read_file,
      cycle_length=max(1, min(cycle_length, len(files))),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=deterministic or not is_training)
  if cache:
    dataset = dataset.cache()
  if is_training:
    dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    dataset = dataset.repeat()

  def parse(element, **kwargs):
    if with_file:
      element, kwargs['source_file'] = element
    return parser(element, **kwargs)

  if _accepts(parser, 'seed'):
    # One stateless seed pair per example: reproducible under parallel map.
    seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
    dataset = tf.data.Dataset.zip((dataset, seeds))
    parse_fn = lambda element, pair: parse(element, seed=pair)
  elif with_file:
    parse_fn = lambda record, path: parse((record, path))
  else:
    parse_fn = parse
  dataset = dataset.map(parse_fn, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=deterministic or not is_training)

  if not is_training and batch_size > 1:
    padding = _eval_padding_element(dataset.element_spec)
    dataset = dataset.concatenate(
        tf.data.Dataset.from_tensors(padding).repeat(batch_size - 1))
  dataset = dataset.batch(batch_size, drop_remainder=True)
  dataset = dataset.prefetch(tf.data.AUTOTUNE)

  options = tf.data.Options()
  options.deterministic = bool(deterministic or not is_training)
  return dataset.with_options(options)
