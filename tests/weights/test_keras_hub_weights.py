"""keras-hub ResNet presets as backbone weights (issue 11, section 4).

Offline: randomly initialised keras-hub `ResNetBackbone`s with batch-norm
statistics calibrated on real COCO images and then randomised, saved as
local presets, restored into our ResNet and compared on the same images.
"""
import sys
import types

import keras
import numpy as np
import pytest
from PIL import Image

import keras_hub
from official_shapemask.modeling.backbones.resnet import ResNet
from official_shapemask.weights import keras_hub_weights

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
# float32: the two networks sum in different orders (ours folds each norm
# into its convolution); measured up to 1.3e-5 of a level's largest value.
RTOL_OF_MAX = 5e-5


def _images(root, size, count, start=0):
  files = sorted((root / "val2017").glob("*.jpg"))[start:start + count]
  out = []
  for f in files:
    img = Image.open(f).convert("RGB").resize((size, size))
    out.append((np.asarray(img, np.float32) / 255.0 - MEAN) / STD)
  return np.stack(out).astype(np.float32)


def _random_hub_backbone(block_type, blocks, calib, seed):
  """keras-hub ResNet with calibrated, then randomised, batch norms.

  Calibration (one training-mode pass with momentum 0) keeps activations in
  range through the random network; 15% of the channels then get a tiny
  moving variance (3e-5 or less, gamma scaled alike) so that the
  batch-norm epsilon (keras-hub 1e-5, ours 1e-4) changes the output.
  """
  rng = np.random.default_rng(seed)
  hub = keras_hub.models.ResNetBackbone(
      input_conv_filters=[64], input_conv_kernel_sizes=[7],
      stackwise_num_filters=[64, 128, 256, 512],
      stackwise_num_blocks=blocks, stackwise_num_strides=[1, 2, 2, 2],
      block_type=block_type)
  norms = [l for l in hub.layers
           if isinstance(l, keras.layers.BatchNormalization)]
  for norm in norms:
    norm.momentum = 0.0
  hub(calib, training=True)
  for norm in norms:
    n = norm.gamma.shape[0]
    small = rng.uniform(size=n) < 0.15
    var = np.asarray(norm.moving_variance) * rng.uniform(0.7, 1.4, n)
    var = np.where(small, 3e-5 * rng.uniform(0.2, 1.0, n), var)
    norm.gamma.assign(rng.uniform(0.5, 1.5, n)
                      * np.where(small, np.sqrt(3e-5), 1.0))
    norm.beta.assign(rng.normal(0.0, 0.2, n))
    norm.moving_mean.assign(np.asarray(norm.moving_mean)
                            + rng.normal(0.0, 0.1, n) * np.sqrt(var))
    norm.moving_variance.assign(var)
    norm.momentum = 0.9
  return hub


def _hub_features(hub, images):
  model = keras.Model(hub.input, hub.pyramid_outputs)
  return {k[1:]: np.asarray(v) for k, v in model(images).items()}


def _ours(depth, images, **kwargs):
  backbone = ResNet(depth=depth, **kwargs)
  backbone(images[:1])
  return backbone


def _max_rel_error(ours, hub_feats, images):
  feats = ours(images, training=False)
  return {level: float(np.abs(np.asarray(feats[level]) - ref).max()
                       / np.abs(ref).max())
          for level, ref in hub_feats.items()}


@pytest.fixture(scope="module")
def r50(coco_tiny_root, tmp_path_factory):
  """(preset folder, images [2, 64, 64, 3], keras-hub C2..C5, the backbone)."""
  hub = _random_hub_backbone("bottleneck_block", [3, 4, 6, 3],
                             _images(coco_tiny_root, 64, 4), seed=0)
  folder = tmp_path_factory.mktemp("hub") / "r50_preset"
  hub.save_to_preset(str(folder))
  # The ImageNet converter of keras-hub's timm-converted presets.
  keras_hub.layers.ResNetImageConverter(
      scale=(1.0 / (255.0 * STD)).tolist(),
      offset=(-MEAN / STD).tolist()).save_to_preset(str(folder))
  images = _images(coco_tiny_root, 64, 2, start=4)
  return types.SimpleNamespace(folder=folder, images=images, hub=hub,
                               feats=_hub_features(hub, images))


