"""The gin-configured experiment behind `train.py`.

`Experiment` validates its inputs before any accelerator starts, builds the
strategy (the seed's training time starts here), the model, optimizer and
checkpoint manager in its scope, restores or initialises from checkpoints,
trains with periodic checkpoints, evaluates, and shuts the strategy down (the
time ends there).
"""

import inspect
import os

import gin
from gin import config as gin_config
import keras
import tensorflow as tf

from official_shapemask.dataloaders import class_ids
from official_shapemask.dataloaders import input_reader
from official_shapemask.dataloaders import shapemask_parser
from official_shapemask.evaluation import coco_evaluator
from official_shapemask.modeling import factory
from official_shapemask.modeling import shapemask_model
from official_shapemask.weights import any_engine
from official_shapemask.weights import checkpoints
from official_shapemask.weights import errors
from official_shapemask.training import divergence
from official_shapemask.training import engine_switch
from official_shapemask.training import eval_results
from official_shapemask.weights import init_checkpoint as init_ckpt
from official_shapemask.training import operative_config
from official_shapemask.training import optimizers
from official_shapemask.training import shape_prior_files
from official_shapemask.training import strategies
from official_shapemask.training import train_loop


class InvalidInputError(ValueError):
  """A setting names a file that is missing, corrupt or does not fit, or
  holds a value it cannot take.

  `message` is the one-line message (gin appends its call site to `str()`
  of an error raised inside a configurable; see `create`).
  """

  def __init__(self, message):
    super().__init__(message)
    self.message = message


def _require_records(pattern, setting, print_fn):
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


def _check_label_maps(files, skipped, setting):
  """The converter's label maps beside `files` (or among the `skipped`
  files the pattern matched) hold no id the model's `num_classes` lacks."""
  try:
    class_ids.check_label_maps(
        files, int(_model_setting("num_classes")),
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


def data_error(error, pattern, setting):
  """An `InvalidInputError` naming the shard behind a tf.data record error,
  or the category id, image and shard of a record whose class id does not
  fit the model (the parser's `class_ids.check_in_graph`).

  Args:
    error: the `tf.errors.OpError` a dataset of `pattern` raised.
    pattern: the file pattern the dataset read.
    setting: the setting that holds it, for the message.

  Returns:
    the error to raise, or None when `error` is not a damaged-record error.
  """
  bad_class = class_ids.describe_error(error)
  if bad_class is not None:
    return InvalidInputError(f"{setting}: {bad_class}")
  if input_reader.record_error_offset(error) is None:
    return None
  files = input_reader.list_files(pattern)
  found = input_reader.find_corrupt_files(files, error)
  if found:
    where = "; ".join(f"{path} ({what})" for path, what in found)
    return InvalidInputError(
        f"{setting}: damaged TFRecord file {where}; convert it again or "
        f"leave it out of {pattern!r}")
  return InvalidInputError(
      f"{setting}={pattern!r}: a TFRecord file is damaged "
      f"({errors.first_line(error)}), but no single file fails there "
      f"when read alone")


def setting_name(configurable, param):
  """How the user sets `configurable.param`: `MACRO (Experiment.param)` when
  its unscoped gin binding is a macro, else `Experiment.param`.

  Args:
    configurable: the configurable's name as gin files write it
      (`Experiment`).
    param: the parameter name.
  """
  name = f"{configurable}.{param}"
  macro_suffix = "/gin.macro"
  for (scope, selector), params in gin_config._CONFIG.items():  # pylint: disable=protected-access
    if scope or selector.rsplit(".", 1)[-1] != configurable:
      continue
    value = params.get(param)
    if isinstance(value, gin_config.ConfigurableReference) and (
        value.scoped_selector.endswith(macro_suffix)):
      return f"{value.scoped_selector[:-len(macro_suffix)]} ({name})"
  return name


def positive_setting(value, param, configurable="Experiment",
                     optional=False):
  """`value` as an int, after checking it is a positive whole number.

  Args:
    value: the bound value (gin parses `64` as int, `1e4` as float).
    param: the parameter's name, for the message.
    configurable: whose parameter it is, for the message.
    optional: None is allowed (and returned).

  Raises:
    InvalidInputError: one line naming the gin setting (its macro when it
      is bound through one, e.g. `TRAIN_BATCH_SIZE (Experiment.
      train_batch_size)`) and the value.
  """
  if value is None and optional:
    return None
  whole = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      float(value).is_integer())
  if not whole or value < 1:
    name = setting_name(configurable, param)
    macro = name.split(" ", 1)[0]
    unset = " (or None)" if optional else ""
    raise InvalidInputError(
        f"{macro}={value!r}{name[len(macro):]}: must be a positive whole "
        f"number{unset}")
  return int(value)


