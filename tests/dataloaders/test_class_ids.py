"""Category ids that do not fit the model's class slots stop a run at once.

The data: five coco_tiny160 train images, two without and three with a dog,
whose COCO category id 18 is renumbered 1000 in a copy of the annotations,
converted by the project's converter (2 shards and train_label_map.json).
A model with the default 91 class slots cannot learn id 1000: the label map
is checked before anything starts, and records without a label map are
checked in the parser, naming the shard.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.data_prep import coco_tfrecord
from official_shapemask.data_prep import shape_priors
from official_shapemask.dataloaders import class_ids
from official_shapemask.dataloaders import input_reader
from official_shapemask.dataloaders import shapemask_parser
from official_shapemask.modeling import factory
from official_shapemask.training import datasets
from official_shapemask.training import validation

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DOG, BIG = 18, 1000
TIMEOUT = 900


@pytest.fixture(scope="module")
def big_ids(coco_tiny_root, tmp_path_factory):
  """Converted data with category id 1000; the same shards without their
  label map in `bare`."""
  work = tmp_path_factory.mktemp("class_ids")
  with open(coco_tiny_root / "annotations" / "instances_train2017.json") as f:
    data = json.load(f)
  dogs = sorted({a["image_id"] for a in data["annotations"]
                 if a["category_id"] == DOG})
  others = [i["id"] for i in data["images"] if i["id"] not in dogs][:2]
  keep = set(dogs + others)
  data["images"] = [i for i in data["images"] if i["id"] in keep]
  data["annotations"] = [a for a in data["annotations"]
                         if a["image_id"] in keep]
  for entry in data["categories"]:
    if entry["id"] == DOG:
      entry["id"] = BIG
  for annotation in data["annotations"]:
    if annotation["category_id"] == DOG:
      annotation["category_id"] = BIG
  json_file = work / "instances_big.json"
  json_file.write_text(json.dumps(data))
  summary = coco_tfrecord.convert_coco_to_tfrecords(
      str(coco_tiny_root / "train2017"), str(json_file),
      str(work / "data" / "train"), num_shards=2, show_progress=False)
  bare = work / "bare"
  bare.mkdir()
  for shard in summary["shards"]:
    shutil.copy(shard, bare)
  # The shards that hold an image with id 1000.
  with_big = set()
  for shard in summary["shards"]:
    for raw in tf.data.TFRecordDataset(shard):
      example = tf.train.Example.FromString(raw.numpy())
      labels = example.features.feature["image/object/class/label"]
      if BIG in labels.int64_list.value:
        with_big.add(os.path.basename(shard))
  assert with_big
  return {"json": json_file, "dogs": dogs,
          "pattern": str(work / "data" / "train-*"),
          "label_map": summary["label_map"],
          "bare": str(bare / "train-*"),
          "bare_with_big": {str(bare / name) for name in with_big}}


def test_label_map_check_names_the_largest_id_and_the_file(big_ids,
                                                           tiny_train_records):
  files = input_reader.list_files(big_ids["pattern"])
  with pytest.raises(ValueError) as err:
    class_ids.check_label_maps(files, 91)
  assert str(err.value).startswith(
      f"category id 1000 ('dog') in {big_ids['label_map']} does not fit "
      "num_classes=91 (class slots 0..90, 0 = background): set NUM_CLASSES")
  assert class_ids.check_label_maps(files, 1001) == [big_ids["label_map"]]
  # A pattern that matches the label map itself (data/train*).
  with pytest.raises(ValueError, match="category id 1000"):
    class_ids.check_label_maps([], 91, [big_ids["label_map"]])
  # Shards without a label map: nothing to check before the start.
  assert class_ids.check_label_maps(
      input_reader.list_files(big_ids["bare"]), 91) == []
  # Real COCO ids (1..90) fit the default 91 slots, not 90.
  coco_files = input_reader.list_files(tiny_train_records)
  assert len(class_ids.check_label_maps(coco_files, 91)) == 1
  with pytest.raises(ValueError, match=r"category id 90 \('toothbrush'"):
    class_ids.check_label_maps(coco_files, 90)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_parser_names_id_image_and_shard(big_ids, mode):
  """Without a label map, the first record with id 1000 stops the input."""
  def first_batches(num_classes):
    parser = shapemask_parser.Parser(128, max_level=5, mode=mode,
                                     num_classes=num_classes)
    dataset = input_reader.build_dataset(
        big_ids["bare"], parser, 2, is_training=mode == "train")
    return [batch for batch, _ in zip(dataset, range(3))]

  with pytest.raises(tf.errors.InvalidArgumentError) as err:
    first_batches(91)
  text = class_ids.describe_error(err.value)
  match = re.fullmatch(
      r"category id 1000 \(image (\d+)\) in (\S+) is outside 0\.\.90, the "
      r"class slots of num_classes=91: set NUM_CLASSES \(build_shapemask_"
      r"model\.num_classes\) above the largest id, .*", text)
  assert match, text
  assert int(match.group(1)) in big_ids["dogs"]
  assert match.group(2) in big_ids["bare_with_big"]
  # What train.py and the JAX engine make of it: one line naming the setting.
  setting = f"{mode}_file_pattern"
  error = datasets.data_error(err.value, big_ids["bare"], setting)
  assert str(error) == f"{setting}: {text}"
  # With 1001 class slots the same records parse.
  assert len(first_batches(1001)) == 3


def test_eval_label_map_checked_before_the_start(big_ids, tiny_train_records):
  from official_shapemask.training import gin_utils  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  gin_utils.parse_config(["tiny_cpu.gin"], [
      f"TRAIN_FILE_PATTERN='{tiny_train_records}'"])
  try:
    with pytest.raises(validation.InvalidInputError) as err:
      validation.validate_inputs("train_and_eval", tiny_train_records,
                                 big_ids["pattern"], None,
                                 print_fn=lambda *a: None)
  finally:
    with gin.unlock_config():
      gin.clear_config()
  assert str(err.value).startswith(
      f"eval_file_pattern: category id 1000 ('dog') in "
      f"{big_ids['label_map']} does not fit num_classes=91")


def test_priors_of_such_data_have_another_row_count(big_ids, tmp_path):
  """The prior generator writes a row per id up to 1000; the model's prior
  check names both counts (train.py's `priors with another class count`)."""
  priors, summary = shape_priors.compute_shape_priors(
      str(big_ids["json"]), num_clusters=2, prior_size=16)
  assert priors.shape[0] == 1001 == summary["num_classes"]
  path = tmp_path / "priors.npy"
  np.save(path, priors)
  with pytest.raises(ValueError, match=r"1001.*91|91.*1001"):
    factory.load_priors(str(path), 91, True, 16)


def _train_py(model_dir, pattern, *bindings, backend="tensorflow"):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
             KERAS_BACKEND=backend)
  if backend == "jax":
    env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
      [sys.executable, str(REPO_ROOT / "train.py"), "--gin_file=tiny_cpu.gin",
       f"--gin_bindings=TRAIN_FILE_PATTERN='{pattern}'",
       *[f"--gin_bindings={b}" for b in bindings], f"--model_dir={model_dir}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=TIMEOUT, check=False)


def _error_lines(stderr):
  return [line for line in stderr.splitlines()
          if line.startswith("train.py: error: ")]


def test_train_py_refuses_before_it_starts(big_ids, tmp_path):
  model_dir = tmp_path / "run"
  proc = _train_py(model_dir, big_ids["pattern"])
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert _error_lines(proc.stderr) == [
      f"train.py: error: train_file_pattern: category id 1000 ('dog') in "
      f"{big_ids['label_map']} does not fit num_classes=91 (class slots "
      f"0..90, 0 = background): {class_ids.too_large(91)}"]
  assert "Traceback" not in proc.stderr
  assert not model_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_train_py_names_the_shard_without_label_map(big_ids, tmp_path,
                                                    backend):
  if backend == "jax":
    pytest.importorskip("jax")
  model_dir = tmp_path / "run"
  proc = _train_py(model_dir, big_ids["bare"], "TOTAL_STEPS=2",
                   "STEPS_PER_LOOP=1", "CHECKPOINT_EVERY=1", backend=backend)
  assert proc.returncode == 1, proc.stderr[-3000:]
  (line,) = _error_lines(proc.stderr)
  match = re.fullmatch(
      r"train\.py: error: train_file_pattern: category id 1000 \(image "
      r"(\d+)\) in (\S+) is outside 0\.\.90, the class slots of "
      r"num_classes=91: " + re.escape(class_ids.too_large(91)), line)
  assert match, line
  assert int(match.group(1)) in big_ids["dogs"]
  assert match.group(2) in big_ids["bare_with_big"]
  assert "Traceback" not in proc.stderr
  # Three of the five images hold id 1000: the first step fails, no
  # checkpoint is written (TensorFlow: ckpt-N; JAX: checkpoints/<step>).
  saved = [p.name for p in model_dir.glob("ckpt-*")] + [
      p.name for p in model_dir.glob("checkpoints/*")]
  assert not saved, saved