def test_r50_preset_gives_keras_hub_features(r50):
  ours = _ours(50, r50.images, stem_pool_padding="symmetric")
  lines = []
  holder = types.SimpleNamespace(backbone=ours)  # a model with .backbone
  report = keras_hub_weights.restore_keras_hub_backbone(
      holder, str(r50.folder), print_fn=lines.append)
  assert len(report.restored) == len(ours.weights) == 265
  assert not report.skipped
  text = "\n".join(lines)
  assert "ResNet-50" in text and "265 restored, 0 skipped" in text
  assert "gamma multiplied" in text
  assert "as our parser's" in text  # the converter matches our normalisation
  assert "stem max-pool" not in text  # no padding note: model matches
  errors = _max_rel_error(ours, r50.feats, r50.images)
  assert max(errors.values()) < RTOL_OF_MAX, errors
  # Moving statistics and kernels are copied as they are.
  hub_stem = r50.hub.get_layer("conv1_bn")
  np.testing.assert_array_equal(np.asarray(ours.stem.bn.moving_variance),
                                np.asarray(hub_stem.moving_variance))
  np.testing.assert_array_equal(
      np.asarray(ours.groups[2][5].convs[1].conv.kernel),
      np.asarray(r50.hub.get_layer("stack2_block5_2_conv").kernel))
  # Without the epsilon correction of gamma the features would differ.
  ours.groups[3][2].convs[2].bn.gamma.assign(
      np.asarray(r50.hub.get_layer("stack3_block2_3_bn").gamma))
  assert _max_rel_error(ours, r50.feats, r50.images)["5"] > 10 * RTOL_OF_MAX


def test_reference_stem_pool_and_equal_epsilon(r50):
  """SAME pooling: exact on an odd stem output, shifted on an even one.

  With the preset's epsilon (1e-5) gamma is copied unchanged.
  """
  ours = _ours(50, r50.images, norm_epsilon=1e-5)  # SAME: the reference
  lines = []
  keras_hub_weights.restore_keras_hub_backbone(
      ours, "keras_hub:" + str(r50.folder), print_fn=lines.append)
  text = "\n".join(lines)
  assert "gamma multiplied" not in text
  assert "backbone_stem_pool_padding='symmetric'" in text
  np.testing.assert_array_equal(
      np.asarray(ours.stem.bn.gamma),
      np.asarray(r50.hub.get_layer("conv1_bn").gamma))
  # 64 px: the 32-pixel stem output is even; the windows are shifted.
  errors = _max_rel_error(ours, r50.feats, r50.images)
  assert min(errors.values()) > 0.01, errors
  # 66 px: a 33-pixel stem output, where SAME pads one pixel on each side.
  images = np.pad(r50.images, [[0, 0], [1, 1], [1, 1], [0, 0]],
                  mode="reflect")
  errors = _max_rel_error(ours, _hub_features(r50.hub, images), images)
  assert max(errors.values()) < RTOL_OF_MAX, errors


def test_depth_mismatch_names_both_depths(r50):
  ours = _ours(18, r50.images, width_multiplier=0.25)
  before = [np.asarray(v).copy() for v in ours.weights]
  with pytest.raises(ValueError, match=r"ResNet-50.*ResNet-18"):
    keras_hub_weights.restore_keras_hub_backbone(ours, str(r50.folder),
                                                 print_fn=None)
  for old, new in zip(before, ours.weights):  # nothing was assigned
    np.testing.assert_array_equal(old, np.asarray(new))


