"""ImageNet ResNet weights from keras-hub presets for our ResNet backbone.

A keras-hub `ResNetBackbone` preset (`keras_hub:resnet_50_imagenet`,
`keras_hub:resnet_101_imagenet`, any other handle keras-hub accepts after
the `keras_hub:` prefix, or a local folder written by `save_to_preset`)
initialises `model.backbone`. keras-hub's v1 ResNet is the same network as
ours (post-activation, stride on the 3x3 of bottleneck blocks, projection
on the first block of each stage, no conv biases), so every kernel and
batch-norm variable has one counterpart:

    keras-hub                  ours (`ResNet`)
    conv1_conv / conv1_bn      stem/conv, stem/bn
    stack{g}_block{b}_0_*      block_group{g+1}_block{b+1}/shortcut
    stack{g}_block{b}_{i}_*    block_group{g+1}_block{b+1}/conv{i}

What differs, and how it is handled:

* Batch-norm epsilon: keras-hub 1e-5, ours 1e-4 (the reference's). Each
  gamma is multiplied by ``sqrt((var + eps_ours) / (var + eps_hub))`` (var =
  the restored moving variance), so inference-mode outputs are equal; in
  training mode (batch statistics) the factor approximately cancels the
  epsilon difference too. With equal epsilons gamma is copied as is.
* Padding: keras-hub pads the 7x7 / 2 stem by 3 and the strided 3x3 by 1
  on each side, as our fixed padding does; its strided 1x1 projections
  are unpadded like ours. Only the stem max-pool differs: keras-hub pads
  one pixel on each side, the reference (our default) uses SAME padding,
  which on an even-sized stem output (any input whose side is a multiple
  of 4) moves each pooling window one stem pixel later. Build the model
  with `ResNet(stem_pool_padding="symmetric")`
  (`build_shapemask_model.backbone_stem_pool_padding`) to match exactly;
  otherwise the restore prints a note.
* Input normalisation: keras-hub's ImageNet ResNets were converted from
  timm, and their image converter maps 0-255 RGB by ``x * scale + offset``
  with ``scale = 1 / (255 std)`` and ``offset = -mean / std`` (ImageNet
  mean/std): exactly what our parser feeds the model. When the preset
  holds an image converter, it is compared with our normalisation and a
  mismatch is printed as a warning.
* keras-hub's basic-block (ResNet-18/34) stage 1 has identity shortcuts;
  our first block has a projection there. That projection is set to an
  identity map (identity kernel, batch norm that passes its input through
  in inference) and listed as skipped.

The keras-hub batch norms also use momentum 0.9 (ours 0.997); that only
affects training and is not mapped.
"""

import json
import os

import numpy as np
import tensorflow as tf
from official.vision.ops import preprocess_ops

from official_shapemask.modeling.backbones import resnet
from official_shapemask.weights import restore_report

KERAS_HUB_PREFIX = "keras_hub:"
_CONFIG_FILE = "config.json"
_HUB_BLOCK_TYPES = {"basic_block": "basic", "bottleneck_block": "bottleneck"}


def _is_local_path(spec):
  return "://" not in spec and (
      os.path.isabs(spec) or spec.startswith(".") or os.sep in spec)


def _preset_spec(path):
  """The handle to give keras-hub: the text after `keras_hub:`, or `path`."""
  path = str(path)
  if path.startswith(KERAS_HUB_PREFIX):
    return path[len(KERAS_HUB_PREFIX):]
  return path


def _read_local_config(folder):
  """The `config.json` of a local preset folder as a dict (or None)."""
  config_path = os.path.join(folder, _CONFIG_FILE)
  if not tf.io.gfile.exists(config_path):
    return None
  try:
    with tf.io.gfile.GFile(config_path, "r") as f:
      config = json.load(f)
  except (OSError, ValueError):
    return None
  return config if isinstance(config, dict) else None


