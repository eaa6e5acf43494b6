"""tf.data reader on real coco_tiny160 shards."""

import struct

import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.dataloaders import input_reader
from official_shapemask.dataloaders import shapemask_parser
from official_shapemask.ops import anchors as anchor_ops

S = 128


def _train_parser(**kwargs):
  return shapemask_parser.Parser(S, mode='train', **kwargs)


def _eval_parser():
  return shapemask_parser.Parser(S, mode='eval')


def _source_ids(dataset):
  ids = []
  for _, labels in dataset:
    ids.extend(labels['groundtruths']['source_id'].numpy().tolist())
  return ids


def test_train_batches_have_static_shapes(tiny_train_records):
  batch = 2
  dataset = input_reader.build_dataset(tiny_train_records, _train_parser(),
                                       batch, is_training=True)
  images_spec, labels_spec = dataset.element_spec
  num_anchors = anchor_ops.num_anchors((S, S))
  assert images_spec.shape == (batch, S, S, 3)
  expected = {
      'cls_targets': (batch, num_anchors),
      'box_targets': (batch, num_anchors, 4),
      'num_positives': (batch,),
      'image_info': (batch, 4, 2),
      'mask_boxes': (batch, 8, 4),
      'mask_outer_boxes': (batch, 8, 4),
      'mask_classes': (batch, 8),
      'mask_targets': (batch, 8, 32, 32),
      'fine_mask_targets': (batch, 8, 128, 128),
      'mask_is_valid': (batch, 8),
  }
  assert {k: tuple(v.shape) for k, v in labels_spec.items()} == expected
  # Training repeats forever.
  assert dataset.cardinality() == tf.data.INFINITE_CARDINALITY
  for images, labels in dataset.take(2):
    assert images.shape == (batch, S, S, 3)
    assert labels['cls_targets'].dtype == tf.int32
    assert labels['fine_mask_targets'].shape == (batch, 8, 128, 128)


def test_eval_specs_are_static(tiny_val_records):
  dataset = input_reader.build_dataset(tiny_val_records, _eval_parser(), 4,
                                       is_training=False)
  specs = tf.nest.flatten(dataset.element_spec)
  assert all(spec.shape.is_fully_defined() for spec in specs)
  gt = dataset.element_spec[1]['groundtruths']
  assert gt['masks_png'].shape == (4, 100)
  assert gt['masks_png'].dtype == tf.string
  assert gt['boxes'].shape == (4, 100, 4)


def test_missing_files_raise_naming_the_pattern(tmp_path):
  pattern = str(tmp_path / 'nothing-*.tfrecord')
  with pytest.raises(ValueError, match='nothing-'):
    input_reader.build_dataset(pattern, _eval_parser(), 2, is_training=False)


