"""Synthetic shapes dataset: determinism, COCO validity, masks, occlusion."""
import glob
import itertools
import json
import os
import pathlib
import subprocess
import sys

import cv2
import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
import pytest

from official_shapemask.cli.make_synthetic_coco import make_synthetic_coco

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
  root = tmp_path_factory.mktemp('synthetic')
  summary = make_synthetic_coco(str(root), num_train=24, num_val=8,
                                image_size=128, seed=7)
  return root, summary


def _tree(root):
  """{relative path: bytes} of every file under root."""
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(pathlib.Path(root).rglob('*')) if p.is_file()}


def test_deterministic_for_a_seed(tmp_path):
  make_synthetic_coco(str(tmp_path / 'a'), num_train=5, num_val=3,
                      image_size=96, seed=3)
  make_synthetic_coco(str(tmp_path / 'b'), num_train=5, num_val=3,
                      image_size=96, seed=3)
  make_synthetic_coco(str(tmp_path / 'c'), num_train=5, num_val=3,
                      image_size=96, seed=4)
  a, b, c = (_tree(tmp_path / n) for n in 'abc')
  assert len(a) == 5 + 3 + 2
  assert a == b
  assert set(a) == set(c)
  assert all(a[k] != c[k] for k in a if k.endswith('.png'))


def test_counts_and_coco_validity(synthetic):
  root, summary = synthetic
  for split, count in (('train', 24), ('val', 8)):
    info = summary[split]
    assert info['images'] == count
    assert len(glob.glob(str(root / split / '*.png'))) == count
    coco = COCO(info['annotation_file'])
    assert len(coco.getImgIds()) == count
    assert len(coco.getAnnIds()) == info['instances']
    assert len(coco.getCatIds()) >= 5
    assert len({c['name'] for c in coco.dataset['categories']}) >= 5
    per_image = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert min(per_image) >= 1 and max(per_image) <= 10
    for image in coco.dataset['images']:
      pixels = cv2.imread(str(root / split / image['file_name']))
      assert pixels.shape == (128, 128, 3)
  train_ids = set(COCO(summary['train']['annotation_file']).getImgIds())
  val_ids = set(COCO(summary['val']['annotation_file']).getImgIds())
  assert not train_ids & val_ids
  # Every class is used in train, and both polygon and RLE forms occur.
  with open(summary['train']['annotation_file']) as f:
    data = json.load(f)
  assert {a['category_id'] for a in data['annotations']} == {
      c['id'] for c in data['categories']}
  forms = {type(a['segmentation']).__name__ for a in data['annotations']}
  assert forms == {'list', 'dict'}


def test_masks_agree_with_boxes_areas_and_pixels(synthetic):
  root, summary = synthetic
  coco = COCO(summary['train']['annotation_file'])
  size = 128
  for image_id in coco.getImgIds():
    image = cv2.imread(str(root / 'train' / coco.imgs[image_id]['file_name']))
    image = image.astype(np.float32)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
    for ann in anns:
      mask = coco.annToMask(ann)
      assert mask.shape == (size, size)
      ys, xs = np.nonzero(mask)
      assert len(ys) == ann['area'] > 0
      assert ann['bbox'] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                             ys.max() - ys.min() + 1]
      assert ann['iscrowd'] == 0
      # One shape, one (shaded) colour: if an occluder's pixels were left in
      # the mask, they would sit far from the shape's own colour.
      pixels = image[mask.astype(bool)]
      distance = np.linalg.norm(pixels - np.median(pixels, axis=0), axis=1)
      assert np.mean(distance < 45) > 0.95, (image_id, ann['id'])


def test_occlusion_is_reflected_in_the_masks(synthetic):
  _, summary = synthetic
  coco = COCO(summary['train']['annotation_file'])
  assert summary['train']['occluded_instances'] > 0
  touching_pairs = 0
  for image_id in coco.getImgIds():
    masks = [coco.annToMask(a).astype(bool)
             for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))]
    for m1, m2 in itertools.combinations(masks, 2):
      # Visible masks never overlap: each pixel shows one shape.
      assert not (m1 & m2).any(), image_id
      grown = cv2.dilate(m1.astype(np.uint8), np.ones((3, 3), np.uint8))
      touching_pairs += int((grown.astype(bool) & m2).any())
  # Overlapping shapes leave touching visible masks (an occluder borders the
  # part of the shape it hides).
  assert touching_pairs >= summary['train']['occluded_instances']

  # Occluded instances are RLE (visible part only); whole ones are polygons
  # that rasterise to the full shape.
  rle = [a for a in coco.dataset['annotations']
         if isinstance(a['segmentation'], dict)]
  rings = [a for a in rle if a['category_id'] == 6]
  assert len(rle) - len(rings) <= summary['train']['occluded_instances']
  for ann in rle:
    decoded = mask_util.decode(ann['segmentation'])
    assert decoded.sum() == ann['area']


def test_converts_to_tfrecords(synthetic, tmp_path):
  from official_shapemask.data_prep import coco_tfrecord
  root, summary = synthetic
  result = coco_tfrecord.convert_coco_to_tfrecords(
      str(root / 'val'), summary['val']['annotation_file'],
      str(tmp_path / 'val'), num_shards=2, show_progress=False)
  assert result['images'] == 8
  assert result['instances'] == summary['val']['instances']
  assert sum(result['dropped'].values()) == 0


def test_cli(tmp_path):
  result = subprocess.run(
      [sys.executable, 'tools/make_synthetic_coco.py',
       f'--output_dir={tmp_path}', '--num_train=3', '--num_val=2',
       '--image_size=64', '--seed=1'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
  assert result.returncode == 0, result.stderr
  assert 'train: 3 images' in result.stdout
  assert sorted(os.listdir(tmp_path / 'annotations')) == [
      'instances_train.json', 'instances_val.json']
  assert len(os.listdir(tmp_path / 'val')) == 2
