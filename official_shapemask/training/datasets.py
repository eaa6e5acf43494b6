"""The training and evaluation `tf.data` inputs of a run, for every engine.

Both engines read data with TensorFlow on the host: `make_train_dataset_fn`
gives the per-input-pipeline dataset (`tf.distribute.InputContext` in, this
pipeline's share of the global batch out) that each engine turns into its
own iterator, and `make_eval_dataset` the whole evaluation set. The parser
checks every record's category ids against the model's `num_classes`
(`dataloaders/class_ids.check_in_graph`). A damaged record's, or a bad
category id's, `tf.errors.OpError` becomes a one-line error naming its shard
(`data_error`, `naming_damaged_files`).
"""

import tensorflow as tf

from official_shapemask.dataloaders import class_ids
from official_shapemask.dataloaders import input_reader
from official_shapemask.dataloaders import shapemask_parser
from official_shapemask.training import settings as settings_lib
from official_shapemask.weights import errors


def model_input_settings(model):
  """Parser settings that must agree with the model's anchors, sizes and
  class count."""
  anchors = model.detection_generator.get_config()
  return dict(output_size=model.image_size, min_level=anchors["min_level"],
              max_level=anchors["max_level"], num_scales=anchors["num_scales"],
              aspect_ratios=tuple(anchors["aspect_ratios"]),
              anchor_size=anchors["anchor_size"],
              mask_crop_size=model.prior_head.mask_crop_size,
              num_classes=model.head.get_config()["num_classes"],
              upsample_factor=model.fine_head.upsample_factor,
              outer_box_scale=model.outer_box_scale)


def make_eval_dataset(file_pattern, batch_size, model, use_bfloat16=False):
  """The evaluation dataset: `(images, {'image_info', 'groundtruths'})`."""
  parser = shapemask_parser.Parser(mode="eval", use_bfloat16=use_bfloat16,
                                   **model_input_settings(model))
  return input_reader.build_dataset(file_pattern, parser, batch_size,
                                    is_training=False)


def make_train_dataset_fn(file_pattern, global_batch_size, model,
                          use_bfloat16=False, deterministic=False):
  """A `distribute_datasets_from_function` callable for training.

  Called with a `tf.distribute.InputContext`, it returns the dataset of
  that input pipeline: its share of the files, batches of
  `input_context.get_per_replica_batch_size(global_batch_size)` images.
  """
  settings = model_input_settings(model)

  def dataset_fn(input_context):
    parser = shapemask_parser.Parser(mode="train", use_bfloat16=use_bfloat16,
                                     **settings)
    batch = input_context.get_per_replica_batch_size(global_batch_size)
    return input_reader.build_dataset(
        file_pattern, parser, batch, is_training=True,
        input_context=input_context, deterministic=deterministic)

  return dataset_fn


def data_error(error, pattern, setting):
  """An `InvalidInputError` naming the shard behind a tf.data record error,
  or the category id, image and shard of a record whose class id does not
  fit the model (the parser's `class_ids.check_in_graph`).

  Args:
    error: the `tf.errors.OpError` a dataset of `pattern` raised.
    pattern: the file pattern the dataset read.
    setting: the setting that holds it, for the message.

  Returns:
    the error to raise, or None when `error` is not a damaged-record error.
  """
  bad_class = class_ids.describe_error(error)
  if bad_class is not None:
    return settings_lib.InvalidInputError(f"{setting}: {bad_class}")
  if input_reader.record_error_offset(error) is None:
    return None
  files = input_reader.list_files(pattern)
  found = input_reader.find_corrupt_files(files, error)
  if found:
    where = "; ".join(f"{path} ({what})" for path, what in found)
    return settings_lib.InvalidInputError(
        f"{setting}: damaged TFRecord file {where}; convert it again or "
        f"leave it out of {pattern!r}")
  return settings_lib.InvalidInputError(
      f"{setting}={pattern!r}: a TFRecord file is damaged "
      f"({errors.first_line(error)}), but no single file fails there "
      f"when read alone")


def naming_damaged_files(iterator, pattern, setting):
  """Yields from a tf.data iterator; a damaged record's error names its file.

  Raises:
    InvalidInputError: naming the damaged TFRecord file (`data_error`);
      other errors pass unchanged.
  """
  while True:
    try:
      item = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      error = data_error(e, pattern, setting)
      if error is None:
        raise
      raise error from None
    yield item