def _model_setting(name):
  """`build_shapemask_model`'s effective argument `name` (gin or default)."""
  bindings = gin.get_bindings(factory.build_shapemask_model)
  if name in bindings:
    return bindings[name]
  return inspect.signature(
      factory.build_shapemask_model).parameters[name].default


def _unreadable_checkpoint_error(path, error):
  """The one-line error for an init checkpoint that cannot be read."""
  depth = _model_setting("backbone_depth")
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
                       depth=_model_setting("backbone_depth"))
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
  form = gin.get_bindings(build_momentum_optimizer).get(
      "momentum_form", "keras")
  if form not in MOMENTUM_FORMS:
    raise InvalidInputError(
        f"build_momentum_optimizer.momentum_form={form!r} is not one of "
        f"{', '.join(repr(f) for f in MOMENTUM_FORMS)}")
  rule = _model_setting("l2_variables")
  if rule not in shapemask_model.L2_VARIABLE_RULES:
    raise InvalidInputError(
        f"build_shapemask_model.l2_variables={rule!r} is not one of "
        f"{', '.join(repr(r) for r in shapemask_model.L2_VARIABLE_RULES)}")


def validate_inputs(mode, train_file_pattern, eval_file_pattern,
                    init_checkpoint, init_checkpoint_prefix=None,
                    init_checkpoint_modules="backbone", print_fn=print):
  """Fails fast, naming the path, before the strategy starts.

  Checks the data patterns of `mode` (files that are not TFRecords by name
  are skipped, saying so), the shape-prior file (readable, class
  count equal to the model's `num_classes`, prior size equal to its
  `mask_crop_size`; a remote one is copied to the local cache first, see
  `shape_prior_files`), the init checkpoint (`validate_init_checkpoint`)
  and, last, the converter's label maps beside the data (no category id at
  or above `num_classes`).

  Also checks the choice settings `build_momentum_optimizer.momentum_form`
  and `build_shapemask_model.l2_variables`.

  Raises:
    InvalidInputError: naming the setting and the path (or value).
  """
  _check_choices()
  data = {}
  if mode in ("train", "train_and_eval"):
    data["train_file_pattern"] = _require_records(
        train_file_pattern, "train_file_pattern", print_fn)
  if mode in ("eval", "train_and_eval"):
    data["eval_file_pattern"] = _require_records(
        eval_file_pattern, "eval_file_pattern", print_fn)
  prior_path = _model_setting("shape_prior_path")
  if prior_path:
    try:
      local = shape_prior_files.local_copy(prior_path)
    except shape_prior_files.UnreadablePriorsError as e:
      raise InvalidInputError(str(e)) from None
    if not tf.io.gfile.exists(local):
      raise InvalidInputError(
          f"shape_prior_path={prior_path!r} does not exist")
    try:
      factory.load_priors(local, _model_setting("num_classes"),
                          _model_setting("use_category_for_mask"),
                          _model_setting("mask_crop_size"))
    except ValueError as e:  # Names the path and both counts or sizes.
      copy = f" (the local copy of {prior_path})" if local != prior_path else ""
      raise InvalidInputError(f"{e}{copy}") from None
  if init_checkpoint:
    validate_init_checkpoint(init_checkpoint, init_checkpoint_prefix,
                             init_checkpoint_modules)
  # Last, so that a prior file made for another NUM_CLASSES is named as
  # the more direct mismatch.
  for setting, (files, skipped) in data.items():
    _check_label_maps(files, skipped, setting)


