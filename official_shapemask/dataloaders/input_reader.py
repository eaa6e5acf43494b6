"""tf.data input pipeline for ShapeMask TFRecords (spec section 7.3, reader).

Pipeline: list files -> shard by ``tf.distribute.InputContext`` -> parallel
interleave of ``TFRecordDataset`` -> (cache) -> shuffle -> repeat (training)
-> parallel map of the parser with a per-element stateless seed -> batch ->
prefetch. Every batch has static shapes.

Training batches drop the last partial batch (the stream repeats forever).
Evaluation never drops images: ``batch_size - 1`` dummy examples are appended
and the batch is taken with ``drop_remainder=True``, so the last real images
are completed with dummies (``groundtruths['source_id'] == -1``,
``num_detections == 0``) and every real image appears exactly once. This fixes
pitfall 8 of the reference (trailing eval images never evaluated).
"""

import inspect

import gin
import tensorflow as tf

_DEFAULT_SEED = 0


def list_files(file_pattern):
  """Sorted files matching ``file_pattern``.

  Args:
    file_pattern: a glob, a comma-separated string of globs, or a list of
      globs.

  Returns:
    sorted list of unique file paths.

  Raises:
    ValueError: when a pattern matches no file (the pattern is named).
  """
  if isinstance(file_pattern, str):
    patterns = [p for p in file_pattern.split(',') if p]
  else:
    patterns = list(file_pattern)
  if not patterns:
    raise ValueError(f'No file pattern given: {file_pattern!r}.')
  files = set()
  for pattern in patterns:
    matched = tf.io.gfile.glob(pattern)
    if not matched:
      raise ValueError(f'File pattern {pattern!r} matches no file.')
    files.update(matched)
  return sorted(files)


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


def _accepts_seed(parser):
  try:
    return 'seed' in inspect.signature(parser).parameters
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
    parser: callable ``parser(serialized, seed=None) -> (image, labels)``,
      normally ``shapemask_parser.Parser``; a callable without a ``seed``
      argument is called with the record only.
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
  dataset = dataset.interleave(
      tf.data.TFRecordDataset,
      cycle_length=max(1, min(cycle_length, len(files))),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=deterministic or not is_training)
  if cache:
    dataset = dataset.cache()
  if is_training:
    dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    dataset = dataset.repeat()

  if _accepts_seed(parser):
    # One stateless seed pair per example: reproducible under parallel map.
    seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
    dataset = tf.data.Dataset.zip((dataset, seeds))
    parse_fn = lambda record, pair: parser(record, seed=pair)
  else:
    parse_fn = parser
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
