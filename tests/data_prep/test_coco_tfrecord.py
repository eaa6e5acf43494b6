"""COCO -> TFRecord converter, on coco_tiny160 and inputs derived from it."""
import collections
import glob
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
import pytest
import tensorflow as tf

from official_shapemask.data_prep import coco_tfrecord

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
OBJECT_KEYS = ('image/object/bbox/xmin', 'image/object/bbox/xmax',
               'image/object/bbox/ymin', 'image/object/bbox/ymax',
               'image/object/class/label', 'image/object/class/text',
               'image/object/is_crowd', 'image/object/area',
               'image/object/mask')


def _read_records(pattern):
  """Reads shards with tf.data; returns {source_id: {key: list of values}}."""
  files = sorted(glob.glob(pattern))
  records = {}
  for raw in tf.data.TFRecordDataset(files):
    example = tf.train.Example.FromString(raw.numpy())
    features = {}
    for key, feature in example.features.feature.items():
      kind = feature.WhichOneof('kind')
      features[key] = list(getattr(feature, kind).value) if kind else []
    source_id = int(features['image/source_id'][0])
    assert source_id not in records
    records[source_id] = features
  return records


def _decode_mask(png):
  return tf.io.decode_png(png).numpy()[..., 0]


def _coco_subset(root, num_images, split='val'):
  """First ``num_images`` images of a coco_tiny160 split and their anns."""
  with open(root / 'annotations' / f'instances_{split}2017.json') as f:
    data = json.load(f)
  images = data['images'][:num_images]
  ids = {image['id'] for image in images}
  return {
      'images': images,
      'annotations': [a for a in data['annotations'] if a['image_id'] in ids],
      'categories': data['categories'],
  }


def _write_json(path, data):
  path.write_text(json.dumps(data))
  return str(path)


def _no_outputs_left(out_dir):
  """Nothing from a failed run: no shards, no label map, no temporaries."""
  return not out_dir.exists() or sorted(os.listdir(out_dir)) == []


# ----------------------------------------------------------------------------
# Real data: the val split of coco_tiny160.


def test_val_split_counts_masks_and_boxes(tiny_val_records, coco_tiny_root):
  assert len(glob.glob(tiny_val_records)) == 4
  records = _read_records(tiny_val_records)
  coco = COCO(str(coco_tiny_root / 'annotations' / 'instances_val2017.json'))
  assert len(records) == 80
  assert sum(len(r['image/object/class/label']) for r in records.values()) \
      == 815
  assert set(records) == set(coco.getImgIds())

  num_masks = 0
  for image_id, features in records.items():
    info = coco.imgs[image_id]
    h, w = info['height'], info['width']
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    assert len(features['image/object/class/label']) == len(anns)
    assert features['image/height'] == [h] and features['image/width'] == [w]
    image = tf.io.decode_image(features['image/encoded'][0]).numpy()
    assert image.shape == (h, w, 3)
    assert features['image/object/class/label'] == [
        a['category_id'] for a in anns]
    assert features['image/object/class/text'] == [
        coco.cats[a['category_id']]['name'].encode() for a in anns]
    assert features['image/object/is_crowd'] == [a['iscrowd'] for a in anns]
    boxes = np.array([a['bbox'] for a in anns], np.float64)
    np.testing.assert_allclose(features['image/object/bbox/xmin'],
                               boxes[:, 0] / w, atol=1e-6)
    np.testing.assert_allclose(features['image/object/bbox/ymax'],
                               (boxes[:, 1] + boxes[:, 3]) / h, atol=1e-6)
    np.testing.assert_allclose(features['image/object/area'],
                               [a['area'] for a in anns], rtol=1e-6)
    for png, ann in zip(features['image/object/mask'], anns):
      mask = _decode_mask(png)
      assert mask.dtype == np.uint8 and mask.shape == (h, w)
      np.testing.assert_array_equal(mask, coco.annToMask(ann))
      num_masks += 1
  assert num_masks == 815

  label_map_file = tiny_val_records[:-len('-*')] + '_label_map.json'
  with open(label_map_file) as f:
    label_map = json.load(f)
  assert label_map == {str(c['id']): c['name'] for c in coco.dataset[
      'categories']}
  # Raw, non-contiguous COCO ids are kept.
  assert '90' in label_map and '12' not in label_map


