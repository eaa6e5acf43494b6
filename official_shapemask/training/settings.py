"""The settings of one `train.py` run, and the rules that derive from them.

`Settings` is a plain object: gin fills it (its gin name is `Experiment`,
so every gin file, macro and `config.gin` binds `Experiment.<name>`), the
controller reads it, and each engine reads the fields it needs. No engine
subclasses or wraps it.

Sizes and step counts are positive whole numbers, checked once where gin
hands them over (`positive_setting`; `create` gives its one line). Also
here, once for every engine: the batch-group rule of
`Experiment.per_replica_batch_size` (`check_per_replica_batch_size`,
`replica_groups`), the batch-divisibility check (`check_divisible`) and the
`use_bfloat16` default (`use_bfloat16`).
"""

import gin
from gin import config as gin_config

from official_shapemask.training import divergence


class InvalidInputError(ValueError):
  """A setting names a file that is missing, corrupt or does not fit, or
  holds a value the run cannot use (one line).

  `message` is the one-line message (gin appends its call site to `str()`
  of an error raised inside a configurable; see `create`).
  """

  def __init__(self, message):
    super().__init__(message)
    self.message = message


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


def create(model_dir, **kwargs):
  """`Settings(model_dir, **kwargs)` with its gin bindings.

  Raises:
    InvalidInputError: a setting that is not a positive whole number, in
      one line (without the "In call to configurable" line gin appends to
      errors raised inside a configurable).
  """
  try:
    return Settings(model_dir, **kwargs)
  except InvalidInputError as e:
    raise InvalidInputError(e.message) from None


@gin.configurable("Experiment", module="official_shapemask.training.settings",
                  denylist=["model_dir", "strategy_name", "tpu"])
class Settings:
  """What one run trains and evaluates, and how (gin name `Experiment`).

  Args:
    model_dir: where checkpoints, `config.gin`, TensorBoard logs and
      `eval_<step>.json` go.
    strategy_name: `tpu`, `mirrored`, `multi_worker` or `one_device` (the
      TensorFlow engine's `tf.distribute` strategy).
    tpu: TPU name for `tpu`.
    train_file_pattern: TFRecord glob of the training set.
    eval_file_pattern: TFRecord glob of the evaluation set.
    val_json_file: COCO annotation JSON for evaluation; None = ground truth
      from the evaluation records themselves.
    train_batch_size: global batch size.
    per_replica_batch_size: batch-norm statistics and loss normalisers are
      taken over groups of this many images, in every engine (the seed: 8,
      one TPU core's batch; `replica_groups`). None = each engine's own
      unit: the replica's batch (TensorFlow), the global batch (JAX).
    eval_batch_size: evaluation batch size.
    total_steps: steps to train to (a resumed run continues to this step).
    steps_per_loop: steps per round (one host call of the TensorFlow
      engine) and per progress line.
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
      weights file, a TF1 checkpoint / SavedModel of the seed's code or a
      keras-hub preset (see `weights/init_checkpoint`). None trains from
      scratch: then nothing is frozen (the early convolutions train,
      whatever `freeze_early_convs` says), since frozen random kernels would
      stay random.
    init_checkpoint_modules: `all`, `backbone` or `backbone_fpn`.
    init_checkpoint_prefix: the seed's `checkpoint.prefix`
      (`RESNET_CHECKPOINT_PREFIX`, e.g. `resnet101/` for its ImageNet
      files); used by TF1 checkpoints only.
    gradient_clip_norm: global-norm clip; 0 = none (the reference).
    use_bfloat16: `mixed_bfloat16` policy; None = the engine's default
      (`use_bfloat16`).
    jit_compile: XLA for the TensorFlow engine's replica step; None = on
      for TPU only (the JAX engine always compiles).
    mask_eval_class: `all`, `voc` or `nonvoc` (cross-category evaluation).
    loss_explosion_factor: a step whose total loss exceeds this multiple of
      the run's reference loss stops training (`divergence.LossGuard`);
      0 stops on NaN / inf only.
    deterministic_input: deterministic input order (tests).
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
               deterministic_input=False):
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
    self.use_bfloat16 = use_bfloat16
    self.jit_compile = jit_compile
    self.mask_eval_class = mask_eval_class
    self.loss_explosion_factor = float(loss_explosion_factor)
    self.deterministic_input = deterministic_input


def use_bfloat16(settings, platform, default_platforms):
  """Whether the run computes in `mixed_bfloat16`.

  Args:
    settings: the run's `Settings`.
    platform: what the engine runs on: 'tpu', 'gpu' or 'cpu'.
    default_platforms: the engine's platforms where an unset
      `use_bfloat16` means on (its `BFLOAT16_PLATFORMS`: TPUs for the
      TensorFlow engine, TPUs and GPUs for the JAX engine).
  """
  if settings.use_bfloat16 is None:
    return platform in default_platforms
  return bool(settings.use_bfloat16)


def check_per_replica_batch_size(settings, use_sync_bn):
  """Checks `Experiment.per_replica_batch_size` against the global batch.

  Args:
    settings: the run's `Settings`.
    use_sync_bn: `build_shapemask_model.use_sync_bn` (its effective value).

  Raises:
    InvalidInputError: one line naming the numbers: not a positive integer,
      not dividing `train_batch_size`, or combined with sync batch norm
      (statistics over all replicas).
  """
  size = settings.per_replica_batch_size
  if size is None:
    return
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise InvalidInputError(
        f"Experiment.per_replica_batch_size={size!r} is not a positive "
        "integer (or None)")
  if settings.train_batch_size % size:
    raise InvalidInputError(
        f"train_batch_size={settings.train_batch_size} is not a multiple of "
        f"Experiment.per_replica_batch_size={size}")
  if use_sync_bn:
    raise InvalidInputError(
        f"Experiment.per_replica_batch_size={size} asks for batch-norm "
        "statistics over groups of that many images, but "
        "build_shapemask_model.use_sync_bn=True takes them over all "
        "replicas: unset one of the two")


def batch_groups(batch_size, per_replica_batch_size, what=None):
  """Groups of `per_replica_batch_size` images in a batch of `batch_size`.

  The group count of `ShapeMaskModel.set_batch_groups`: batch-norm
  statistics and loss normalisers over groups of `per_replica_batch_size`
  images.

  Args:
    batch_size: int, the images one normalising unit of the model sees.
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


def replica_groups(settings, replicas):
  """The model's group count when `replicas` normalise their batch apart.

  The TensorFlow engine's replicas each normalise their own share of the
  global batch; the JAX engine computes the global batch as one (SPMD):
  `replicas` = 1.

  Raises:
    InvalidInputError: the global batch does not split into the replicas,
      or the replica's batch into groups (one line naming the numbers).
  """
  check_divisible(settings.train_batch_size, "train_batch_size", replicas,
                  "replicas")
  per_replica = settings.train_batch_size // replicas
  what = None
  if replicas > 1:
    what = (f"the per-replica batch of {per_replica} images (train_batch_size="
            f"{settings.train_batch_size} over {replicas} replicas)")
  return batch_groups(per_replica, settings.per_replica_batch_size, what)


def check_divisible(batch_size, setting, parts, what):
  """Raises InvalidInputError unless `batch_size` splits into `parts`.

  Args:
    batch_size: int.
    setting: its setting's name (`train_batch_size`, `eval_batch_size`).
    parts: int, how many pieces the engine splits a batch into.
    what: their name in the message ('replicas', 'devices').
  """
  if batch_size % parts:
    raise InvalidInputError(
        f"{setting}={batch_size} is not a multiple of the {parts} {what}")