def _is_keras_hub_config(config):
  return config is not None and str(
      config.get("registered_name", "")).startswith("keras_hub>")


def is_keras_hub_preset(path):
  """Whether `path` names a keras-hub preset.

  Args:
    path: a `keras_hub:NAME` string (NAME is anything keras-hub's
      `from_preset` accepts: a preset name such as `resnet_101_imagenet`, a
      `kaggle://` or `hf://` handle, or a folder), or a local folder as
      keras-hub's `save_to_preset` writes it (a `config.json` naming a
      keras-hub class).

  Returns:
    bool. Does not check that a `keras_hub:` preset exists.
  """
  path = str(path)
  if path.startswith(KERAS_HUB_PREFIX):
    return True
  if not tf.io.gfile.isdir(path):
    return False
  return _is_keras_hub_config(_read_local_config(path))


def _import_keras_hub(preset):
  try:
    import keras_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"the keras-hub package is needed to read the preset {preset!r}: "
        "pip install keras-hub") from e
  return keras_hub


def _check_local_folder(preset, spec):
  """Errors for a local preset folder that is missing or not a preset."""
  if not tf.io.gfile.isdir(spec):
    raise FileNotFoundError(f"keras-hub preset folder not found: {spec}"
                            + (f" (from {preset!r})" if spec != preset else ""))
  config = _read_local_config(spec)
  if not _is_keras_hub_config(config):
    raise ValueError(
        f"{spec} is not a keras-hub preset folder: it needs a {_CONFIG_FILE} "
        "written by keras-hub's save_to_preset")
  return config


def preset_depth(config, preset):
  """Our ResNet depth for a keras-hub `ResNetBackbone` config.

  Args:
    config: dict, the backbone's `get_config()` (or the `config` entry of a
      preset's `config.json`).
    preset: str, named in errors.

  Returns:
    int, a key of `resnet.RESNET_SPECS`.

  Raises:
    ValueError: naming the preset, for a variant our ResNet cannot hold
      (pre-activation v2, ResNet-vd, another stem, strides or block counts).
  """
  def fail(what):
    raise ValueError(f"keras-hub preset {preset!r}: {what}; our ResNet is a "
                     "v1.5 ResNet (7x7 stem, post-activation blocks)")

  if config.get("use_pre_activation"):
    fail("it is a pre-activation ResNetV2")
  block_type = config.get("block_type")
  if block_type not in _HUB_BLOCK_TYPES:
    fail(f"block_type {block_type!r} is not basic_block or bottleneck_block")
  if list(config.get("input_conv_kernel_sizes", [])) != [7]:
    fail(f"its stem has kernel sizes {config.get('input_conv_kernel_sizes')}")
  if list(config.get("stackwise_num_strides", [])) != [1, 2, 2, 2]:
    fail(f"its stage strides are {config.get('stackwise_num_strides')}")
  blocks = tuple(config.get("stackwise_num_blocks", ()))
  for depth, spec in resnet.RESNET_SPECS.items():
    if spec == (_HUB_BLOCK_TYPES[block_type], blocks):
      return depth
  fail(f"{block_type} with blocks {list(blocks)} is no depth of "
       f"{sorted(resnet.RESNET_SPECS)}")


def _check_widths(config, backbone, preset):
  """Stem and stage widths of the preset against the backbone's."""
  hub = [list(config.get("input_conv_filters", [])),
         list(config.get("stackwise_num_filters", []))]
  ours = [[backbone.stem.conv.filters],
          [blocks[0].convs[0].conv.filters for blocks in backbone.groups]]
  if hub != ours:
    raise ValueError(
        f"keras-hub preset {preset!r} has stem width {hub[0]} and stage "
        f"widths {hub[1]}, the model's backbone {ours[0]} and {ours[1]} "
        f"(width_multiplier {backbone.get_config()['width_multiplier']})")