def test_same_features_as_model_garden(tiny_val_records, coco_tiny_root,
                                       tmp_path):
  """Model Garden's own converter (its CLI, with masks) on the same input."""
  mg_prefix = tmp_path / 'mg' / 'val'
  mg_prefix.parent.mkdir()
  result = subprocess.run(
      [sys.executable, '-m', 'official.vision.data.create_coco_tf_record',
       f'--image_dir={coco_tiny_root / "val2017"}',
       f'--object_annotations_file='
       f'{coco_tiny_root / "annotations" / "instances_val2017.json"}',
       f'--output_file_prefix={mg_prefix}', '--num_shards=1',
       '--include_masks', '--num_processes=0'],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  theirs = _read_records(f'{mg_prefix}-*')
  ours = _read_records(tiny_val_records)
  assert len(theirs) == 80 and set(theirs) == set(ours)
  for source_id, features in theirs.items():
    assert set(ours[source_id]) == set(features), source_id
    for key, values in features.items():
      assert ours[source_id][key] == values, (source_id, key)


# ----------------------------------------------------------------------------
# Bad input: named errors, nothing written.


def _bad_input_case(case, root, tmp_path):
  """Returns (image_dir, json path, culprit text the error must name)."""
  data = _coco_subset(root, 3)
  image_dir = tmp_path / 'images'
  image_dir.mkdir()
  for image in data['images']:
    (image_dir / image['file_name']).write_bytes(
        (root / 'val2017' / image['file_name']).read_bytes())
  last = data['images'][-1]
  culprit = None
  if case == 'missing_image':
    os.remove(image_dir / last['file_name'])
    culprit = last['file_name']
  elif case == 'truncated_image':
    path = image_dir / last['file_name']
    path.write_bytes(path.read_bytes()[:3000])
    culprit = last['file_name']
  elif case == 'not_an_image':
    (image_dir / last['file_name']).write_text('this is not a JPEG')
    culprit = last['file_name']
  elif case == 'wrong_size_in_json':
    last['height'] += 1
    culprit = last['file_name']
  elif case == 'malformed_json':
    path = tmp_path / 'broken.json'
    path.write_text(json.dumps(data)[:-40])
    return image_dir, str(path), 'broken.json'
  elif case == 'unknown_image':
    data['annotations'][-1]['image_id'] = 987654321
    culprit = f'annotation id {data["annotations"][-1]["id"]}'
  elif case == 'unknown_category':
    data['annotations'][-1]['category_id'] = 12  # Not a COCO category.
    culprit = f'annotation id {data["annotations"][-1]["id"]}'
  elif case == 'bad_rle':
    ann = next(a for a in data['annotations'] if a['iscrowd'])
    ann['segmentation']['counts'] = ann['segmentation']['counts'][:-1]
    culprit = f'annotation id {ann["id"]}'
  return image_dir, _write_json(tmp_path / 'instances.json', data), culprit


@pytest.mark.parametrize('case', [
    'missing_image', 'truncated_image', 'not_an_image', 'wrong_size_in_json',
    'malformed_json', 'unknown_image', 'unknown_category', 'bad_rle'])
def test_bad_input_names_culprit_and_writes_nothing(case, coco_tiny_root,
                                                    tmp_path):
  image_dir, json_file, culprit = _bad_input_case(case, coco_tiny_root,
                                                  tmp_path)
  if case == 'bad_rle':
    # The subset must hold a crowd RLE for this case to mean anything.
    assert 'annotation id' in culprit
  out_dir = tmp_path / 'out'
  with pytest.raises(coco_tfrecord.ConversionError, match=culprit):
    coco_tfrecord.convert_coco_to_tfrecords(
        str(image_dir), json_file, str(out_dir / 'train'), num_shards=2,
        show_progress=False)
  assert _no_outputs_left(out_dir)


def test_worker_error_leaves_no_shards(coco_tiny_root, tmp_path):
  """A corrupt last image found by a worker process: temporaries removed."""
  image_dir, json_file, culprit = _bad_input_case('truncated_image',
                                                  coco_tiny_root, tmp_path)
  out_dir = tmp_path / 'out'
  with pytest.raises(coco_tfrecord.ConversionError, match=culprit):
    coco_tfrecord.convert_coco_to_tfrecords(
        str(image_dir), json_file, str(out_dir / 'train'), num_shards=3,
        num_workers=2, show_progress=False)
  assert _no_outputs_left(out_dir)


def test_failed_run_keeps_earlier_complete_output(coco_tiny_root, tmp_path):
  data = _coco_subset(coco_tiny_root, 2)
  good = _write_json(tmp_path / 'good.json', data)
  prefix = str(tmp_path / 'out' / 'val')
  image_dir = str(coco_tiny_root / 'val2017')
  first = coco_tfrecord.convert_coco_to_tfrecords(
      image_dir, good, prefix, num_shards=2, show_progress=False)
  before = {p: pathlib.Path(p).read_bytes() for p in first['shards']}
  data['annotations'][0]['category_id'] = 12
  bad = _write_json(tmp_path / 'bad.json', data)
  with pytest.raises(coco_tfrecord.ConversionError):
    coco_tfrecord.convert_coco_to_tfrecords(
        image_dir, bad, prefix, num_shards=2, show_progress=False)
  after = sorted(os.listdir(tmp_path / 'out'))
  assert after == sorted(
      [os.path.basename(p) for p in before] + ['val_label_map.json'])
  assert all(pathlib.Path(p).read_bytes() == b for p, b in before.items())
  # A rerun with another shard count replaces the old shards.
  second = coco_tfrecord.convert_coco_to_tfrecords(
      image_dir, good, prefix, num_shards=1, show_progress=False)
  assert sorted(second['removed_stale_shards']) == sorted(before)
  assert glob.glob(prefix + '-*') == second['shards']


def test_degenerate_polygons_and_zero_area_boxes_dropped(coco_tiny_root,
                                                         tmp_path):
  data = _coco_subset(coco_tiny_root, 2)
  polygon_ann = next(a for a in data['annotations'] if not a['iscrowd'])
  same_image = [a['id'] for a in data['annotations']
                if a['image_id'] == polygon_ann['image_id']]
  extra = []
  for i, change in enumerate([
      {'bbox': [10.0, 10.0, 0.0, 5.0]},  # Zero width.
      {'bbox': [10.0, 10.0, 5.0, -1.0]},  # Negative height.
      {'segmentation': [[10.0, 10.0, 20.0, 20.0]]},  # Two vertices.
      {'segmentation': [[0.0, 0.0, 10.0, 10.0, 20.0, 20.0]]},  # Collinear.
      {'segmentation': []},  # No polygon at all.
      {'bbox': [-30.0, 0.0, 20.0, 20.0]},  # Outside the image.
      # Box inside, polygon entirely outside: an all-zero mask.
      {'segmentation': [[-50.0, -50.0, -40.0, -50.0, -40.0, -40.0]]},
  ]):
    ann = dict(polygon_ann, id=900000 + i, **change)
    extra.append(ann)
  # A valid polygon next to a degenerate one: kept, degenerate part ignored.
  mixed = dict(polygon_ann, id=900100,
               segmentation=[[5.0, 5.0, 6.0, 6.0]] + polygon_ann[
                   'segmentation'])
  extra.append(mixed)
  data['annotations'] += extra
  json_file = _write_json(tmp_path / 'instances.json', data)
  summary = coco_tfrecord.convert_coco_to_tfrecords(
      str(coco_tiny_root / 'val2017'), json_file, str(tmp_path / 'o' / 'x'),
      num_shards=1, show_progress=False)
  assert summary['dropped'] == {'zero_area_box': 2, 'degenerate_polygon': 3,
                                'box_outside_image': 1, 'empty_mask': 1}
  assert summary['dropped_ids'] == {
      'zero_area_box': [900000, 900001],
      'degenerate_polygon': [900002, 900003, 900004],
      'box_outside_image': [900005], 'empty_mask': [900006]}
  num_written = len(data['annotations']) - 7
  assert summary['instances'] == num_written
  records = _read_records(summary['shards'][0])
  assert sum(len(r['image/object/class/label']) for r in records.values()) \
      == num_written
  # The mixed annotation (last of its image) gives the original's mask.
  masks = records[polygon_ann['image_id']]['image/object/mask']
  assert len(masks) == len(same_image) + 1
  np.testing.assert_array_equal(
      _decode_mask(masks[-1]),
      _decode_mask(masks[same_image.index(polygon_ann['id'])]))
  line = coco_tfrecord.format_summary(summary)
  assert 'dropped 7' in line and 'degenerate_polygon 3' in line
  assert 'empty_mask 1' in line
  assert ('dropped annotation ids: zero_area_box 900000, 900001; '
          'degenerate_polygon 900002, 900003, 900004; box_outside_image '
          '900005; empty_mask 900006') in line
  # Only the first few ids of a reason are listed.
  many = dict(summary, dropped=dict(summary['dropped'], zero_area_box=9))
  assert 'zero_area_box 900000, 900001, ...;' in coco_tfrecord.format_summary(
      many)


def test_more_shards_than_images_is_capped_and_said(coco_tiny_root, tmp_path):
  data = _coco_subset(coco_tiny_root, 3)
  json_file = _write_json(tmp_path / 'instances.json', data)
  summary = coco_tfrecord.convert_coco_to_tfrecords(
      str(coco_tiny_root / 'val2017'), json_file, str(tmp_path / 'o' / 'x'),
      num_shards=8, show_progress=False)
  assert summary['num_shards_requested'] == 8
  assert [os.path.basename(p) for p in summary['shards']] == [
      f'x-{i:05d}-of-00003.tfrecord' for i in range(3)]
  for shard in summary['shards']:  # None is empty.
    assert sum(1 for _ in tf.data.TFRecordDataset(shard)) == 1
  assert 'num_shards=8 capped at the 3 images' in (
      coco_tfrecord.format_summary(summary))


@pytest.mark.parametrize('case', ['parent_is_a_file', 'read_only'])
def test_unwritable_output_names_the_path(case, coco_tiny_root, tmp_path,
                                          monkeypatch):
  data = _coco_subset(coco_tiny_root, 1)
  json_file = _write_json(tmp_path / 'instances.json', data)
  if case == 'parent_is_a_file':
    (tmp_path / 'taken').write_text('a file, not a directory')
    prefix = tmp_path / 'taken' / 'records' / 'val'
    named = str(tmp_path / 'taken')
  else:
    # Tests may run as root, which a chmod does not stop: the OS's refusal
    # is simulated where the converter first writes.
    out_dir = tmp_path / 'locked'
    out_dir.mkdir()
    prefix = out_dir / 'val'
    named = str(out_dir)

    def refuse(*args, **kwargs):
      raise PermissionError(13, 'Permission denied', str(out_dir))

    monkeypatch.setattr(coco_tfrecord.tempfile, 'mkdtemp', refuse)
  with pytest.raises(coco_tfrecord.ConversionError) as err:
    coco_tfrecord.convert_coco_to_tfrecords(
        str(coco_tiny_root / 'val2017'), json_file, str(prefix),
        num_shards=1, show_progress=False)
  message = str(err.value)
  assert message.startswith(f'cannot write output to {named}'), message
  assert '\n' not in message


# ----------------------------------------------------------------------------
# Image formats, images without annotations, compressed RLE.


def test_image_formats_empty_images_and_compressed_rle(coco_tiny_root,
                                                       tmp_path):
  data = _coco_subset(coco_tiny_root, 5)
  coco = COCO(str(coco_tiny_root / 'annotations' / 'instances_val2017.json'))
  image_dir = tmp_path / 'images'
  image_dir.mkdir()
  sources = {}
  kinds = ['gray_jpeg', 'cmyk_jpeg', 'rgb_png', 'rgba_png', 'no_annotations']
  for image, kind in zip(data['images'], kinds):
    rgb = Image.open(coco_tiny_root / 'val2017' / image['file_name'])
    stem = os.path.splitext(image['file_name'])[0]
    if kind == 'gray_jpeg':
      pil, name, fmt = rgb.convert('L'), stem + '.jpg', 'JPEG'
    elif kind == 'cmyk_jpeg':
      pil, name, fmt = rgb.convert('CMYK'), stem + '.jpg', 'JPEG'
    elif kind == 'rgb_png':
      pil, name, fmt = rgb, stem + '.png', 'PNG'
    elif kind == 'rgba_png':
      pil, name, fmt = rgb.convert('RGBA'), stem + '.png', 'PNG'
    else:
      pil, name, fmt = rgb, stem + '.jpg', 'JPEG'
    pil.save(image_dir / name, format=fmt)
    image['file_name'] = name
    sources[image['id']] = kind
  empty_id = data['images'][-1]['id']
  data['annotations'] = [a for a in data['annotations']
                         if a['image_id'] != empty_id]
  # Compressed RLE for a polygon instance and for a crowd instance; their
  # expected masks come from the original annotations.
  expected = {}
  for ann in data['annotations']:
    expected[ann['id']] = coco.annToMask(coco.anns[ann['id']])
  to_compress = [next(a for a in data['annotations'] if not a['iscrowd'])]
  to_compress += [a for a in data['annotations'] if a['iscrowd']][:1]
  assert len(to_compress) == 2
  for ann in to_compress:
    rle = mask_util.encode(np.asfortranarray(expected[ann['id']]))
    ann['segmentation'] = {'size': rle['size'],
                           'counts': rle['counts'].decode('ascii')}
  json_file = _write_json(tmp_path / 'instances.json', data)

  summary = coco_tfrecord.convert_coco_to_tfrecords(
      str(image_dir), json_file, str(tmp_path / 'out' / 'mixed'),
      num_shards=2, show_progress=False)
  assert summary['images'] == 5
  assert summary['images_without_instances'] == 1
  assert summary['instances'] == len(data['annotations'])
  records = _read_records(str(tmp_path / 'out' / 'mixed-*'))
  anns_by_image = collections.defaultdict(list)
  for ann in data['annotations']:
    anns_by_image[ann['image_id']].append(ann)
  for image in data['images']:
    features = records[image['id']]
    kind = sources[image['id']]
    encoded = features['image/encoded'][0]
    decoded = tf.io.decode_image(encoded).numpy()
    assert decoded.shape == (image['height'], image['width'], 3), kind
    source = Image.open(image_dir / image['file_name'])
    reference = np.asarray(source.convert('RGB'), np.float32)
    if kind == 'rgb_png':
      assert encoded == (image_dir / image['file_name']).read_bytes()
      assert features['image/format'] == [b'png']
    elif kind == 'rgba_png':
      np.testing.assert_array_equal(decoded, reference)
      assert features['image/format'] == [b'png']
    elif kind == 'gray_jpeg':
      assert features['image/format'] == [b'jpg']
      assert source.mode == 'L'
      gray = np.asarray(source, np.float32)
      assert np.abs(decoded.astype(np.float32) - gray[..., None]).mean() < 2
    elif kind == 'cmyk_jpeg':
      assert source.mode == 'CMYK'
      assert features['image/format'] == [b'jpg']
      assert np.abs(decoded.astype(np.float32) - reference).mean() < 4
    anns = anns_by_image[image['id']]
    assert len(features['image/object/mask']) == len(anns)
    for key in OBJECT_KEYS:  # Present (empty for the empty image).
      assert len(features[key]) == len(anns), key
    for png, ann in zip(features['image/object/mask'], anns):
      np.testing.assert_array_equal(_decode_mask(png), expected[ann['id']])


def test_segmentation_forms_agree():
  """Polygon, uncompressed RLE, compressed RLE and list of RLEs."""
  height, width = 40, 50
  polygon = [[5.0, 5.0, 30.0, 5.0, 30.0, 25.0, 5.0, 25.0]]
  from_polygon = coco_tfrecord.segmentation_to_mask(polygon, height, width)
  assert from_polygon.shape == (height, width) and from_polygon.sum() > 0
  compressed = mask_util.encode(np.asfortranarray(from_polygon))
  # Uncompressed RLE: column-major run lengths starting with zeros.
  flat = from_polygon.flatten(order='F')
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  if flat[0]:
    runs = [0] + runs
  uncompressed = {'size': [height, width], 'counts': runs}
  for segmentation in (compressed, uncompressed, [compressed],
                       {'size': [height, width],
                        'counts': compressed['counts'].decode()}):
    np.testing.assert_array_equal(
        coco_tfrecord.segmentation_to_mask(segmentation, height, width),
        from_polygon)
  with pytest.raises(coco_tfrecord.ConversionError, match='size'):
    coco_tfrecord.segmentation_to_mask(compressed, height + 1, width)
  with pytest.raises(coco_tfrecord.ConversionError, match='run lengths'):
    coco_tfrecord.segmentation_to_mask(
        {'size': [height, width], 'counts': runs[:-1]}, height, width)


# ----------------------------------------------------------------------------
# The command line.


def test_cli_writes_four_val_shards_and_reports_errors(tmp_path):
  prefix = tmp_path / 'val'
  # The checkout's package, not an installed one.
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', PYTHONPATH=str(REPO_ROOT))
  command = [
      sys.executable, 'tools/create_coco_tfrecord.py',
      '--image_dir=../shared/data/coco_tiny160/val2017',
      '--object_annotations_file=../shared/data/coco_tiny160/annotations/'
      'instances_val2017.json',
      f'--output_file_prefix={prefix}', '--num_shards=4']
  if not (REPO_ROOT / '..' / 'shared' / 'data' / 'coco_tiny160').is_dir():
    pytest.skip('coco_tiny160 not found')
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Converted 80 images, 815 instances' in result.stdout
  shards = sorted(glob.glob(f'{prefix}-*'))
  assert [os.path.basename(s) for s in shards] == [
      f'val-{i:05d}-of-00004.tfrecord' for i in range(4)]
  records = _read_records(f'{prefix}-*')
  assert len(records) == 80
  assert sum(len(r['image/object/class/label']) for r in records.values()) \
      == 815

  bad_json = tmp_path / 'bad.json'
  bad_json.write_text('{"images": [')
  command[3] = f'--object_annotations_file={bad_json}'
  command[4] = f'--output_file_prefix={tmp_path / "bad" / "val"}'
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
  assert result.returncode == 1
  assert 'bad.json: malformed JSON' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'bad').exists()


