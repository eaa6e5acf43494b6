"""Tests for official_shapemask.data_prep.shape_priors and its CLI.

Real data: coco_tiny160 train2017 (80 images, 705 instances, 6 crowd).
"""
import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_api

from official_shapemask.data_prep import shape_priors
from official_shapemask.modeling import prior_file

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
K = 4


@pytest.fixture(scope='module')
def train_json(coco_tiny_root):
  return coco_tiny_root / 'annotations' / 'instances_train2017.json'


@pytest.fixture(scope='module')
def priors_and_summary(train_json):
  return shape_priors.compute_shape_priors(train_json, num_clusters=K, seed=3)


@pytest.fixture(scope='module')
def masks(train_json):
  masks_u8, category_ids, skipped = shape_priors.instance_masks(train_json)
  return masks_u8.astype(np.float32) / 255.0, category_ids, skipped


def test_shape_dtype_range(priors_and_summary):
  priors, summary = priors_and_summary
  assert priors.shape == (91, K, 32, 32)
  assert priors.dtype == np.float32
  assert priors.min() >= 0.0 and priors.max() <= 1.0
  # Soft values: not just a binary array.
  assert np.mean((priors > 0.05) & (priors < 0.95)) > 0.05
  assert summary['num_classes'] == 91


def test_summary_counts(train_json, priors_and_summary):
  _, summary = priors_and_summary
  with open(train_json) as f:
    data = json.load(f)
  crowd = sum(a['iscrowd'] for a in data['annotations'])
  assert summary['num_crowd_skipped'] == crowd == 6
  assert summary['num_instances'] + summary['num_empty_skipped'] == 705 - 6
  counts = summary['instances_per_class']
  assert len(counts) == 80
  assert sum(counts.values()) == summary['num_instances']
  person = sum(1 for a in data['annotations']
               if a['category_id'] == 1 and not a['iscrowd'])
  assert counts[1] == person
  assert summary['category_names'][1] == 'person'
  for cid, n in counts.items():
    expected = 'kmeans' if n >= K else ('fill' if n else 'global_mean')
    assert summary['method_per_class'][cid] == expected
  lines = shape_priors.format_summary(summary)
  assert any('person' in line and str(person) in line for line in lines)


