"""Checks of a run's inputs, made once before any engine starts.

`validate` names a missing or unfitting data pattern, shape-prior file,
init checkpoint, choice setting or label map (a category id the model has
no class slot for) in one line (`InvalidInputError`), before
a strategy, a device mesh or a model exists. `model_overrides` gives the
`build_shapemask_model` arguments every engine builds with (and says what
stays frozen).
"""

import inspect

import gin
import tensorflow as tf

from official_shapemask.dataloaders import class_ids
from official_shapemask.dataloaders import input_reader
from official_shapemask.modeling import factory
from official_shapemask.modeling import shapemask_model
from official_shapemask.training import optimizers
from official_shapemask.training import settings as settings_lib
from official_shapemask.training import shape_prior_files
from official_shapemask.weights import init_checkpoint as init_ckpt

InvalidInputError = settings_lib.InvalidInputError


def model_setting(name):
  """`build_shapemask_model`'s effective argument `name` (gin or default)."""
  bindings = gin.get_bindings(factory.build_shapemask_model)
  if name in bindings:
    return bindings[name]
  return inspect.signature(
      factory.build_shapemask_model).parameters[name].default


def require_records(pattern, setting, print_fn):
  """`(files, skipped)` of `pattern`; skipped files are reported."""
  if not pattern:
    raise InvalidInputError(f"{setting} is not set")
  try:
    files, skipped = input_reader.split_record_files(pattern)
  except ValueError as e:
    raise InvalidInputError(f"{setting}: {e}") from None
  for path in skipped:
    print_fn(f"{setting}={pattern!r}: skipping {path} (not a TFRecord file)")
  return files, skipped


def check_label_maps(files, skipped, setting):
  """The converter's label maps beside `files` (or among the `skipped`
  files the pattern matched) hold no id the model's `num_classes` lacks.

  Raises:
    InvalidInputError: naming the setting, the id and the label map.
  """
  try:
    class_ids.check_label_maps(
        files, int(model_setting("num_classes")),
        [p for p in skipped if p.endswith(class_ids.LABEL_MAP_SUFFIX)])
  except ValueError as e:
    raise InvalidInputError(f"{setting}: {e}") from None


def check_record_files(pattern, setting):
  """Raises InvalidInputError naming a file of `pattern` that is no TFRecord.

  Reads each file's first record header only (12 bytes).
  """
  try:
    input_reader.check_record_headers(input_reader.list_files(pattern))
  except ValueError as e:
    raise InvalidInputError(f"{setting}: {e}") from None


def _unreadable_checkpoint_error(path, error):
  """The one-line error for an init checkpoint that cannot be read."""
  depth = model_setting("backbone_depth")
  reason = str(error).replace(f"cannot read checkpoint {path}: ", "")
  preset = (f"'keras_hub:resnet_{depth}_imagenet'" if depth in (50, 101) else
            "'keras_hub:resnet_50_imagenet' (or _101_)")
  return InvalidInputError(
      f"RESNET_CHECKPOINT={path!r} cannot be read ({reason}). Point "
      "RESNET_CHECKPOINT at a local copy of it (e.g. gsutil cp "
      f"'{path}.*' DIR/, then RESNET_CHECKPOINT='DIR/"
      f"{path.rstrip('/').split('/')[-1]}'), or at a keras-hub preset "
      f"(RESNET_CHECKPOINT={preset}), or train from scratch on purpose "
      "with RESNET_CHECKPOINT=None")


def validate_init_checkpoint(init_checkpoint, prefix=None,
                             modules="backbone"):
  """Checks `RESNET_CHECKPOINT` from its names, before anything starts.

  Raises:
    InvalidInputError: one line naming the file: missing or unreadable
      (with what to do instead), or not fitting the model's ResNet depth
      with this prefix.
  """
  try:
    init_ckpt.validate(init_checkpoint, prefix=prefix, modules=modules,
                       depth=model_setting("backbone_depth"))
  except FileNotFoundError as e:
    if "://" in str(init_checkpoint):
      raise _unreadable_checkpoint_error(init_checkpoint, e) from None
    raise InvalidInputError(f"init_checkpoint: {e}") from None
  except OSError as e:
    raise _unreadable_checkpoint_error(init_checkpoint, e) from None
  except (ValueError, ImportError, RuntimeError) as e:
    # Includes keras-hub presets: not installed, not fetchable, not a ResNet.
    raise InvalidInputError(f"init_checkpoint: {e}") from None