def test_image_listed_twice_under_two_ids_is_an_error(coco_tiny_root,
                                                      tmp_path):
  # The same file under a second id, without annotations: stored twice, one
  # copy would teach that its objects are background.
  data = _coco_subset(coco_tiny_root, 3)
  first = data['images'][1]
  copy = dict(first, id=999999001)
  data['images'].append(copy)
  json_file = _write_json(tmp_path / 'instances.json', data)
  out_dir = tmp_path / 'out'
  with pytest.raises(coco_tfrecord.ConversionError) as err:
    coco_tfrecord.convert_coco_to_tfrecords(
        str(coco_tiny_root / 'val2017'), json_file, str(out_dir / 'val'),
        num_shards=2, show_progress=False)
  message = str(err.value)
  assert message.startswith(
      f"{json_file}: image file '{first['file_name']}' is listed twice, as "
      f"image id {first['id']} and image id 999999001"), message
  assert '\n' not in message
  assert _no_outputs_left(out_dir)
  # The same file named another way (./name) is the same file.
  copy['file_name'] = './' + first['file_name']
  json_file = _write_json(tmp_path / 'instances.json', data)
  with pytest.raises(coco_tfrecord.ConversionError, match='listed twice'):
    coco_tfrecord.load_coco_annotations(json_file)