def check_per_replica_batch_size(per_replica_batch_size, train_batch_size):
  """Checks `Experiment.per_replica_batch_size` against the global batch.

  Raises:
    InvalidInputError: one line naming the numbers: not a positive integer,
      not dividing `train_batch_size`, or combined with
      `build_shapemask_model.use_sync_bn` (statistics over all replicas).
  """
  size = per_replica_batch_size
  if size is None:
    return
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise InvalidInputError(
        f"Experiment.per_replica_batch_size={size!r} is not a positive "
        "integer (or None)")
  if train_batch_size % size:
    raise InvalidInputError(
        f"train_batch_size={train_batch_size} is not a multiple of "
        f"Experiment.per_replica_batch_size={size}")
  if _model_setting("use_sync_bn"):
    raise InvalidInputError(
        f"Experiment.per_replica_batch_size={size} asks for batch-norm "
        "statistics over groups of that many images, but "
        "build_shapemask_model.use_sync_bn=True takes them over all "
        "replicas: unset one of the two")


def batch_groups(batch_size, per_replica_batch_size, what=None):
  """Groups of `per_replica_batch_size` images in a batch of `batch_size`.

  The group count of `ShapeMaskModel.set_batch_groups`: batch-norm
  statistics and loss normalisers over groups of `per_replica_batch_size`
  images. The TensorFlow loop passes its per-replica batch, the JAX engine
  its global batch.

  Args:
    batch_size: int, the images one step of the model sees.
    per_replica_batch_size: int or None (None: one group, the whole batch).
    what: the batch with its size, for the error message (default
      `train_batch_size=<batch_size>`).

  Returns:
    int >= 1.

  Raises:
    InvalidInputError: `batch_size` is not a multiple of it (one line
      naming both numbers).
  """
  if per_replica_batch_size is None:
    return 1
  if batch_size % per_replica_batch_size:
    raise InvalidInputError(
        f"{what or f'train_batch_size={batch_size}'} is not a multiple of "
        f"Experiment.per_replica_batch_size={per_replica_batch_size}")
  return batch_size // per_replica_batch_size


def model_input_settings(model):
  """Parser settings that must agree with the model's anchors and sizes."""
  anchors = model.detection_generator.get_config()
  return dict(output_size=model.image_size, min_level=anchors["min_level"],
              max_level=anchors["max_level"], num_scales=anchors["num_scales"],
              aspect_ratios=tuple(anchors["aspect_ratios"]),
              anchor_size=anchors["anchor_size"],
              mask_crop_size=model.prior_head.mask_crop_size,
              num_classes=model.head.get_config()["num_classes"],
              upsample_factor=model.fine_head.upsample_factor,
              outer_box_scale=model.outer_box_scale)


def make_eval_dataset(file_pattern, batch_size, model, use_bfloat16=False):
  """The evaluation dataset: `(images, {'image_info', 'groundtruths'})`."""
  parser = shapemask_parser.Parser(mode="eval", use_bfloat16=use_bfloat16,
                                   **model_input_settings(model))
  return input_reader.build_dataset(file_pattern, parser, batch_size,
                                    is_training=False)


def make_train_dataset_fn(file_pattern, global_batch_size, model,
                          use_bfloat16=False, deterministic=False):
  """A `distribute_datasets_from_function` callable for training."""
  settings = model_input_settings(model)

  def dataset_fn(input_context):
    parser = shapemask_parser.Parser(mode="train", use_bfloat16=use_bfloat16,
                                     **settings)
    batch = input_context.get_per_replica_batch_size(global_batch_size)
    return input_reader.build_dataset(
        file_pattern, parser, batch, is_training=True,
        input_context=input_context, deterministic=deterministic)

  return dataset_fn


MOMENTUM_FORMS = ("keras", "tf1")


