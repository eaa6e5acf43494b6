"""ShapeMask parser on real coco_tiny160 records.

Expected values are derived independently from the COCO JSON (boxes, crowd
flags) and pycocotools ``annToMask`` (masks), not from the TFRecords.
"""

import collections
import functools
import glob

import numpy as np
import pytest
import tensorflow as tf
from pycocotools import coco as coco_api

from official_shapemask.dataloaders import shapemask_parser
from official_shapemask.dataloaders import tf_example_decoder
from official_shapemask.ops import anchors as anchor_ops

S = 256
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@functools.lru_cache(maxsize=None)
def _coco(path):
  return coco_api.COCO(path)


def _records(pattern, limit=None):
  files = sorted(glob.glob(pattern))
  assert files, pattern
  records = [r.numpy() for r in tf.data.TFRecordDataset(files)]
  return records[:limit] if limit else records


def _source_id(record):
  data = tf_example_decoder.TfExampleDecoder().decode(tf.constant(record))
  return int(data['source_id'].numpy())


def _json_boxes(anns):
  """COCO [x, y, w, h] -> [ymin, xmin, ymax, xmax] original pixels."""
  return np.array([[a['bbox'][1], a['bbox'][0], a['bbox'][1] + a['bbox'][3],
                    a['bbox'][0] + a['bbox'][2]] for a in anns],
                  np.float64).reshape(-1, 4)


def _canvas_boxes(anns, scale):
  boxes = _json_boxes(anns) * np.tile(scale, 2)
  return np.clip(boxes, 0, S - 1)


def _decode_targets(targets, anchors):
  ha = anchors[:, 2] - anchors[:, 0]
  wa = anchors[:, 3] - anchors[:, 1]
  yc = targets[:, 0] * ha + anchors[:, 0] + ha / 2
  xc = targets[:, 1] * wa + anchors[:, 1] + wa / 2
  h = np.exp(targets[:, 2]) * ha
  w = np.exp(targets[:, 3]) * wa
  return np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], -1)


def _np_crop_and_resize(mask, box, side):
  """Bilinear crop of a normalised box, extrapolation 0 (TF semantics)."""
  height, width = mask.shape
  y1, x1, y2, x2 = box
  steps = np.arange(side)
  ys = y1 * (height - 1) + steps * (y2 - y1) * (height - 1) / (side - 1)
  xs = x1 * (width - 1) + steps * (x2 - x1) * (width - 1) / (side - 1)
  out = np.zeros((side, side))
  y0 = np.floor(ys).astype(int)
  x0 = np.floor(xs).astype(int)
  fy = ys - y0
  fx = xs - x0
  padded = np.pad(mask.astype(np.float64), 1)
  for i in range(side):
    if ys[i] < 0 or ys[i] > height - 1:
      continue
    for j in range(side):
      if xs[j] < 0 or xs[j] > width - 1:
        continue
      a, b = y0[i] + 1, x0[j] + 1
      top = padded[a, b] * (1 - fx[j]) + padded[a, b + 1] * fx[j]
      bottom = padded[a + 1, b] * (1 - fx[j]) + padded[a + 1, b + 1] * fx[j]
      out[i, j] = top * (1 - fy[i]) + bottom * fy[i]
  return out >= 0.5


def _iou(a, b):
  union = np.logical_or(a, b).sum()
  return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _plain_train_parser(**kwargs):
  """No flip, scale 1, no jitter: targets are predictable."""
  args = dict(mode='train', aug_rand_hflip=False, aug_scale_min=1.0,
              aug_scale_max=1.0, box_jitter_scale=0.0, seed=0)
  args.update(kwargs)
  return shapemask_parser.Parser(S, **args)


@pytest.fixture(scope='module')
def train_records(tiny_train_records):
  return _records(tiny_train_records)


@pytest.fixture(scope='module')
def train_coco(coco_tiny_root):
  return _coco(str(coco_tiny_root / 'annotations' /
                   'instances_train2017.json'))