def test_sharding_by_input_context_gives_disjoint_files(tiny_val_records):
  files = input_reader.list_files(tiny_val_records)
  assert len(files) == 4
  shards = [
      input_reader.shard_files(files, tf.distribute.InputContext(
          num_input_pipelines=2, input_pipeline_id=i)) for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == files

  ids = []
  for i in range(2):
    context = tf.distribute.InputContext(num_input_pipelines=2,
                                         input_pipeline_id=i)
    dataset = input_reader.build_dataset(tiny_val_records, _eval_parser(), 8,
                                         is_training=False,
                                         input_context=context)
    ids.append({i for i in _source_ids(dataset) if i != -1})
  assert not ids[0] & ids[1]
  assert len(ids[0] | ids[1]) == 80

  with pytest.raises(ValueError, match='input pipelines'):
    input_reader.shard_files(files, tf.distribute.InputContext(
        num_input_pipelines=5, input_pipeline_id=0))


def _first_batches(pattern, seed, num=2):
  dataset = input_reader.build_dataset(pattern, _train_parser(), 2,
                                       is_training=True, deterministic=True,
                                       seed=seed)
  return [tf.nest.map_structure(lambda t: t.numpy(), batch)
          for batch in dataset.take(num)]


def test_deterministic_option_is_reproducible(tiny_train_records):
  first = _first_batches(tiny_train_records, seed=3)
  second = _first_batches(tiny_train_records, seed=3)
  for a, b in zip(first, second):
    tf.nest.map_structure(np.testing.assert_array_equal, a, b)
  other = _first_batches(tiny_train_records, seed=4)
  assert not all(np.array_equal(a[1]['image_info'], b[1]['image_info'])
                 for a, b in zip(first, other))


@pytest.mark.parametrize('batch', [3, 4])
def test_eval_keeps_every_image_exactly_once(tiny_val_records, batch):
  dataset = input_reader.build_dataset(tiny_val_records, _eval_parser(),
                                       batch, is_training=False)
  ids = []
  num_padded = 0
  for images, labels in dataset:
    gt = labels['groundtruths']
    source_id = gt['source_id'].numpy()
    padded = source_id == -1
    num_padded += int(padded.sum())
    assert np.all(gt['num_detections'].numpy()[padded] == 0)
    assert np.all(gt['classes'].numpy()[padded] == -1)
    assert np.all(images.numpy()[padded] == 0)
    assert np.all(gt['num_detections'].numpy()[~padded] > 0)
    ids.extend(source_id[~padded].tolist())
  assert len(ids) == 80 and len(set(ids)) == 80
  assert num_padded == (-80) % batch


# ------------------------------------------------ files that are not records
def test_label_map_beside_the_shards_is_skipped(tiny_val_records):
  # The converter writes val_label_map.json next to val-*; 'val*' matches it.
  pattern = tiny_val_records.replace('val-*', 'val*')
  files, skipped = input_reader.split_record_files(pattern)
  assert [f.rsplit('/', 1)[1] for f in skipped] == ['val_label_map.json']
  assert len(files) == 4 and not any(f.endswith('.json') for f in files)
  dataset = input_reader.build_dataset(pattern, _eval_parser(), 8,
                                       is_training=False)
  ids = [i for i in _source_ids(dataset) if i >= 0]
  assert len(ids) == 80


def test_a_pattern_of_json_files_only_is_named(tmp_path):
  (tmp_path / 'train_label_map.json').write_text('{"1": "person"}')
  with pytest.raises(ValueError, match='matches no TFRecord file, only '
                     f'{tmp_path}/train_label_map.json'):
    input_reader.list_files(str(tmp_path / 'train*'))


def test_header_check_names_a_file_that_is_not_a_tfrecord(tiny_val_records,
                                                          tmp_path):
  shards = input_reader.list_files(tiny_val_records)
  empty = tmp_path / 'empty.tfrecord'
  empty.write_bytes(b'')
  input_reader.check_record_headers(shards + [str(empty)])  # All valid.
  for name, content, why in (
      ('notes.txt', b'this is not a TFRecord file at all', 'checksum'),
      ('stub.tfrecord', b'12345', 'shorter than one record header')):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=why) as err:
      input_reader.check_record_headers(shards + [str(path)])
    assert str(err.value).startswith(f'{path} is not a TFRecord file')


# ------------------------------------------------------- damaged shards
def _damaged_copy(shards, tmp_path, how):
  """Copies the shards; damages the third one in the middle of a record."""
  copies = []
  for shard in shards:
    copy = tmp_path / shard.rsplit('/', 1)[1]
    copy.write_bytes(open(shard, 'rb').read())
    copies.append(str(copy))
  raw = open(copies[2], 'rb').read()
  if how == 'overwritten':
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    open(copies[2], 'wb').write(bytes(flipped))
  else:  # Cut inside the data of the record around the middle.
    position = 0
    while True:
      length = struct.unpack('<Q', raw[position:position + 8])[0]
      end = position + 12 + length + 4
      if end > len(raw) // 2:
        break
      position = end
    open(copies[2], 'wb').write(raw[:position + 12 + length // 2])
  return copies


@pytest.mark.parametrize('how,kind', [('overwritten', 'corrupted'),
                                      ('truncated', 'truncated')])
def test_the_damaged_shard_is_named(tiny_val_records, tmp_path, how, kind):
  files = _damaged_copy(input_reader.list_files(tiny_val_records), tmp_path,
                        how)
  dataset = input_reader.build_dataset(files, _eval_parser(), 8,
                                       is_training=False)
  with pytest.raises(tf.errors.DataLossError) as err:
    _source_ids(dataset)
  assert files[2] not in str(err.value)  # tf.data does not name it.
  found = input_reader.find_corrupt_files(files, err.value)
  assert [path for path, _ in found] == [files[2]]
  assert found[0][1].startswith(f'{kind} record at byte ')
  assert input_reader.find_corrupt_files(files, 'some other error') == []