def test_check_before_building_a_model(r50, tmp_path, monkeypatch):
  assert keras_hub_weights.check_keras_hub_preset(str(r50.folder), 50) == 50
  assert keras_hub_weights.check_keras_hub_preset(
      "keras_hub:" + str(r50.folder)) == 50
  # A bare name goes to keras-hub (config only), which also finds folders.
  monkeypatch.chdir(r50.folder.parent)
  assert keras_hub_weights.check_keras_hub_preset(
      "keras_hub:" + r50.folder.name, 50) == 50
  with pytest.raises(RuntimeError, match="local preset folder"):
    keras_hub_weights.check_keras_hub_preset("keras_hub:no_such_preset_x")
  with pytest.raises(ValueError, match=r"ResNet-50.*ResNet-101"):
    keras_hub_weights.check_keras_hub_preset(r50.folder, 101)
  with pytest.raises(FileNotFoundError, match="no_such_preset"):
    keras_hub_weights.check_keras_hub_preset(tmp_path / "no_such_preset", 50)


def test_width_mismatch_names_both_widths(r50):
  ours = _ours(50, r50.images, width_multiplier=0.5)
  with pytest.raises(ValueError, match=r"stage widths.*width_multiplier 0.5"):
    keras_hub_weights.restore_keras_hub_backbone(ours, str(r50.folder),
                                                 print_fn=None)


def test_basic_block_preset_with_identity_stage1_shortcut(coco_tiny_root,
                                                          tmp_path):
  """ResNet-18: keras-hub's stage 1 has no projection; ours becomes one."""
  hub = _random_hub_backbone("basic_block", [2, 2, 2, 2],
                             _images(coco_tiny_root, 64, 4), seed=1)
  folder = tmp_path / "r18_preset"
  hub.save_to_preset(str(folder))
  # A converter that only rescales to [0, 1]: not our normalisation.
  keras_hub.layers.ResNetImageConverter(scale=1.0 / 255.0).save_to_preset(
      str(folder))
  images = _images(coco_tiny_root, 64, 2, start=4)
  ours = _ours(18, images, stem_pool_padding="symmetric")
  lines = []
  report = keras_hub_weights.restore_keras_hub_backbone(
      ours, str(folder), print_fn=lines.append)
  assert len(report.skipped) == 5  # kernel + 4 batch-norm variables
  assert all("block_group1_block1/shortcut" in p for p, _ in report.skipped)
  assert len(report.restored) + 5 == len(ours.weights)
  assert "WARNING input normalisation differs" in "\n".join(lines)
  errors = _max_rel_error(ours, _hub_features(hub, images), images)
  assert max(errors.values()) < RTOL_OF_MAX, errors


def test_errors_name_the_setting_or_folder(r50, tmp_path):
  ours = _ours(10, r50.images, width_multiplier=0.25)
  for modules in ("backbone_fpn", "all"):
    with pytest.raises(ValueError, match=f"{modules}.*only an ImageNet"):
      keras_hub_weights.restore_keras_hub_backbone(ours, str(r50.folder),
                                                   modules=modules)
  missing = str(tmp_path / "no_such_preset")
  with pytest.raises(FileNotFoundError, match="no_such_preset"):
    keras_hub_weights.restore_keras_hub_backbone(ours, missing)
  with pytest.raises(FileNotFoundError, match="no_such_preset"):
    keras_hub_weights.restore_keras_hub_backbone(ours, "keras_hub:" + missing)
  with pytest.raises(ValueError, match="not a keras-hub preset folder"):
    keras_hub_weights.restore_keras_hub_backbone(ours, str(tmp_path))


def test_missing_keras_hub_package_is_named(r50, monkeypatch):
  monkeypatch.setitem(sys.modules, "keras_hub", None)  # import fails
  ours = _ours(50, r50.images)
  with pytest.raises(ImportError, match="pip install keras-hub"):
    keras_hub_weights.restore_keras_hub_backbone(ours, str(r50.folder))