def _layer_pairs(backbone, basic):
  """(our `_ConvBN`, keras-hub layer prefix or None) for every conv + BN.

  None marks our stage-1 projection of a basic-block network, which has no
  keras-hub counterpart.
  """
  yield backbone.stem, "conv1"
  for g, blocks in enumerate(backbone.groups):
    for b, block in enumerate(blocks):
      hub = f"stack{g}_block{b}"
      if block.shortcut is not None:
        yield block.shortcut, None if (basic and g == 0) else f"{hub}_0"
      for i, conv in enumerate(block.convs, start=1):
        yield conv, f"{hub}_{i}"


def _hub_layer(hub_backbone, name, preset):
  try:
    return hub_backbone.get_layer(name)
  except ValueError as e:
    raise ValueError(
        f"keras-hub preset {preset!r} has no layer {name!r}") from e


def _mapped_values(backbone, hub_backbone, preset, basic):
  """Every (variable, value, source) assignment, shape-checked, plus notes.

  Returns:
    (assignments, identity, gamma_factors): lists of `(variable, value,
    hub variable path)` and of `(variable, value)` for our identity-set
    projection, and the per-channel gamma factors applied.
  """
  assignments, identity, factors = [], [], []
  for ours, hub_name in _layer_pairs(backbone, basic):
    bn = ours.bn
    if hub_name is None:
      filters = ours.conv.kernel.shape[-1]
      eye = np.eye(ours.conv.kernel.shape[-2], filters, dtype=np.float32)
      identity += [
          (ours.conv.kernel, eye.reshape(ours.conv.kernel.shape)),
          (bn.gamma, np.ones(filters, np.float32)),
          (bn.beta, np.zeros(filters, np.float32)),
          (bn.moving_mean, np.zeros(filters, np.float32)),
          (bn.moving_variance,
           np.full(filters, 1.0 - bn.epsilon, np.float32))]
      continue
    hub_conv = _hub_layer(hub_backbone, f"{hub_name}_conv", preset)
    hub_bn = _hub_layer(hub_backbone, f"{hub_name}_bn", preset)
    values = {
        "kernel": np.asarray(hub_conv.kernel, np.float64),
        "gamma": np.asarray(hub_bn.gamma, np.float64),
        "beta": np.asarray(hub_bn.beta, np.float64),
        "moving_mean": np.asarray(hub_bn.moving_mean, np.float64),
        "moving_variance": np.asarray(hub_bn.moving_variance, np.float64),
    }
    if not np.isclose(bn.epsilon, hub_bn.epsilon, rtol=1e-12, atol=0.0):
      factor = np.sqrt((values["moving_variance"] + bn.epsilon)
                       / (values["moving_variance"] + hub_bn.epsilon))
      values["gamma"] = values["gamma"] * factor
      factors.append(factor)
    pairs = [(ours.conv.kernel, "kernel", hub_conv.kernel)]
    pairs += [(getattr(bn, k), k, getattr(hub_bn, k))
              for k in ("gamma", "beta", "moving_mean", "moving_variance")]
    for variable, key, hub_variable in pairs:
      value = values[key]
      if tuple(value.shape) != tuple(variable.shape):
        raise ValueError(
            f"keras-hub preset {preset!r}: {hub_variable.path} has shape "
            f"{tuple(value.shape)} but our {variable.path} has "
            f"{tuple(variable.shape)} (backbone width_multiplier "
            f"{backbone.get_config().get('width_multiplier')})")
      assignments.append(
          (variable, value.astype(np.float32), hub_variable.path))
  return assignments, identity, factors