@gin.configurable
def build_momentum_optimizer(learning_rate=gin.REQUIRED, momentum=0.9,
                             nesterov=False, momentum_form="keras"):
  """Momentum SGD, 0.9, not Nesterov (the TF1 reference's settings).

  Args:
    learning_rate: float or schedule (`StepDecayWithWarmup` in the configs).
    momentum: float in [0, 1].
    nesterov: bool.
    momentum_form: `'keras'`: Keras `SGD` (`v = m*v - lr*g; w += v`);
      `'tf1'`: `optimizers.TF1Momentum`, TF1's `MomentumOptimizer`
      (`a = m*a + g; w -= lr*a`), the seed's. Equal at a constant learning
      rate; after each change of it (warmup, decays) they differ.

  Returns:
    a `keras.optimizers.Optimizer` (not built).

  Raises:
    ValueError: an unknown `momentum_form`.
  """
  if momentum_form == "keras":
    return keras.optimizers.SGD(learning_rate=learning_rate,
                                momentum=momentum, nesterov=nesterov)
  if momentum_form == "tf1":
    return optimizers.TF1Momentum(learning_rate=learning_rate,
                                  momentum=momentum, nesterov=nesterov)
  raise ValueError(
      f"build_momentum_optimizer.momentum_form={momentum_form!r} is not one "
      f"of {', '.join(repr(f) for f in MOMENTUM_FORMS)}")


def create(model_dir, **kwargs):
  """`Experiment(model_dir, **kwargs)` with its gin settings.

  Raises:
    InvalidInputError: a setting that is not a positive whole number, in
      one line (without the "In call to configurable" line gin appends to
      errors raised inside a configurable).
  """
  try:
    return Experiment(model_dir, **kwargs)
  except InvalidInputError as e:
    raise InvalidInputError(e.message) from None