def test_train_outputs_shapes_dtypes_and_ranges(train_records):
  parser = shapemask_parser.Parser(S, mode='train', seed=1)
  parse = tf.function(parser)
  num_anchors = anchor_ops.num_anchors((S, S))
  lo = ((0 - MEAN) / STD).min() - 1e-4
  hi = ((1 - MEAN) / STD).max() + 1e-4
  for record in train_records[:12]:
    image, labels = parse(tf.constant(record))
    image = image.numpy()
    out = {k: v.numpy() for k, v in labels.items()}
    assert image.shape == (S, S, 3) and image.dtype == np.float32
    assert lo <= image.min() and image.max() <= hi

    cls = out['cls_targets']
    assert cls.shape == (num_anchors,) and cls.dtype == np.int32
    assert np.all((cls == -1) | (cls == -2) | ((cls >= 1) & (cls <= 90)))
    assert out['box_targets'].shape == (num_anchors, 4)
    assert out['box_targets'].dtype == np.float32
    assert np.all(np.isfinite(out['box_targets']))
    assert np.all(out['box_targets'][cls <= 0] == 0)
    assert out['num_positives'].shape == ()
    assert out['num_positives'] == np.sum(cls > 0) > 0

    info = out['image_info']
    assert info.shape == (4, 2) and info.dtype == np.float32
    assert info[1].tolist() == [S, S]
    long_side_scale = S / info[0].max()
    assert np.all(info[2] >= 0.8 * long_side_scale - 0.01)
    assert np.all(info[2] <= 1.2 * long_side_scale + 0.01)
    assert np.all(info[3] >= 0) and np.all(info[3] == np.floor(info[3]))
    assert np.all(info[3] <= np.maximum(info[0] * info[2] - S, 0) + 1)

    for key in ('mask_boxes', 'mask_outer_boxes'):
      boxes = out[key]
      assert boxes.shape == (8, 4) and boxes.dtype == np.float32
      assert np.all(boxes >= 0) and np.all(boxes <= S - 1)
      assert np.all(boxes[:, 2] >= boxes[:, 0])
      assert np.all(boxes[:, 3] >= boxes[:, 1])
    inner, outer = out['mask_boxes'], out['mask_outer_boxes']
    assert np.all(outer[:, :2] <= inner[:, :2] + 1e-3)
    assert np.all(outer[:, 2:] >= inner[:, 2:] - 1e-3)
    classes = out['mask_classes']
    assert classes.shape == (8,) and classes.dtype == np.int32
    assert np.all((classes >= 0) & (classes <= 90))
    assert out['mask_targets'].shape == (8, 32, 32)
    assert out['fine_mask_targets'].shape == (8, 128, 128)
    for key in ('mask_targets', 'fine_mask_targets', 'mask_is_valid'):
      assert out[key].dtype == np.float32
      assert set(np.unique(out[key])) <= {0.0, 1.0}
    assert out['mask_is_valid'].shape == (8,)
    pad = classes == 0
    assert np.all(inner[pad] == 0) and np.all(out['mask_targets'][pad] == 0)
    assert np.all(out['fine_mask_targets'][pad] == 0)
    # Real slots carry some foreground.
    assert np.all(out['fine_mask_targets'][~pad].sum(axis=(1, 2)) > 0)


def test_bfloat16_image(train_records):
  parser = shapemask_parser.Parser(S, mode='train', use_bfloat16=True, seed=1)
  image, _ = parser(tf.constant(train_records[0]))
  assert image.dtype == tf.bfloat16 and image.shape == (S, S, 3)