def _normalisation_note(keras_hub, spec):
  """Compares the preset's image converter with our parser's normalisation."""
  try:
    converter = keras_hub.layers.ImageConverter.from_preset(spec)
  except FileNotFoundError:
    converter = None
  except Exception as e:  # pylint: disable=broad-except
    return ("input normalisation not checked: could not read the preset's "
            f"image converter ({type(e).__name__}); our parser feeds "
            "ImageNet mean/std-normalised RGB")
  if converter is None:
    return ("input normalisation: the preset holds no image converter; our "
            "parser feeds ImageNet mean/std-normalised RGB")
  mean = np.asarray(preprocess_ops.MEAN_NORM, np.float64)
  std = np.asarray(preprocess_ops.STDDEV_NORM, np.float64)
  want_scale, want_offset = 1.0 / (255.0 * std), -mean / std
  scale = np.broadcast_to(np.asarray(
      1.0 if converter.scale is None else converter.scale, np.float64), (3,))
  offset = np.broadcast_to(np.asarray(
      0.0 if converter.offset is None else converter.offset, np.float64), (3,))
  if (np.allclose(scale, want_scale, rtol=1e-3)
      and np.allclose(offset, want_offset, rtol=1e-3, atol=1e-4)):
    return ("input normalisation: the preset's image converter is ImageNet "
            "mean/std on 0-255 RGB, as our parser's")
  return ("WARNING input normalisation differs: the preset was trained on "
          f"0-255 RGB * {np.round(scale, 6).tolist()} + "
          f"{np.round(offset, 6).tolist()}, our parser feeds (x / 255 - "
          f"{mean.tolist()}) / {std.tolist()}; features will differ")


def _load_hub_backbone(keras_hub, preset, spec, load_weights=True):
  try:
    backbone = keras_hub.models.Backbone.from_preset(
        spec, load_weights=load_weights, dtype="float32")
  except Exception as e:  # pylint: disable=broad-except
    raise RuntimeError(
        f"could not load keras-hub preset {preset!r} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Named presets are "
        "downloaded from Kaggle; without network, point at a local preset "
        "folder (keras_hub.models.Backbone.from_preset(NAME)"
        ".save_to_preset(DIR) where there is network)") from e
  if not isinstance(backbone, keras_hub.models.ResNetBackbone):
    raise ValueError(
        f"keras-hub preset {preset!r} holds a {type(backbone).__name__}, "
        "not a ResNetBackbone")
  return backbone


def _is_folder_preset(preset, spec):
  return _is_local_path(spec) or not preset.startswith(KERAS_HUB_PREFIX)


def _check_depth(config, preset, depth):
  """The preset's depth; raises naming both when it is not `depth`."""
  found = preset_depth(config, preset)
  if depth is not None and found != depth:
    raise ValueError(
        f"keras-hub preset {preset!r} is a ResNet-{found}, but the model's "
        f"backbone is a ResNet-{depth}")
  return found


def check_keras_hub_preset(preset, depth=None):
  """Checks a preset before a model is built (e.g. before training starts).

  A local folder: it exists, is a keras-hub preset and holds a ResNet of
  `depth`, read from its `config.json` (keras-hub is not imported). A
  `keras_hub:NAME` preset: keras-hub is installed and can fetch the
  preset's config (downloading it if needed; the weights are fetched by
  `restore_keras_hub_backbone`), which holds a ResNet of `depth`.

  Args:
    preset: as for `restore_keras_hub_backbone`.
    depth: the model's ResNet depth, or None to skip that check.

  Returns:
    int, the preset's ResNet depth.

  Raises:
    the errors of `restore_keras_hub_backbone` for the same causes.
  """
  preset = str(preset)
  spec = _preset_spec(preset)
  if _is_folder_preset(preset, spec):
    config = _check_local_folder(preset, spec).get("config", {})
  else:
    keras_hub = _import_keras_hub(preset)
    config = _load_hub_backbone(keras_hub, preset, spec,
                                load_weights=False).get_config()
  return _check_depth(config, preset, depth)