def test_is_keras_hub_preset(r50, tmp_path):
  assert keras_hub_weights.is_keras_hub_preset("keras_hub:resnet_50_imagenet")
  assert keras_hub_weights.is_keras_hub_preset(r50.folder)
  assert not keras_hub_weights.is_keras_hub_preset(str(tmp_path))
  assert not keras_hub_weights.is_keras_hub_preset(tmp_path / "missing")
  (tmp_path / "config.json").write_text('{"registered_name": "Functional"}')
  assert not keras_hub_weights.is_keras_hub_preset(str(tmp_path))
  assert not keras_hub_weights.is_keras_hub_preset("model.weights.h5")


@pytest.mark.parametrize("config,match", [
    (dict(use_pre_activation=True, block_type="bottleneck_block"), "ResNetV2"),
    (dict(block_type="bottleneck_block_vd"), "bottleneck_block_vd"),
    (dict(block_type="bottleneck_block", input_conv_kernel_sizes=[3, 3, 3]),
     "stem"),
    (dict(block_type="bottleneck_block", input_conv_kernel_sizes=[7],
          stackwise_num_strides=[1, 2, 2, 2],
          stackwise_num_blocks=[2, 2, 2, 2]), r"blocks \[2, 2, 2, 2\]"),
])
def test_variants_our_resnet_cannot_hold(config, match):
  with pytest.raises(ValueError, match=match):
    keras_hub_weights.preset_depth(config, "some_preset")


def test_preset_depths():
  base = dict(block_type="bottleneck_block", input_conv_kernel_sizes=[7],
              stackwise_num_strides=[1, 2, 2, 2])
  assert keras_hub_weights.preset_depth(
      dict(base, stackwise_num_blocks=[3, 4, 23, 3]), "p") == 101
  assert keras_hub_weights.preset_depth(
      dict(base, block_type="basic_block", stackwise_num_blocks=[3, 4, 6, 3]),
      "p") == 34


def test_init_checkpoint_dispatch_takes_presets(r50, tmp_path):
  """RESNET_CHECKPOINT=<preset> goes through the one init-checkpoint path."""
  import gin  # pylint: disable=g-import-not-at-top
  from official_shapemask.modeling import factory  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import gin_utils  # pylint: disable=g-import-not-at-top
  from official_shapemask.training import validation  # pylint: disable=g-import-not-at-top
  from official_shapemask.weights import init_checkpoint  # pylint: disable=g-import-not-at-top
  folder = str(r50.folder)
  assert init_checkpoint.checkpoint_kind(folder) == init_checkpoint.KERAS_HUB
  assert init_checkpoint.checkpoint_kind(
      "keras_hub:" + folder) == init_checkpoint.KERAS_HUB
  assert init_checkpoint.validate(folder, depth=50) == "keras_hub"
  with pytest.raises(ValueError, match="holds a ResNet only"):
    init_checkpoint.validate(folder, modules="backbone_fpn", depth=50)
  with gin.unlock_config():
    gin.clear_config()
  try:
    gin_utils.parse_config(["tiny_cpu.gin"], ["TRAIN_FILE_PATTERN='unused'",
                                              "RESNET_DEPTH=101"])
    # Checked before any model exists: a ResNet-50 preset, a 101 model.
    with pytest.raises(validation.InvalidInputError,
                       match=r"ResNet-50.*ResNet-101"):
      validation.validate_init_checkpoint(folder)
  finally:
    with gin.unlock_config():
      gin.clear_config()
  model = factory.build_shapemask_model(
      num_classes=3, image_size=64, backbone_depth=50, min_level=3,
      max_level=5, fpn_num_filters=16, head_num_convs=1, head_num_filters=16,
      num_downsample_channels=8, mask_num_convs=1, mask_num_filters=8,
      num_clusters=2, backbone_stem_pool_padding="symmetric")
  lines = []
  report = init_checkpoint.restore(model, folder, "backbone",
                                   print_fn=lines.append)
  assert len(report.restored) == len(model.backbone.weights)
  assert "Restored" in "\n".join(lines)
  feats = model.backbone(r50.images, training=False)
  for level, ref in r50.feats.items():
    err = np.abs(np.asarray(feats[level]) - ref).max() / np.abs(ref).max()
    assert err < RTOL_OF_MAX, (level, err)