@gin.configurable(denylist=["model_dir", "strategy_name", "tpu", "print_fn"])
class Experiment:
  """Strategy, model, optimizer, checkpoints and data of one run.

  Args:
    model_dir: where checkpoints, `config.gin`, TensorBoard logs and
      `eval_<step>.json` go.
    strategy_name: `tpu`, `mirrored`, `multi_worker` or `one_device`.
    tpu: TPU name for `tpu`.
    train_file_pattern: TFRecord glob of the training set.
    eval_file_pattern: TFRecord glob of the evaluation set.
    val_json_file: COCO annotation JSON for evaluation; None = ground truth
      from the evaluation records themselves.
    train_batch_size: global batch size.
    per_replica_batch_size: batch-norm statistics and loss normalisers are
      taken over groups of this many images, in both engines (the seed: 8,
      one TPU core's batch). The TensorFlow loop splits each replica's batch
      (a multiple of it) into such groups, the JAX engine the global batch
      (`ShapeMaskModel.set_batch_groups`). None = each engine's own unit:
      the replica's batch (TensorFlow loop), the global batch (JAX).
    eval_batch_size: evaluation batch size.
    total_steps: steps to train to (a resumed run continues to this step).
    steps_per_loop: steps per host call and per progress line.
    checkpoint_every: steps between checkpoints (None: steps_per_loop).
    eval_every: steps between evaluations in `train_and_eval` (None:
      checkpoint_every).
    eval_samples: images evaluated (None = the whole evaluation set).
    max_checkpoints: checkpoints kept.
      These sizes and counts are positive whole numbers (None where it
      says so); another value is an `InvalidInputError` naming the gin
      setting.
    init_checkpoint: checkpoint to start from when `model_dir` holds none
      (`RESNET_CHECKPOINT`): a ShapeMask checkpoint of ours, a Keras
      weights file, or a TF1 checkpoint / SavedModel of the seed's code
      (see `init_checkpoint`). None trains from scratch: then nothing is
      frozen (the early convolutions train, whatever `freeze_early_convs`
      says), since frozen random kernels would stay random.
    init_checkpoint_modules: `all`, `backbone` or `backbone_fpn`.
    init_checkpoint_prefix: the seed's `checkpoint.prefix`
      (`RESNET_CHECKPOINT_PREFIX`, e.g. `resnet101/` for its ImageNet
      files); used by TF1 checkpoints only.
    gradient_clip_norm: global-norm clip; 0 = none (the reference).
    use_bfloat16: `mixed_bfloat16` policy; None = on for TPU only.
    jit_compile: XLA for the replica step; None = on for TPU only.
    mask_eval_class: `all`, `voc` or `nonvoc` (cross-category evaluation).
    loss_explosion_factor: a step whose total loss exceeds this multiple of
      the run's reference loss stops training (`divergence.LossGuard`);
      0 stops on NaN / inf only.
    deterministic_input: deterministic input order (tests).
    print_fn: progress output.
  """

  def __init__(self,
               model_dir,
               strategy_name="one_device",
               tpu=None,
               train_file_pattern=None,
               eval_file_pattern=None,
               val_json_file=None,
               train_batch_size=64,
               per_replica_batch_size=None,
               eval_batch_size=8,
               total_steps=45000,
               steps_per_loop=100,
               checkpoint_every=None,
               eval_every=None,
               eval_samples=None,
               max_checkpoints=5,
               init_checkpoint=None,
               init_checkpoint_modules="all",
               init_checkpoint_prefix=None,
               gradient_clip_norm=0.0,
               use_bfloat16=None,
               jit_compile=None,
               mask_eval_class="all",
               loss_explosion_factor=divergence.DEFAULT_FACTOR,
               deterministic_input=False,
               print_fn=print):
    self.model_dir = model_dir
    self.strategy_name = strategy_name
    self.tpu = tpu
    self.train_file_pattern = train_file_pattern
    self.eval_file_pattern = eval_file_pattern
    self.val_json_file = val_json_file
    # Sizes and step counts: checked once, here, where gin hands them over.
    self.train_batch_size = positive_setting(train_batch_size,
                                             "train_batch_size")
    self.per_replica_batch_size = per_replica_batch_size
    self.eval_batch_size = positive_setting(eval_batch_size, "eval_batch_size")
    self.total_steps = positive_setting(total_steps, "total_steps")
    self.steps_per_loop = positive_setting(steps_per_loop, "steps_per_loop")
    self.checkpoint_every = positive_setting(
        checkpoint_every, "checkpoint_every",
        optional=True) or self.steps_per_loop
    self.eval_every = positive_setting(
        eval_every, "eval_every", optional=True) or self.checkpoint_every
    self.eval_samples = positive_setting(eval_samples, "eval_samples",
                                         optional=True)
    self.max_checkpoints = positive_setting(max_checkpoints,
                                            "max_checkpoints")
    self.init_checkpoint = init_checkpoint
    self.init_checkpoint_modules = init_checkpoint_modules
    self.init_checkpoint_prefix = init_checkpoint_prefix
    self.gradient_clip_norm = float(gradient_clip_norm)
    on_tpu = strategy_name == "tpu"
    self.use_bfloat16 = on_tpu if use_bfloat16 is None else bool(use_bfloat16)
    self.jit_compile = on_tpu if jit_compile is None else bool(jit_compile)
    self.mask_eval_class = mask_eval_class
    self.loss_explosion_factor = float(loss_explosion_factor)
    self.deterministic_input = deterministic_input
    self.print_fn = print_fn
    self.strategy = None
    self._loop = None
    self._iterator = None
    self._trained_steps = 0
    self._train_seconds = 0.0
    self._resumed = False
    self._config = None
    self.timer = None

  # ------------------------------------------------------------------ setup
  def start(self, mode):
    """Validates inputs, then starts the strategy and builds everything."""
    validate_inputs(mode, self.train_file_pattern, self.eval_file_pattern,
                    self.init_checkpoint if mode != "eval" else None,
                    self.init_checkpoint_prefix, self.init_checkpoint_modules,
                    print_fn=self.print_fn)
    if mode != "eval":
      check_per_replica_batch_size(self.per_replica_batch_size,
                                   self.train_batch_size)
      replicas = strategies.known_num_replicas(self.strategy_name)
      if replicas:  # one_device, mirrored: checked before anything starts.
        self._replica_batch_groups(replicas)
    self.timer = train_loop.Timer()  # The seed's clock starts...
    self.strategy = strategies.build_strategy(self.strategy_name, tpu=self.tpu)
    self.chief = strategies.is_chief(self.strategy)
    groups = 1
    if mode != "eval":
      groups = self._replica_batch_groups(
          self.strategy.num_replicas_in_sync)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if self.use_bfloat16 else "float32")
    with self.strategy.scope():
      # MEAN-aggregated BN moving statistics: identical on every replica.
      with strategies.replica_consistent_state():
        self.model = factory.build_shapemask_model(
            **self.model_overrides(say=mode != "eval"))
      self.model.set_batch_groups(groups)
      self.optimizer = build_momentum_optimizer()
      self.optimizer.build(self.model.trainable_variables)
      self.checkpoint = tf.train.Checkpoint(model=self.model,
                                            optimizer=self.optimizer)
      # Non-chief workers write to a scratch directory (the MWMS pattern).
      ckpt_dir = self.model_dir if self.chief else os.path.join(
          self.model_dir, "workers",
          str(self.strategy.cluster_resolver.task_id))
      if mode != "eval":
        self._restore_or_initialize(ckpt_dir)
      # After the restore: it may have moved unreadable checkpoints aside.
      self.manager = tf.train.CheckpointManager(
          self.checkpoint, ckpt_dir, max_to_keep=self.max_checkpoints)
    self._config = operative_config.TrainingConfigRecorder(
        self.model_dir, enabled=self.chief, print_fn=self.print_fn)
    return self

  def _replica_batch_groups(self, replicas):
    """Groups per replica batch (`batch_groups`) with `replicas` replicas."""
    if self.train_batch_size % replicas:
      raise InvalidInputError(
          f"train_batch_size={self.train_batch_size} is not a multiple of "
          f"the {replicas} replicas")
    per_replica = self.train_batch_size // replicas
    return batch_groups(
        per_replica, self.per_replica_batch_size,
        f"the per-replica batch of {per_replica} images (train_batch_size="
        f"{self.train_batch_size} over {replicas} replicas)")

  def model_overrides(self, say=True):
    """`build_shapemask_model` overrides (both engines build with these):
    a remote prior file's local copy (`shape_prior_files`), and with no
    init checkpoint nothing stays frozen."""
    print_fn = self.print_fn if say else (lambda *a, **k: None)
    try:
      priors = shape_prior_files.model_overrides()
    except shape_prior_files.UnreadablePriorsError as e:
      raise InvalidInputError(str(e)) from None
    return dict(priors, **self._freezing_overrides(print_fn))

  def _freezing_overrides(self, print_fn):
    if self.init_checkpoint:
      if _model_setting("freeze_early_convs"):
        print_fn("Backbone from RESNET_CHECKPOINT: the stem and conv2_x "
                 "kernels stay frozen (freeze_early_convs=True).")
      return {}
    frozen = [name for name in ("freeze_early_convs", "freeze_early_norms")
              if _model_setting(name)]
    if frozen:
      print_fn(
          "No RESNET_CHECKPOINT: training from scratch, so the stem and "
          f"conv2_x train too ({' and '.join(frozen)} set to False; frozen "
          "random kernels would never learn).")
      return {name: False for name in frozen}
    print_fn("No RESNET_CHECKPOINT: training from scratch, every "
             "backbone layer trains.")
    return {}

  def _restore_or_initialize(self, ckpt_dir):
    """Resumes from the newest readable checkpoint, or initialises."""
    for path in checkpoints.remove_interrupted_saves(ckpt_dir):
      self.print_fn(f"Removed {path}, left by an interrupted checkpoint save")
    try:
      latest = checkpoints.restore_newest_readable(
          self.checkpoint, ckpt_dir, move_unreadable=True,
          print_fn=self.print_fn)
    except errors.CheckpointError as e:
      raise InvalidInputError(str(e)) from None
    # The JAX engine's step, when newer (engine_switch: prints the line).
    switched = engine_switch.resume(
        self.model, self.optimizer, self.model_dir, "tensorflow",
        self.step if latest else None, print_fn=self.print_fn)
    if switched is not None:
      self._resumed = True
    elif latest:
      self._resumed = True
      self.print_fn(f"Resumed from {latest} at step {self.step}")
    elif self.init_checkpoint:
      try:
        init_ckpt.restore(self.model, self.init_checkpoint,
                          self.init_checkpoint_modules,
                          prefix=self.init_checkpoint_prefix,
                          print_fn=self.print_fn)
      except (OSError, ValueError, ImportError, RuntimeError) as e:
        raise InvalidInputError(f"init_checkpoint: {e}") from None

  @property
  def step(self):
    return int(self.optimizer.iterations.numpy())

  def close(self):
    """Shuts the strategy down; returns the wall time since `start`."""
    if self.strategy is not None:
      strategies.shutdown(self.strategy)
    return self.timer.elapsed() if self.timer else 0.0

  # --------------------------------------------------------------- training
  def train_dataset_fn(self):
    """The `distribute_datasets_from_function` callable of the train set.

    Checks first that every file starts with a TFRecord header (names the
    file that does not), before the train step is traced.
    """
    check_record_files(self.train_file_pattern, "train_file_pattern")
    return make_train_dataset_fn(self.train_file_pattern,
                                 self.train_batch_size, self.model,
                                 self.use_bfloat16, self.deterministic_input)

  def _weights_finite(self):
    return all(bool(tf.reduce_all(tf.math.is_finite(v.value)))
               for v in self.model.trainable_variables)

  def _divergence_error(self):
    loop = self._loop
    return divergence.stop_error(
        loop.guard, loop.bad_reason, loop.bad_step,
        loop.bad_losses["total_loss"],
        train_loop.format_losses(loop.bad_losses), loop.bad_limit,
        self.manager.latest_checkpoint)

  def train(self, until_step=None):
    """Trains to `until_step` (default total_steps), checkpointing.

    Raises:
      train_loop.NonFiniteLossError: a loss (or, at a checkpoint, a weight)
        became NaN or infinite; names the step.
      train_loop.LossExplosionError: a step's total loss exceeded the
        explosion limit (`divergence.LossGuard`); names the step.
        In both cases nothing from that loop is saved, so the latest
        checkpoint is the last good one.
      InvalidInputError: a training file is damaged; names it.
    """
    until_step = min(until_step or self.total_steps, self.total_steps)
    if self._loop is None:
      dataset = self.strategy.distribute_datasets_from_function(
          self.train_dataset_fn())
      self._iterator = iter(dataset)
      # The input parser is configured now: the operative config is whole.
      self._config.training_begins(resumed=self._resumed, step=self.step)
      self._loop = train_loop.TrainLoop(
          self.strategy, self.model, self.optimizer,
          gradient_clip_norm=self.gradient_clip_norm,
          jit_compile=self.jit_compile,
          loss_explosion_factor=self.loss_explosion_factor)
      self._logger = train_loop.ProgressLogger(
          self.total_steps, self.train_batch_size,
          summary_dir=os.path.join(self.model_dir, "train")
          if self.chief else None, print_fn=self.print_fn)
    losses = {}
    step = self.step
    while step < until_step:
      num = min(self.steps_per_loop, until_step - step,
                self.checkpoint_every - step % self.checkpoint_every)
      t = train_loop.Timer()
      try:
        losses = self._loop.run(self._iterator, num)
      except tf.errors.OpError as e:
        error = data_error(e, self.train_file_pattern, "train_file_pattern")
        if error is None:
          raise
        raise error from None
      seconds = t.elapsed()
      if self._loop.bad_step is not None:
        raise self._divergence_error()
      step = self.step
      self._trained_steps += num
      self._train_seconds += seconds
      self._logger.log(step, losses,
                       train_loop.current_learning_rate(self.optimizer),
                       seconds, num)
      if step % self.checkpoint_every == 0 or step >= until_step:
        if not self._weights_finite():
          raise train_loop.NonFiniteLossError(
              f"non-finite weights after step {step}; training stopped, the "
              f"last good checkpoint is kept: {self.manager.latest_checkpoint}")
        self._config.before_save()
        self.manager.save(checkpoint_number=step)
    return losses

  # ------------------------------------------------------------- evaluation
  def _predict_fn(self):
    """Distributed inference: the batch is split over the replicas."""
    strategy, model = self.strategy, self.model

    def replica_fn(images, image_info):
      return model({"images": images, "image_info": image_info},
                   training=False)

    @tf.function
    def predict(images, image_info):
      n = strategy.num_replicas_in_sync
      if n == 1:
        return strategy.run(replica_fn, args=(images, image_info))
      per = images.shape[0] // n

      def split(tensor):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tensor[ctx.replica_id_in_sync_group * per:
                               (ctx.replica_id_in_sync_group + 1) * per])

      outputs = strategy.run(replica_fn,
                             args=(split(images), split(image_info)))
      return tf.nest.map_structure(lambda t: strategy.gather(t, axis=0),
                                   outputs)

    return predict

  def evaluate(self):
    """COCO box + mask metrics of the current weights on the eval set.

    Writes `model_dir/eval_<step>.json` and TensorBoard scalars, prints the
    table, and returns the metrics.
    """
    num_replicas = self.strategy.num_replicas_in_sync
    if self.eval_batch_size % num_replicas:
      raise ValueError(f"eval_batch_size={self.eval_batch_size} is not a "
                       f"multiple of the {num_replicas} replicas")
    check_record_files(self.eval_file_pattern, "eval_file_pattern")
    dataset = make_eval_dataset(self.eval_file_pattern, self.eval_batch_size,
                                self.model, self.use_bfloat16)
    evaluator = coco_evaluator.COCOEvaluator(
        annotation_file=self.val_json_file,
        mask_eval_class=self.mask_eval_class)
    predict = self._predict_fn()
    step = self.step
    t = train_loop.Timer()
    seen = 0
    try:
      for images, labels in dataset:
        outputs = predict(images, labels["image_info"])
        outputs = {k: v.numpy() for k, v in outputs.items()}
        groundtruths = {k: v.numpy()
                        for k, v in labels["groundtruths"].items()}
        evaluator.update(outputs, groundtruths)
        seen += int((groundtruths["source_id"] >= 0).sum())
        if self.eval_samples and seen >= self.eval_samples:
          break
    except tf.errors.OpError as e:
      error = data_error(e, self.eval_file_pattern, "eval_file_pattern")
      if error is None:
        raise
      raise error from None
    predict_seconds = t.elapsed()
    metrics = evaluator.evaluate()
    metrics["predict_seconds"] = predict_seconds
    metrics["num_images"] = evaluator.num_images
    metrics["step"] = step
    return eval_results.publish(self.model_dir, metrics, chief=self.chief,
                                print_fn=self.print_fn)

  def has_checkpoint(self):
    """Whether `model_dir` holds a checkpoint of either engine (before
    `start` too)."""
    return any_engine.newest_step(self.model_dir) is not None

  def latest_checkpoint(self):
    """The newest checkpoint in `model_dir` (a prefix), or None."""
    return tf.train.latest_checkpoint(self.model_dir)

  def checkpoints_iterator(self, timeout):
    """Yields each new checkpoint until none appears within `timeout` s."""
    return tf.train.checkpoints_iterator(self.model_dir, timeout=timeout)

  def restore(self, checkpoint_path):
    """Loads a training checkpoint's weights (for evaluation).

    Writes the operative config to `model_dir/eval_config.gin` (never
    `config.gin`, the training run's).

    Raises:
      InvalidInputError: naming the checkpoint, when it cannot be read or
        does not match the model built from the gin config.
    """
    try:
      checkpoints.restore_checkpoint(self.checkpoint, checkpoint_path)
    except errors.CheckpointError as e:
      raise InvalidInputError(str(e)) from None
    if self.chief:
      operative_config.write_eval_config(self.model_dir)
    return self.step

  def restore_latest(self):
    """Restores the newest readable checkpoint of `model_dir` (evaluation).

    An unreadable newer checkpoint is named and left where it is.

    Returns:
      the restored prefix.

    Raises:
      InvalidInputError: `model_dir` holds no checkpoint, none is readable,
        or the newest readable one does not match the model (named).
    """
    # The JAX engine's step, when newer (engine_switch: prints the line).
    switched = engine_switch.restore_for_eval(
        self.model, self.optimizer, self.model_dir, "tensorflow",
        print_fn=self.print_fn)
    if switched is not None:
      if self.chief:
        operative_config.write_eval_config(self.model_dir)
      return switched.path
    try:
      path = checkpoints.restore_newest_readable(
          self.checkpoint, self.model_dir, move_unreadable=False,
          print_fn=self.print_fn)
    except errors.CheckpointError as e:
      raise InvalidInputError(str(e)) from None
    if path is None:
      raise InvalidInputError(f"no checkpoint in {self.model_dir}")
    if self.chief:
      operative_config.write_eval_config(self.model_dir)
    return path

  @property
  def trained_steps(self):
    return self._trained_steps

  @property
  def train_images_per_second(self):
    if not self._train_seconds:
      return 0.0
    return self._trained_steps * self.train_batch_size / self._train_seconds