def restore_keras_hub_backbone(model, preset, modules="backbone",
                               print_fn=print):
  """Initialises our ResNet backbone from a keras-hub ResNet preset.

  Checks everything before assigning anything, so an error leaves the
  model as it was.

  Args:
    model: a built `ShapeMaskModel` (its `backbone` is restored) or a built
      `ResNet`.
    preset: `keras_hub:NAME` (see `is_keras_hub_preset`) or a local preset
      folder.
    modules: must be `backbone`: a keras-hub ResNet preset holds no FPN or
      heads.
    print_fn: where the notes and the restored/skipped table go (None =
      silent).

  Returns:
    a `restore_report.RestoreReport`: restored rows name our variable and its
    keras-hub source; skipped rows are the identity-set stage-1 projection
    of a basic-block (ResNet-18/34) preset.

  Raises:
    ValueError: `modules` other than `backbone`; a preset that is not a v1
      ResNet our builder can hold; its depth differs from the model's (both
      named); a shape differs (another width).
    FileNotFoundError: a local preset folder that does not exist.
    ImportError: keras-hub is not installed.
    RuntimeError: keras-hub could not load the preset (e.g. no network).
  """
  preset = str(preset)
  if modules != "backbone":
    raise ValueError(
        f"init_checkpoint_modules={modules!r}: the keras-hub preset {preset} "
        "holds only an ImageNet backbone (no FPN or heads); use 'backbone'")
  backbone = getattr(model, "backbone", model)
  if not isinstance(backbone, resnet.ResNet):
    raise ValueError(f"restoring keras-hub preset {preset}: the model's "
                     f"backbone is a {type(backbone).__name__}, not our ResNet")
  if not backbone.built:
    raise ValueError(f"restoring keras-hub preset {preset}: build the model "
                     "before restoring weights")
  our_depth = backbone.get_config()["depth"]
  spec = _preset_spec(preset)
  if _is_folder_preset(preset, spec):  # fails fast, before loading
    config = _check_local_folder(preset, spec).get("config", {})
    _check_depth(config, preset, our_depth)
    _check_widths(config, backbone, preset)
  keras_hub = _import_keras_hub(preset)
  hub_backbone = _load_hub_backbone(keras_hub, preset, spec)
  hub_config = hub_backbone.get_config()
  depth = _check_depth(hub_config, preset, our_depth)
  _check_widths(hub_config, backbone, preset)
  basic = hub_config["block_type"] == "basic_block"
  assignments, identity, factors = _mapped_values(
      backbone, hub_backbone, preset, basic)
  for variable, value, _ in assignments:
    variable.assign(value)
  for variable, value in identity:
    variable.assign(value)

  report = restore_report.RestoreReport(restored=[], skipped=[])
  for variable, _, source in assignments:
    report.restored.append(
        (f"{variable.path} <- {source}", tuple(variable.shape)))
  for variable, _ in identity:
    report.skipped.append(
        (variable.path, "keras-hub stage 1 has an identity shortcut: set to "
                        "an identity map"))
  notes = [f"ResNet-{depth} ({hub_config['block_type']})"]
  if factors:
    all_factors = np.concatenate(factors)
    hub_epsilon = hub_backbone.get_layer("conv1_bn").epsilon
    notes.append(
        f"batch-norm epsilon: preset {hub_epsilon:g}, model "
        f"{backbone.stem.bn.epsilon:g}: gamma multiplied by "
        "sqrt((var + eps_model) / (var + eps_preset)) (range "
        f"{all_factors.min():.6g}..{all_factors.max():.6g}) so that "
        "inference outputs are equal")
  if backbone.get_config()["stem_pool_padding"] != "symmetric":
    notes.append(
        "note: keras-hub's stem max-pool pads one pixel on each side; this "
        "model uses SAME padding (the reference), which shifts the pooling "
        "windows by one stem pixel on even-sized inputs. Build with "
        "build_shapemask_model.backbone_stem_pool_padding='symmetric' to "
        "reproduce the preset's features exactly")
  notes.append(_normalisation_note(keras_hub, spec))
  if print_fn is not None:
    print_fn(f"Restored from keras-hub preset {preset} (modules={modules}):\n"
             + "\n".join(notes) + "\n" + report.table())
  return report
