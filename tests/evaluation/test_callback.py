"""COCOEvalCallback inside `model.fit` (tiny model, coco_tiny160 records)."""
import glob

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.dataloaders import input_reader
from official_shapemask.dataloaders import shapemask_parser
from official_shapemask.evaluation import COCOEvalCallback
from official_shapemask.evaluation import METRIC_NAMES
from official_shapemask.modeling import factory

SIZE = 128


@pytest.fixture(scope="module")
def tiny_setup(tiny_train_records, tiny_val_records):
  model = factory.build_shapemask_model(
      image_size=SIZE, backbone_depth=10, backbone_width_multiplier=0.25,
      fpn_num_filters=16, head_num_convs=1, head_num_filters=16,
      num_clusters=2, num_downsample_channels=8, mask_num_convs=1,
      mask_num_filters=8, score_threshold=1e-3)
  model.compile(optimizer=keras.optimizers.SGD(1e-3))
  train_ds = input_reader.build_dataset(
      tiny_train_records, shapemask_parser.Parser(output_size=SIZE, seed=1),
      batch_size=2, is_training=True, deterministic=True)
  eval_ds = input_reader.build_dataset(
      tiny_val_records,
      shapemask_parser.Parser(output_size=SIZE, mode="eval"),
      batch_size=2, is_training=False)
  return model, train_ds, eval_ds


def _event_tags(log_dir):
  tags = set()
  for path in glob.glob(f"{log_dir}/events.out.tfevents.*"):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_fit_writes_mask_ap_to_history_checkpoint_and_tensorboard(
    tiny_setup, tmp_path, capsys):
  model, train_ds, eval_ds = tiny_setup
  callback = COCOEvalCallback(eval_ds, max_batches=3,
                              log_dir=str(tmp_path / "eval"))
  best = tmp_path / "best.weights.h5"
  checkpoint = keras.callbacks.ModelCheckpoint(
      str(best), monitor="mask_AP", mode="max", save_best_only=True,
      save_weights_only=True)
  history = model.fit(train_ds, epochs=1, steps_per_epoch=2,
                      callbacks=[callback, checkpoint], verbose=0)
  for name in METRIC_NAMES:
    assert len(history.history[name]) == 1
    assert len(history.history["mask_" + name]) == 1
  assert 0.0 <= history.history["mask_AP"][0] <= 1.0
  assert best.exists()  # ModelCheckpoint found its monitor.
  ((epoch, metrics),) = callback.results
  assert epoch == 0 and metrics["mask_AP"] == history.history["mask_AP"][0]
  assert {"AP", "mask_AP", "mask_ARmax100"} <= _event_tags(tmp_path / "eval")
  out = capsys.readouterr().out
  assert "COCO evaluation after epoch 1 (step 2, 6 images)" in out
  assert ["metric", "box", "mask"] in [line.split() for line in out.splitlines()]


def test_background_evaluation_is_collected(tiny_setup):
  model, train_ds, eval_ds = tiny_setup
  sync = COCOEvalCallback(eval_ds, max_batches=2, verbose=0,
                          mask_eval_class="voc")
  background = COCOEvalCallback(eval_ds, max_batches=2, verbose=0,
                                mask_eval_class="voc",
                                run_in_background="thread")
  model.fit(train_ds, epochs=2, steps_per_epoch=1,
            callbacks=[background, sync], verbose=0)
  assert [e for e, _ in background.results] == [0, 1]
  for (_, got), (_, want) in zip(background.results, sync.results):
    got, want = dict(got), dict(want)
    got.pop("eval_seconds")
    want.pop("eval_seconds")
    assert got == want
    assert np.isfinite(got["novel_mask_AP"])


def test_bad_arguments():
  with pytest.raises(ValueError, match="every_n_epochs"):
    COCOEvalCallback(None, every_n_epochs=0)
  with pytest.raises(ValueError, match="max_batches"):
    COCOEvalCallback(None, max_batches=0)