def test_instance_masks_match_independent_crop(train_json, masks):
  """The box-frame rasteriser agrees with decode-full-mask, crop, resize."""
  masks_f, category_ids, _ = masks
  with open(train_json) as f:
    data = json.load(f)
  sizes = {img['id']: (img['height'], img['width']) for img in data['images']}
  kept = [a for a in data['annotations'] if not a['iscrowd']]
  assert len(kept) == len(masks_f)
  # The largest few instances: the rasterisation error is then small.
  order = np.argsort([-a['area'] for a in kept])[:5]
  for i in order:
    ann = kept[i]
    height, width = sizes[ann['image_id']]
    rle = mask_api.merge(
        mask_api.frPyObjects(ann['segmentation'], height, width))
    full = mask_api.decode(rle)
    rows = np.flatnonzero(full.any(1))
    cols = np.flatnonzero(full.any(0))
    crop = full[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    expected = cv2.resize(crop, (32, 32), interpolation=cv2.INTER_AREA)
    assert category_ids[i] == ann['category_id']
    assert np.abs(masks_f[i] - expected).mean() < 0.03, ann['id']
    # Tight box: the mask reaches all four borders.
    m = masks_f[i]
    assert m[0].max() > 0 and m[-1].max() > 0
    assert m[:, 0].max() > 0 and m[:, -1].max() > 0


def test_first_prior_close_to_class_mean(priors_and_summary, masks):
  priors, summary = priors_and_summary
  masks_f, category_ids, _ = masks
  checked_kmeans = 0
  for cid, n in summary['instances_per_class'].items():
    if n == 0:
      continue
    own = masks_f[category_ids == cid]
    mean = own.mean(axis=0)
    if n < K:
      # Fill rule: prior 0 is the class mean mask itself.
      np.testing.assert_allclose(priors[cid, 0], mean, atol=1e-5)
      continue
    checked_kmeans += 1
    # Prior 0 (largest cluster) is nearer the class mean than the median
    # instance of that class is.
    distance = np.abs(priors[cid, 0] - mean).mean()
    instance_distances = np.abs(own - mean).mean(axis=(1, 2))
    assert distance < np.median(instance_distances), (cid, distance)
    if n >= 5 * K:
      # Well-populated classes: the thresholded shapes overlap well.
      a, b = priors[cid, 0] > 0.5, mean > 0.5
      iou = (a & b).sum() / max((a | b).sum(), 1)
      assert iou > 0.6, (cid, iou)
  assert checked_kmeans >= 30


def test_clusters_ordered_by_size_and_rows(priors_and_summary, masks):
  priors, _ = priors_and_summary
  masks_f, category_ids, _ = masks
  own = masks_f[category_ids == 1].reshape(-1, 32 * 32)  # person, 140.
  centers = priors[1].reshape(K, -1)
  distances = ((own[:, None, :] - centers[None]) ** 2).sum(-1)
  sizes = np.bincount(distances.argmin(1), minlength=K)
  assert np.all(np.diff(sizes) <= 0), sizes
  # Empty / unused rows hold the mean of all instances.
  global_mean = masks_f.mean(axis=0)
  for row in (0, 12, 26, 45, 83):
    for j in range(K):
      np.testing.assert_allclose(priors[row, j], global_mean, atol=1e-5)


def test_fill_rule_few_instances(priors_and_summary, masks):
  priors, summary = priors_and_summary
  masks_f, category_ids, _ = masks
  single = [c for c, n in summary['instances_per_class'].items() if n == 1]
  assert single
  cid = single[0]
  instance = masks_f[category_ids == cid][0]
  # [mean (= the instance), instance, mirrored instance, mean, ...].
  np.testing.assert_allclose(priors[cid, 0], instance, atol=1e-5)
  np.testing.assert_allclose(priors[cid, 1], instance, atol=1e-5)
  np.testing.assert_allclose(priors[cid, 2], instance[:, ::-1], atol=1e-5)
  np.testing.assert_allclose(priors[cid, 3], instance, atol=1e-5)


def test_deterministic_with_seed(train_json, priors_and_summary):
  priors, _ = priors_and_summary
  again, _ = shape_priors.compute_shape_priors(train_json, num_clusters=K,
                                               seed=3)
  assert np.array_equal(priors, again)
  other, _ = shape_priors.compute_shape_priors(train_json, num_clusters=K,
                                               seed=4)
  assert other.shape == priors.shape
  assert not np.array_equal(other, priors)


def test_class_agnostic_and_sizes(train_json, masks):
  priors, summary = shape_priors.compute_shape_priors(
      train_json, num_clusters=K, class_agnostic=True, prior_size=16)
  assert priors.shape == (1, K, 16, 16)
  assert summary['num_classes'] == 1 and summary['class_agnostic']
  assert priors.min() >= 0.0 and priors.max() <= 1.0
  wide, _ = shape_priors.compute_shape_priors(train_json, num_clusters=2,
                                              num_classes=100)
  assert wide.shape == (100, 2, 32, 32)
  with pytest.raises(ValueError, match='num_classes = 50 is too small'):
    shape_priors.compute_shape_priors(train_json, num_clusters=2,
                                      num_classes=50)
  with pytest.raises(ValueError, match='num_clusters'):
    shape_priors.compute_shape_priors(train_json, num_clusters=0)


def test_compute_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.json'):
    shape_priors.compute_shape_priors(tmp_path / 'missing.json')
  bad = tmp_path / 'bad.json'
  bad.write_text('{"images": []}')
  with pytest.raises(ValueError, match='bad.json.*annotations'):
    shape_priors.compute_shape_priors(bad)
  crowd_only = tmp_path / 'crowd.json'
  crowd_only.write_text(json.dumps({
      'images': [{'id': 1, 'height': 4, 'width': 4}],
      'categories': [{'id': 1, 'name': 'a'}],
      'annotations': [{'id': 5, 'image_id': 1, 'category_id': 1,
                       'iscrowd': 1, 'segmentation': {
                           'size': [4, 4], 'counts': [0, 16]}}]}))
  with pytest.raises(ValueError, match='no non-crowd instance'):
    shape_priors.compute_shape_priors(crowd_only)


def test_kmeans_recovers_separated_clusters():
  rng = np.random.default_rng(0)
  truth = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  x = np.concatenate([c + 0.1 * rng.standard_normal((n, 2))
                      for c, n in zip(truth, (50, 30, 20))])
  centers, counts = shape_priors.kmeans(x, 3, np.random.default_rng(1))
  assert sorted(counts.tolist()) == [20, 30, 50]
  for c in truth:
    assert np.min(np.linalg.norm(centers - c, axis=1)) < 0.1


def test_load_shape_priors(tmp_path, priors_and_summary):
  priors, _ = priors_and_summary
  path = tmp_path / 'p.npy'
  shape_priors.save_array_atomic(priors, path)
  loaded = prior_file.load_shape_priors(path, num_classes=91)
  assert loaded.dtype == np.float32 and np.array_equal(loaded, priors)
  with pytest.raises(ValueError) as err:
    prior_file.load_shape_priors(path, num_classes=81)
  assert '91' in str(err.value) and '81' in str(err.value)
  assert str(path) in str(err.value)
  with pytest.raises(ValueError, match='class-agnostic'):
    prior_file.load_shape_priors(path, class_agnostic=True)
  agnostic = tmp_path / 'a.npy'
  np.save(agnostic, priors[:1])
  assert prior_file.load_shape_priors(
      agnostic, num_classes=91, class_agnostic=True).shape == (1, K, 32, 32)
  with pytest.raises(FileNotFoundError, match='nothere.npy'):
    prior_file.load_shape_priors(tmp_path / 'nothere.npy')
  cases = {
      'three_d.npy': (np.zeros((91, 4, 32), np.float32), '4-D'),
      'rect.npy': (np.zeros((2, 4, 32, 16), np.float32), 'square'),
      'nan.npy': (np.full((2, 1, 8, 8), np.nan, np.float32), 'NaN'),
      'range.npy': (np.full((2, 1, 8, 8), 3.0, np.float32), r'\[0, 1\]'),
  }
  for name, (array, message) in cases.items():
    np.save(tmp_path / name, array)
    with pytest.raises(ValueError, match=message) as err:
      prior_file.load_shape_priors(tmp_path / name)
    assert name in str(err.value)
  (tmp_path / 'text.npy').write_text('not an array')
  with pytest.raises(ValueError, match='text.npy'):
    prior_file.load_shape_priors(tmp_path / 'text.npy')


def test_grid_png(tmp_path, priors_and_summary):
  priors, summary = priors_and_summary
  path = tmp_path / 'grid.png'
  height, width = shape_priors.save_prior_grid_png(
      priors, path, category_names=summary['category_names'])
  image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
  assert image.shape == (height, width)
  # One row per category present (80), 64-px cells with 2-px gaps.
  assert height == 80 * 66 + 2
  assert width == 150 + K * 66 + 2
  # The person row's first cell is the first person prior, upscaled.
  top, left = 2, 152
  cell = image[top:top + 64:2, left:left + 64:2].astype(np.float32) / 255
  np.testing.assert_allclose(cell, priors[1, 0], atol=1 / 255 + 1e-6)
  assert [p.name for p in tmp_path.iterdir()] == ['grid.png']


def test_cli_writes_npy_and_png(tmp_path, train_json):
  output = tmp_path / 'out' / 'priors.npy'
  result = subprocess.run(
      [sys.executable, 'tools/generate_shape_priors.py',
       f'--annotation_file={train_json}', f'--output={output}',
       '--num_clusters=3', '--seed=7'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'person' in result.stdout and str(output) in result.stdout
  priors = np.load(output)
  assert priors.shape == (91, 3, 32, 32) and priors.dtype == np.float32
  expected, _ = shape_priors.compute_shape_priors(train_json, num_clusters=3,
                                                  seed=7)
  assert np.array_equal(priors, expected)
  png = output.with_suffix('.png')
  assert png.is_file() and cv2.imread(str(png)) is not None
  assert sorted(p.name for p in output.parent.iterdir()) == [
      'priors.npy', 'priors.png']
  # Missing input: a one-line error naming the path, non-zero exit.
  bad = subprocess.run(
      [sys.executable, 'tools/generate_shape_priors.py',
       f'--annotation_file={tmp_path / "none.json"}',
       f'--output={tmp_path / "x.npy"}'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
  assert bad.returncode != 0
  assert 'none.json' in bad.stderr and 'Traceback' not in bad.stderr
  assert not (tmp_path / 'x.npy').exists()


def test_kmeans_fewer_distinct_points_than_clusters():
  x = np.array([[0.0, 1.0]] * 5 + [[1.0, 0.0]] * 3)
  centers, counts = shape_priors.kmeans(x, 3, np.random.default_rng(0))
  assert counts.sum() == 8 and sorted(counts.tolist())[-2:] == [3, 5]
  for c in ([0.0, 1.0], [1.0, 0.0]):
    assert np.min(np.abs(centers - c).sum(1)) == 0.0
  with pytest.raises(ValueError, match='at least 3 points'):
    shape_priors.kmeans(x[:2], 3, np.random.default_rng(0))


def test_rle_and_polygon_instances(tmp_path):
  """Non-crowd RLE (list and compressed counts) and polygon instances."""
  image = np.zeros((20, 30), np.uint8)
  image[4:12, 6:22] = 1  # 8 x 16 rectangle ...
  image[8:12, 6:14] = 0  # ... minus its lower-left quarter: an L shape.
  compressed = mask_api.encode(np.asfortranarray(image))
  compressed['counts'] = compressed['counts'].decode('ascii')
  # Uncompressed COCO RLE: column-major run lengths starting with zeros.
  flat = image.flatten(order='F')
  runs, value, length = [], 0, 0
  for v in flat:
    if v == value:
      length += 1
    else:
      runs.append(length)
      value, length = v, 1
  runs.append(length)
  data = {
      'images': [{'id': 1, 'height': 20, 'width': 30}],
      'categories': [{'id': 1, 'name': 'ell'}, {'id': 3, 'name': 'box'}],
      'annotations': [
          {'id': 1, 'image_id': 1, 'category_id': 1, 'iscrowd': 0,
           'segmentation': compressed},
          {'id': 2, 'image_id': 1, 'category_id': 1, 'iscrowd': 0,
           'segmentation': {'size': [20, 30], 'counts': runs}},
          {'id': 3, 'image_id': 1, 'category_id': 3, 'iscrowd': 0,
           'segmentation': [[2.0, 3.0, 10.0, 3.0, 10.0, 7.0, 2.0, 7.0]]},
      ]}
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps(data))
  priors, summary = shape_priors.compute_shape_priors(
      path, num_clusters=1, prior_size=8)
  assert priors.shape == (4, 1, 8, 8)
  assert summary['instances_per_class'] == {1: 2, 3: 1}
  expected_l = np.ones((8, 8), np.float32)
  expected_l[4:, :4] = 0.0
  np.testing.assert_allclose(priors[1, 0], expected_l, atol=1e-6)
  np.testing.assert_allclose(priors[3, 0], np.ones((8, 8)), atol=1e-6)
  # Rows 0 and 2: the mean of the three instances.
  np.testing.assert_allclose(priors[2, 0], (2 * expected_l + 1) / 3,
                             atol=1 / 255)