def _check_choices():
  """An unknown momentum form or L2 rule, named before anything starts."""
  form = gin.get_bindings(optimizers.build_momentum_optimizer).get(
      "momentum_form", "keras")
  if form not in optimizers.MOMENTUM_FORMS:
    raise InvalidInputError(
        f"build_momentum_optimizer.momentum_form={form!r} is not one of "
        f"{', '.join(repr(f) for f in optimizers.MOMENTUM_FORMS)}")
  rule = model_setting("l2_variables")
  if rule not in shapemask_model.L2_VARIABLE_RULES:
    raise InvalidInputError(
        f"build_shapemask_model.l2_variables={rule!r} is not one of "
        f"{', '.join(repr(r) for r in shapemask_model.L2_VARIABLE_RULES)}")


def _check_priors():
  """The shape-prior file: readable, and fitting the model's sizes."""
  prior_path = model_setting("shape_prior_path")
  if not prior_path:
    return
  try:
    local = shape_prior_files.local_copy(prior_path)
  except shape_prior_files.UnreadablePriorsError as e:
    raise InvalidInputError(str(e)) from None
  if not tf.io.gfile.exists(local):
    raise InvalidInputError(f"shape_prior_path={prior_path!r} does not exist")
  try:
    factory.load_priors(local, model_setting("num_classes"),
                        model_setting("use_category_for_mask"),
                        model_setting("mask_crop_size"))
  except ValueError as e:  # Names the path and both counts or sizes.
    copy = f" (the local copy of {prior_path})" if local != prior_path else ""
    raise InvalidInputError(f"{e}{copy}") from None


def validate_inputs(mode, train_file_pattern, eval_file_pattern,
                    init_checkpoint, init_checkpoint_prefix=None,
                    init_checkpoint_modules="backbone", print_fn=print):
  """Fails fast, naming the path, before anything starts.

  Checks the choice settings `build_momentum_optimizer.momentum_form` and
  `build_shapemask_model.l2_variables`, the data patterns of `mode` (files
  that are not TFRecords by name are skipped, saying so), the shape-prior
  file (readable, class count equal to the model's `num_classes`, prior
  size equal to its `mask_crop_size`; a remote one is copied to the local
  cache first, see `shape_prior_files`), the init checkpoint
  (`validate_init_checkpoint`) and, last, the converter's label maps beside
  the data (no category id at or above `num_classes`; `check_label_maps`).

  Raises:
    InvalidInputError: naming the setting and the path (or value).
  """
  _check_choices()
  data = {}
  if mode in ("train", "train_and_eval"):
    data["train_file_pattern"] = require_records(
        train_file_pattern, "train_file_pattern", print_fn)
  if mode in ("eval", "train_and_eval"):
    data["eval_file_pattern"] = require_records(
        eval_file_pattern, "eval_file_pattern", print_fn)
  _check_priors()
  if init_checkpoint:
    validate_init_checkpoint(init_checkpoint, init_checkpoint_prefix,
                             init_checkpoint_modules)
  # Last, so that a prior file made for another NUM_CLASSES is named as
  # the more direct mismatch.
  for setting, (files, skipped) in data.items():
    check_label_maps(files, skipped, setting)


def validate(settings, mode, print_fn=print):
  """Every check of a run's settings that needs no engine (see module).

  The init checkpoint is checked for the training modes only, and
  `per_replica_batch_size` against the global batch too.
  """
  training = mode != "eval"
  validate_inputs(mode, settings.train_file_pattern,
                  settings.eval_file_pattern,
                  settings.init_checkpoint if training else None,
                  settings.init_checkpoint_prefix,
                  settings.init_checkpoint_modules, print_fn=print_fn)
  if training:
    settings_lib.check_per_replica_batch_size(settings,
                                              model_setting("use_sync_bn"))


def model_overrides(settings, print_fn=print):
  """`build_shapemask_model` overrides every engine builds with.

  A remote prior file's local copy (`shape_prior_files`), and with no init
  checkpoint nothing stays frozen (said through `print_fn`; None: silent).

  Raises:
    InvalidInputError: the remote prior file cannot be copied.
  """
  try:
    priors = shape_prior_files.model_overrides()
  except shape_prior_files.UnreadablePriorsError as e:
    raise InvalidInputError(str(e)) from None
  return dict(priors, **_freezing_overrides(settings, print_fn or (
      lambda *a, **k: None)))


def _freezing_overrides(settings, print_fn):
  if settings.init_checkpoint:
    if model_setting("freeze_early_convs"):
      print_fn("Backbone from RESNET_CHECKPOINT: the stem and conv2_x "
               "kernels stay frozen (freeze_early_convs=True).")
    return {}
  frozen = [name for name in ("freeze_early_convs", "freeze_early_norms")
            if model_setting(name)]
  if frozen:
    print_fn(
        "No RESNET_CHECKPOINT: training from scratch, so the stem and "
        f"conv2_x train too ({' and '.join(frozen)} set to False; frozen "
        "random kernels would never learn).")
    return {name: False for name in frozen}
  print_fn("No RESNET_CHECKPOINT: training from scratch, every "
           "backbone layer trains.")
  return {}