def _jpeg_with_orientation(pixels, orientation):
  exif = Image.Exif()
  exif[274] = orientation
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='JPEG', quality=95, exif=exif)
  return out.getvalue()


def test_exif_orientation_is_ignored_as_coco_annotations_are(coco_tiny_root,
                                                             tmp_path):
  """COCO annotations refer to the stored pixels: the record keeps them,
  and a JSON that gives the displayed (turned) size is refused, saying
  why."""
  data = _coco_subset(coco_tiny_root, 1)
  image = data['images'][0]
  pixels = np.asarray(Image.open(coco_tiny_root / 'val2017' /
                                 image['file_name']).convert('RGB'))
  assert pixels.shape[0] != pixels.shape[1]
  image_dir = tmp_path / 'images'
  image_dir.mkdir()
  encoded = _jpeg_with_orientation(pixels, 6)  # Displayed turned 90 deg.
  (image_dir / image['file_name']).write_bytes(encoded)
  with Image.open(io.BytesIO(encoded)) as check:
    assert check.getexif()[274] == 6
  prefix = str(tmp_path / 'out' / 'val')
  coco_tfrecord.convert_coco_to_tfrecords(
      str(image_dir), _write_json(tmp_path / 'ok.json', data), prefix,
      num_shards=1, show_progress=False)
  (record,) = _read_records(prefix + '-*').values()
  assert record['image/encoded'][0] == encoded  # Kept byte for byte.
  stored = tf.io.decode_image(encoded).numpy()
  np.testing.assert_array_equal(
      tf.io.decode_image(record['image/encoded'][0]).numpy(), stored)
  assert stored.shape[:2] == (image['height'], image['width'])
  # Every annotation is unchanged: it still lies on the stored pixels.
  reference = _read_records(
      coco_tfrecord.convert_coco_to_tfrecords(
          str(coco_tiny_root / 'val2017'), str(tmp_path / 'ok.json'),
          str(tmp_path / 'ref' / 'val'), num_shards=1,
          show_progress=False)['shards'][0])[image['id']]
  for key in OBJECT_KEYS:
    assert record[key] == reference[key], key
  # The size it is displayed at is not the size of the stored pixels.
  image['height'], image['width'] = image['width'], image['height']
  with pytest.raises(coco_tfrecord.ConversionError) as err:
    coco_tfrecord.convert_coco_to_tfrecords(
        str(image_dir), _write_json(tmp_path / 'turned.json', data),
        str(tmp_path / 'out2' / 'val'), num_shards=1, show_progress=False)
  assert 'turned by its EXIF orientation 6' in str(err.value)
  assert 'refer to the stored pixels' in str(err.value)
