"""Parameter counts of ResNet + FPN + RetinaNet head equal those of
tf-models-official's legacy detection components (R50 and R101, 91 classes,
9 anchors, levels 3-7, 256 filters).

The legacy components are Keras 2 (tf_keras); they are built in a subprocess
so that Keras 2 and Keras 3 never share a process.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from official_shapemask.modeling.backbones.resnet import ResNet
from official_shapemask.modeling.decoders.fpn import FPN
from official_shapemask.modeling.heads.retinanet_head import RetinaNetHead

DEPTHS = (50, 101)

_LEGACY_SCRIPT = textwrap.dedent("""
    import json
    import tensorflow as tf
    import tf_keras
    from official.legacy.detection.modeling.architecture import fpn, heads
    from official.legacy.detection.modeling.architecture import resnet

    def count(model):
      return [sum(int(tf.size(w)) for w in model.trainable_weights),
              sum(int(tf.size(w)) for w in model.non_trainable_weights)]

    out = {}
    for depth in %(depths)r:
      tf_keras.backend.clear_session()
      images = tf_keras.Input(shape=(64, 64, 3), batch_size=1)
      feats = resnet.Resnet(depth)(images, is_training=False)
      backbone = tf_keras.Model(images, feats)
      pyramid = fpn.Fpn(min_level=3, max_level=7, fpn_feat_dims=256)(
          feats, is_training=False)
      with_fpn = tf_keras.Model(images, pyramid)
      cls, box = heads.RetinanetHead(3, 7, 91, 9, 4, 256)(
          pyramid, is_training=False)
      full = tf_keras.Model(images, [cls, box])
      out[str(depth)] = {"backbone": count(backbone),
                         "backbone_fpn": count(with_fpn),
                         "full": count(full)}
    print("COUNTS" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def legacy_counts():
  pytest.importorskip("official.legacy.detection.modeling.architecture.fpn")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run(
      [sys.executable, "-c", _LEGACY_SCRIPT % {"depths": DEPTHS}],
      capture_output=True, text=True, env=env, timeout=600, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("COUNTS")]
  assert proc.returncode == 0 and lines, (
      f"building the legacy tf-models-official components failed:\n"
      f"{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("COUNTS"):])


def _count(layers):
  return [
      sum(int(np.prod(v.shape)) for l in layers for v in l.trainable_weights),
      sum(int(np.prod(v.shape)) for l in layers
          for v in l.non_trainable_weights)
  ]


def _ours(depth, freeze_early_convs):
  backbone = ResNet(depth=depth, freeze_early_convs=freeze_early_convs)
  fpn = FPN(min_level=3, max_level=7, num_filters=256)
  head = RetinaNetHead(min_level=3, max_level=7, num_classes=91,
                       num_anchors_per_location=9, num_convs=4,
                       num_filters=256)
  image_shape = (1, 64, 64, 3)
  backbone.build(image_shape)
  feats = backbone.compute_output_shape(image_shape)
  fpn.build(feats)
  head.build(fpn.compute_output_shape(feats))
  return {"backbone": _count([backbone]),
          "backbone_fpn": _count([backbone, fpn]),
          "full": _count([backbone, fpn, head])}, backbone


@pytest.mark.parametrize("depth", DEPTHS)
def test_parameter_counts_equal_legacy_detection(depth, legacy_counts):
  ours, _ = _ours(depth, freeze_early_convs=False)
  assert ours == legacy_counts[str(depth)]


@pytest.mark.parametrize("depth", DEPTHS)
def test_freezing_moves_only_the_eleven_early_kernels(depth, legacy_counts):
  frozen, backbone = _ours(depth, freeze_early_convs=True)
  legacy = legacy_counts[str(depth)]["full"]
  frozen_kernels = [v for v in backbone.non_trainable_weights
                    if v.path.endswith("kernel")]
  assert len(frozen_kernels) == 11
  moved = sum(int(np.prod(v.shape)) for v in frozen_kernels)
  # Stem 7x7x3x64 + conv2_x: 64->256 proj, 64->64, 3x3 64, 64->256, then
  # 2 x (256->64, 3x3 64, 64->256).
  assert moved == (7 * 7 * 3 * 64 + 64 * 256 + 64 * 64 + 9 * 64 * 64 +
                   64 * 256 + 2 * (256 * 64 + 9 * 64 * 64 + 64 * 256))
  assert sum(frozen["full"]) == sum(legacy)
  assert frozen["full"] == [legacy[0] - moved, legacy[1] + moved]