def _np_iou(anchors, boxes):
  """[A, n] IoU with plain (max - min) sizes."""
  a = anchors[:, None, :]
  b = boxes[None, :, :]
  ih = np.clip(np.minimum(a[..., 2], b[..., 2]) -
               np.maximum(a[..., 0], b[..., 0]), 0, None)
  iw = np.clip(np.minimum(a[..., 3], b[..., 3]) -
               np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = ih * iw
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  return inter / (area_a + area_b - inter)


def test_every_gt_box_has_a_positive_anchor_and_crowds_are_skipped(
    train_records, train_coco):
  parse = tf.function(_plain_train_parser(num_sampled_masks=64))
  anchors = anchor_ops.generate_anchors((S, S))
  num_crowd_images = 0
  num_boxes = 0
  collisions = 0
  for record in train_records:
    image_id = _source_id(record)
    anns = train_coco.loadAnns(train_coco.getAnnIds(imgIds=image_id))
    crowd = [a for a in anns if a['iscrowd']]
    solid = [a for a in anns if not a['iscrowd']]
    num_crowd_images += bool(crowd)
    _, labels = parse(tf.constant(record))
    cls = labels['cls_targets'].numpy()
    info = labels['image_info'].numpy()
    expected = _canvas_boxes(solid, info[2])
    iou = _np_iou(anchors, expected)

    positive = cls > 0
    decoded = _decode_targets(labels['box_targets'].numpy()[positive],
                              anchors[positive])
    for j, (box, ann) in enumerate(zip(expected, solid)):
      num_boxes += 1
      hits = np.all(np.abs(decoded - box) < 0.05, axis=1)
      if np.any(hits & (cls[positive] == ann['category_id'])):
        continue
      # Reference force matching: when two boxes below IoU 0.5 share their
      # best anchor (ties included), one keeps it and the other box gets no
      # positive (tiny overlapping objects at this small canvas).
      best = np.flatnonzero(iou[:, j] >= iou[:, j].max() - 1e-5)
      taken = positive[best] & (cls[best] > 0)
      assert iou[:, j].max() < 0.5 and np.any(taken), (
          f'image {image_id}: box of annotation {ann["id"]} has no positive '
          'anchor')
      collisions += 1
    # Positives come only from non-crowd boxes.
    distance = np.abs(decoded[:, None, :] - expected[None]).max(-1)
    assert np.all(distance.min(1) < 0.05), f'image {image_id}'

    # The mask branch sees exactly the non-crowd instances (64 slots >= n).
    classes = labels['mask_classes'].numpy()
    sampled = labels['mask_boxes'].numpy()[classes > 0]
    assert len(sampled) == len(solid)
    for box in expected:
      assert np.any(np.all(np.abs(sampled - box) < 0.05, axis=1))
    if crowd:
      crowd_boxes = _canvas_boxes(crowd, info[2])
      for box in crowd_boxes:
        assert not np.any(np.all(np.abs(sampled - box) < 0.05, axis=1))
  assert num_crowd_images > 0  # the data exercises the crowd branch
  # Measured: 56 of 699 boxes at S = 256 (none of them left unexplained).
  assert collisions <= 0.1 * num_boxes, (collisions, num_boxes)


def test_crowds_kept_when_not_skipped(train_records, train_coco):
  parse = tf.function(_plain_train_parser(num_sampled_masks=64,
                                          skip_crowd_during_training=False))
  for record in train_records:
    image_id = _source_id(record)
    anns = train_coco.loadAnns(train_coco.getAnnIds(imgIds=image_id))
    if not any(a['iscrowd'] for a in anns):
      continue
    _, labels = parse(tf.constant(record))
    assert np.sum(labels['mask_classes'].numpy() > 0) == len(anns)
    return
  pytest.fail('no crowd image in train split')


def test_mask_targets_match_gt_mask_cropped_to_outer_box(train_records,
                                                         train_coco):
  parse = tf.function(_plain_train_parser())
  ious = []
  for record in train_records[:16]:
    image_id = _source_id(record)
    anns = [a for a in train_coco.loadAnns(train_coco.getAnnIds(
        imgIds=image_id)) if not a['iscrowd']]
    _, labels = parse(tf.constant(record))
    out = {k: v.numpy() for k, v in labels.items()}
    scale = out['image_info'][2].astype(np.float64)
    height, width = out['image_info'][0]
    canvas = _canvas_boxes(anns, scale)
    for slot in np.flatnonzero(out['mask_classes'] > 0):
      assert out['mask_is_valid'][slot] == 1.0
      match = np.flatnonzero(
          np.all(np.abs(canvas - out['mask_boxes'][slot]) < 0.05, axis=1) &
          (np.array([a['category_id'] for a in anns]) ==
           out['mask_classes'][slot]))
      assert len(match) >= 1
      ann = anns[match[0]]
      # Reference outer box: 1.25x about the centre, clipped to the canvas,
      # mapped back to the original image and normalised by H, W.
      box = canvas[match[0]]
      center = (box[:2] + box[2:]) / 2
      half = (box[2:] - box[:2]) * 1.25 / 2
      outer = np.clip(np.concatenate([center - half, center + half]), 0,
                      S - 1)
      np.testing.assert_allclose(out['mask_outer_boxes'][slot], outer,
                                 atol=0.05)
      norm = outer / np.tile(scale, 2) / np.array([height, width] * 2)
      gt_mask = train_coco.annToMask(ann)
      for key, side in (('mask_targets', 32), ('fine_mask_targets', 128)):
        iou = _iou(out[key][slot] > 0.5, _np_crop_and_resize(gt_mask, norm,
                                                             side))
        assert iou > 0.9, (f'image {image_id} annotation {ann["id"]} {key}: '
                           f'IoU {iou:.3f}')
        ious.append(iou)
  assert len(ious) >= 40


def test_flip_mirrors_mask_targets(train_records):
  """With the flip forced on, the mask targets are the mirrored ones."""
  record = tf.constant(train_records[0])
  plain = _plain_train_parser()
  flipping = _plain_train_parser(aug_rand_hflip=True)
  seed = None
  for s in range(64):  # find a seed whose coin flips (p = 0.5 each)
    candidate = tf.constant([s, 0], tf.int64)
    image, _ = flipping(record, seed=candidate)
    ref, _ = plain(record, seed=candidate)
    if not np.allclose(image.numpy(), ref.numpy()):
      seed = candidate
      break
  assert seed is not None
  _, base = plain(record, seed=seed)
  _, flipped = flipping(record, seed=seed)
  info = base['image_info'].numpy()
  scaled_width = info[0][1] * info[2][1]
  classes = base['mask_classes'].numpy()
  # Same permutation seed: slot k holds the same instance in both.
  np.testing.assert_array_equal(classes, flipped['mask_classes'].numpy())
  for k in np.flatnonzero(classes > 0):
    a = base['mask_boxes'].numpy()[k]
    b = flipped['mask_boxes'].numpy()[k]
    # atol 1: clipping to S - 1 may move an edge box by up to a pixel.
    np.testing.assert_allclose(b[[1, 3]], scaled_width - a[[3, 1]], atol=1.0)
    np.testing.assert_allclose(b[[0, 2]], a[[0, 2]], atol=1e-4)
    mirrored = base['fine_mask_targets'].numpy()[k][:, ::-1]
    assert _iou(flipped['fine_mask_targets'].numpy()[k] > 0.5,
                mirrored > 0.5) > 0.9


def test_voc_split_marks_only_voc_slots_valid(train_records):
  parse = tf.function(_plain_train_parser(mask_train_class='voc'))
  seen = collections.Counter()
  for record in train_records[:20]:
    _, labels = parse(tf.constant(record))
    classes = labels['mask_classes'].numpy()
    valid = labels['mask_is_valid'].numpy()
    in_voc = np.isin(classes, shapemask_parser.VOC_CLASS_IDS)
    np.testing.assert_array_equal(valid, in_voc.astype(np.float32))
    seen['voc'] += int(np.sum(in_voc))
    seen['other'] += int(np.sum(~in_voc & (classes > 0)))
  assert seen['voc'] > 0 and seen['other'] > 0


def _slot_instances(labels, instance_boxes, instance_classes):
  """Index of the instance in each slot (by box and class), -1 if empty."""
  boxes = labels['mask_boxes'].numpy()
  classes = labels['mask_classes'].numpy()
  index = []
  for box, cls in zip(boxes, classes):
    if cls == 0:
      assert not np.any(box)
      index.append(-1)
      continue
    match = np.flatnonzero(
        np.all(np.abs(instance_boxes - box) < 1e-4, axis=1) &
        (instance_classes == cls))
    assert len(match) == 1, (box, cls)
    index.append(int(match[0]))
  return np.array(index)


@pytest.mark.parametrize('sampler', shapemask_parser.MASK_SAMPLERS)
def test_mask_sampler_fills_slots_by_its_rule(train_records, sampler):
  every = tf.function(_plain_train_parser(num_sampled_masks=64))
  parse = tf.function(_plain_train_parser(mask_sampler=sampler))
  sizes = set()
  for record in train_records[:12]:
    _, all_labels = every(tf.constant(record))
    classes = all_labels['mask_classes'].numpy()
    n = int(np.sum(classes > 0))
    instances = (all_labels['mask_boxes'].numpy()[classes > 0],
                 classes[classes > 0])
    _, labels = parse(tf.constant(record))
    index = _slot_instances(labels, *instances)
    counts = np.bincount(index[index >= 0], minlength=n)
    if sampler == 'pad_2020' or n >= 8:
      # Distinct instances, then empty slots.
      assert np.sum(index >= 0) == min(n, 8) and counts.max() == 1
      assert np.all(index[:min(n, 8)] >= 0)
    else:
      # Slot i of a permutation of 0..7 holds instance i mod n: the j-th
      # instance fills len(range(j, 8, n)) slots, none is empty (`every`
      # lists the instances in its own random order, hence the sort).
      np.testing.assert_array_equal(np.sort(counts)[::-1],
                                    [len(range(j, 8, n)) for j in range(n)])
    np.testing.assert_array_equal(labels['mask_is_valid'].numpy(),
                                  np.ones(8, np.float32))
    for key in ('mask_targets', 'fine_mask_targets'):
      targets = labels[key].numpy()
      assert not np.any(targets[index < 0])
      assert np.all(targets[index >= 0].sum(axis=(1, 2)) > 0)
    sizes.add('few' if n < 8 else 'many')
  assert sizes == {'few', 'many'}


def test_mask_samplers_are_seeded(train_records):
  record = tf.constant(train_records[0])  # 4 instances: slots repeat
  draws = []
  for seed in (1, 1, 2):
    parser = _plain_train_parser(mask_sampler='seed_2019', seed=seed)
    draws.append(parser(record)[1]['mask_boxes'].numpy())
  np.testing.assert_array_equal(draws[0], draws[1])
  assert not np.array_equal(draws[0], draws[2])


def test_seeded_parses_are_reproducible(train_records):
  record = tf.constant(train_records[3])
  a = shapemask_parser.Parser(S, mode='train', seed=5)(record)
  b = shapemask_parser.Parser(S, mode='train', seed=5)(record)
  c = shapemask_parser.Parser(S, mode='train', seed=6)(record)
  for key in a[1]:
    np.testing.assert_array_equal(a[1][key].numpy(), b[1][key].numpy())
  assert not all(np.array_equal(a[1][k].numpy(), c[1][k].numpy())
                 for k in ('image_info', 'mask_boxes'))


def test_eval_groundtruths_match_json(tiny_val_records, coco_tiny_root):
  coco = _coco(str(coco_tiny_root / 'annotations' / 'instances_val2017.json'))
  parse = tf.function(shapemask_parser.Parser(S, mode='eval'))
  records = _records(tiny_val_records)
  assert len(records) == 80
  total = 0
  for index, record in enumerate(records):
    image, labels = parse(tf.constant(record))
    gt = {k: v.numpy() for k, v in labels['groundtruths'].items()}
    info = labels['image_info'].numpy()
    image_id = int(gt['source_id'])
    img = coco.loadImgs(image_id)[0]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    n = len(anns)
    total += n

    assert image.shape == (S, S, 3) and image.dtype == tf.float32
    assert gt['source_id'].dtype == np.int64
    assert (gt['height'], gt['width']) == (img['height'], img['width'])
    assert gt['height'].dtype == np.int32
    scale = S / max(img['height'], img['width'])
    np.testing.assert_allclose(info[0], [img['height'], img['width']])
    np.testing.assert_allclose(info[2], [scale, scale], rtol=5e-3)
    np.testing.assert_array_equal(info[3], [0, 0])
    scaled = np.round(info[0] * info[2]).astype(int)
    assert np.all(image.numpy()[scaled[0]:] == 0)
    assert np.all(image.numpy()[:, scaled[1]:] == 0)

    assert gt['num_detections'] == n and gt['num_detections'].dtype == np.int32
    assert gt['boxes'].shape == (100, 4) and gt['boxes'].dtype == np.float32
    np.testing.assert_allclose(gt['boxes'][:n], _json_boxes(anns), atol=0.02)
    assert np.all(gt['boxes'][n:] == -1)
    assert gt['classes'].dtype == np.int32
    np.testing.assert_array_equal(gt['classes'][:n],
                                  [a['category_id'] for a in anns])
    assert np.all(gt['classes'][n:] == -1)
    np.testing.assert_allclose(gt['areas'][:n], [a['area'] for a in anns],
                               rtol=1e-5)
    assert np.all(gt['areas'][n:] == -1)
    assert gt['is_crowds'].dtype == np.int32
    np.testing.assert_array_equal(gt['is_crowds'][:n],
                                  [a['iscrowd'] for a in anns])
    assert np.all(gt['is_crowds'][n:] == 0)
    assert gt['masks_png'].shape == (100,)
    assert all(p == b'' for p in gt['masks_png'][n:])
    if index % 4 == 0:  # decoding every mask is slow; a quarter suffices
      for png, ann in zip(gt['masks_png'][:n], anns):
        mask = tf.io.decode_png(png, channels=1).numpy()[..., 0]
        np.testing.assert_array_equal(mask, coco.annToMask(ann))
  assert total == 815


def test_rejects_bad_settings():
  with pytest.raises(ValueError, match='mode'):
    shapemask_parser.Parser(S, mode='predict')
  with pytest.raises(ValueError, match='output_size'):
    shapemask_parser.Parser(200)
  with pytest.raises(ValueError, match='mask_train_class'):
    shapemask_parser.Parser(S, mask_train_class='coco')
  with pytest.raises(ValueError, match="mask_sampler.*'seed'"):
    shapemask_parser.Parser(S, mask_sampler='seed')


def _example(num_boxes, with_masks, source_id=b'17', height=20, width=30):
  """A synthetic record with `num_boxes` boxes (edge cases only)."""
  feature = lambda **kw: tf.train.Feature(**kw)
  floats = lambda v: feature(float_list=tf.train.FloatList(value=v))
  ints = lambda v: feature(int64_list=tf.train.Int64List(value=v))
  data = lambda v: feature(bytes_list=tf.train.BytesList(value=v))
  mask = np.zeros([height, width, 1], np.uint8)
  mask[height // 10:max(height // 2, 1), width // 10:max(width // 2, 1)] = 1
  features = {
      'image/encoded': data([tf.io.encode_jpeg(
          tf.fill([height, width, 3], tf.constant(90, tf.uint8))).numpy()]),
      'image/source_id': data([source_id]),
      'image/height': ints([height]),
      'image/width': ints([width]),
      'image/object/bbox/ymin': floats([0.1] * num_boxes),
      'image/object/bbox/xmin': floats([0.1] * num_boxes),
      'image/object/bbox/ymax': floats([0.5] * num_boxes),
      'image/object/bbox/xmax': floats([0.5] * num_boxes),
      'image/object/class/label': ints([3] * num_boxes),
  }
  if with_masks:
    features['image/object/mask'] = data(
        [tf.io.encode_png(mask).numpy()] * num_boxes)
  return tf.train.Example(features=tf.train.Features(
      feature=features)).SerializeToString()


@pytest.mark.parametrize('sampler', shapemask_parser.MASK_SAMPLERS)
def test_image_without_instances(sampler):
  record = tf.constant(_example(0, with_masks=True))
  _, labels = shapemask_parser.Parser(128, mode='train', seed=0,
                                      mask_sampler=sampler)(record)
  assert labels['num_positives'].numpy() == 0
  assert np.all(labels['cls_targets'].numpy() == -1)
  assert np.all(labels['mask_is_valid'].numpy() == 0)
  assert np.all(labels['mask_classes'].numpy() == 0)
  assert np.all(labels['mask_targets'].numpy() == 0)
  _, labels = shapemask_parser.Parser(128, mode='eval')(record)
  assert labels['groundtruths']['num_detections'].numpy() == 0
  assert labels['groundtruths']['source_id'].numpy() == 17


def test_bad_records_fail_with_named_errors():
  parser = shapemask_parser.Parser(128, mode='train', seed=0)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='one image/object/mask PNG per instance'):
    parser(tf.constant(_example(1, with_masks=False)))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='source_id must be a decimal integer'):
    shapemask_parser.Parser(128, mode='eval')(
        tf.constant(_example(1, with_masks=True, source_id=b'ab')))


@pytest.mark.parametrize('height,width', [(3, 2000), (2000, 3)])
def test_extreme_aspect_ratio_keeps_one_pixel(height, width):
  # At S = 128 the short side scales to 0.19 px: it becomes one pixel.
  record = tf.constant(_example(1, with_masks=True, height=height,
                                width=width))
  image, labels = shapemask_parser.Parser(128, mode='eval')(record)
  info = labels['image_info'].numpy()
  scaled = np.round(info[0] * info[2])
  np.testing.assert_array_equal(scaled, [1, 128] if height < width else
                                [128, 1])
  image = image.numpy()
  filled = np.abs(image).sum(axis=-1) > 0
  assert filled.sum() == 128 and filled[0, 0], filled.sum()
  image, labels = shapemask_parser.Parser(128, mode='train', seed=0)(record)
  assert np.all(np.isfinite(image.numpy()))
  assert np.all(labels['image_info'].numpy()[2] > 0)
