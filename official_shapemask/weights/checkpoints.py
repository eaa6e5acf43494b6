"""TensorFlow checkpoints and Keras weights files of our model.

Two sources initialise a model (`Experiment.init_checkpoint`):

* A ShapeMask training checkpoint, `tf.train.Checkpoint(model=...,
  optimizer=...)` (prefix or model directory). A TensorFlow checkpoint stores
  each variable once, under the shortest path through the object graph, so
  the key of a variable depends on what else was saved. Partial restore
  therefore walks the checkpoint's own object graph along the model's
  attribute path (`model/backbone/...`) to find each variable, and compares
  shapes before assigning: variables whose shape differs (class-dependent
  layers after a change of `num_classes`) are skipped and reported.
* A Keras weights file (`*.weights.h5`): the Keras 3 weights layout of a
  `keras.Model` whose attribute `backbone` is our ResNet (write one with
  `save_backbone_weights`), or of a whole `ShapeMaskModel.save_weights` file,
  whose `backbone/` and `decoder/` groups have the same layout. It
  initialises `backbone` or `backbone_fpn`; Keras checks names and shapes
  and any mismatch (another depth or width) fails naming the file.

`save_model_weights` (a whole model) and `save_backbone_weights` write such
files, under a temporary name first (`atomic`); `load_model_weights` reads a
whole model's. Which file a path names is `paths.resolve_checkpoint`.

Resuming (`restore_newest_readable`) restores the newest checkpoint of a
model directory that reads cleanly: a checkpoint whose files are truncated,
overwritten or missing is named, moved into `<model_dir>/unreadable/` (when
asked to) and the one before it is tried. `remove_interrupted_saves` deletes
what a killed save leaves behind (`ckpt-N_temp/` folders and temporary state
files).
"""

import os
import re
import tempfile

import keras
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from official_shapemask.weights import atomic
from official_shapemask.weights import errors
from official_shapemask.weights import paths
from official_shapemask.weights import restore_report
from official_shapemask.weights import tf1_checkpoints

MODULES = restore_report.MODULES
RestoreReport = restore_report.RestoreReport
model_variable_paths = restore_report.model_variable_paths
KERAS_WEIGHTS_SUFFIX = paths.KERAS_WEIGHTS_SUFFIX
is_keras_weights_file = paths.is_keras_weights_file


def _checkpoint_keys_by_path(path):
  """Reads a checkpoint's object graph: object path -> (key, shape)."""
  reader = tf.train.load_checkpoint(path)
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
  shapes = reader.get_variable_to_shape_map()
  found = {}
  # Breadth-first over all edges, so every path of length <= depth exists.
  frontier = [(0, "")]
  visited_paths = 0
  while frontier and visited_paths < 200000:
    next_frontier = []
    for node_id, prefix in frontier:
      node = graph.nodes[node_id]
      for attr in node.attributes:
        if attr.name == "VARIABLE_VALUE":
          found[prefix] = (attr.checkpoint_key, shapes.get(attr.checkpoint_key))
      for child in node.children:
        child_path = f"{prefix}/{child.local_name}" if prefix else (
            child.local_name)
        next_frontier.append((child.node_id, child_path))
        visited_paths += 1
    frontier = next_frontier
  return reader, found


class _ModuleWeights(keras.Model):
  """A keras.Model holding model parts under their ShapeMask attribute names.

  Its weights file has the layout of the same groups in a whole
  `ShapeMaskModel.save_weights` file (`backbone/...`, `decoder/...`).
  """

  def __init__(self, **modules):
    super().__init__(name="shapemask_modules")
    for name, layer in modules.items():
      setattr(self, name, layer)
    self.built = True


def save_backbone_weights(model_or_backbone, path):
  """Writes a Keras ResNet weights file (`*.weights.h5`) atomically.

  Args:
    model_or_backbone: a `ShapeMaskModel` (its backbone is written) or a
      built ResNet backbone.
    path: destination ending in `.weights.h5`.

  Returns:
    `path`.
  """
  if not is_keras_weights_file(path):
    raise ValueError(f"a Keras weights file must end in "
                     f"{KERAS_WEIGHTS_SUFFIX}: {path}")
  backbone = getattr(model_or_backbone, "backbone", model_or_backbone)
  return atomic.write_file(path, _ModuleWeights(backbone=backbone).save_weights)


def restore_keras_weights(model, path, modules="backbone", print_fn=print):
  """Initialises the backbone (and FPN) from a Keras `*.weights.h5` file.

  Args:
    model: a built `ShapeMaskModel`.
    path: the weights file (see the module docstring for its layout).
    modules: `backbone` or `backbone_fpn`.
    print_fn: where the restored table goes (None = silent).

  Returns:
    a `RestoreReport` (every variable of the modules restored).

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the file, for `modules='all'` or when the file's
      layout or shapes do not match the model's modules.
  """
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"Keras weights file not found: {path}")
  if modules not in ("backbone", "backbone_fpn"):
    raise ValueError(
        f"init_checkpoint_modules={modules!r}: the Keras weights file {path} "
        "initialises 'backbone' or 'backbone_fpn'; use a ShapeMask training "
        "checkpoint for 'all'")
  names = MODULES[modules]
  holder = _ModuleWeights(**{n: getattr(model, n) for n in names})
  try:
    holder.load_weights(path)
  except ValueError as e:
    raise ValueError(
        f"Keras weights file {path} does not match the model's {modules} "
        f"(backbone {model.backbone.get_config().get('depth')}-deep): "
        f"{str(e).splitlines()[0]}") from e
  report = RestoreReport(restored=[], skipped=[])
  for var_path, variable in model_variable_paths(model).items():
    if var_path.split("/")[1] in names:
      report.restored.append((var_path, tuple(variable.shape)))
  if print_fn is not None:
    print_fn(f"Restored from {path} (modules={modules}):\n" + report.table())
  return report


# Entries that make a directory a training run's model directory (a
# TensorFlow checkpoint list, the JAX engine's Orbax folder, the run's
# operative config).
_RUN_MARKERS = ("checkpoint", "checkpoints", "config.gin")


def check_output(output_path):
  """Refuses an output inside a training run's model directory.

  A converted checkpoint written there could replace the run's own
  checkpoint files (`ckpt-N.*`, `shapemask-N.weights.h5`).

  Raises:
    ValueError: one line naming the output and what marks the directory.
  """
  directory = os.path.dirname(output_path) or "."
  found = [name for name in _RUN_MARKERS
           if tf.io.gfile.exists(os.path.join(directory, name))]
  if found:
    raise ValueError(
        f"--output={output_path} would write into {directory}, a training "
        f"run's model directory (it holds {', '.join(found)}), and could "
        "replace its checkpoints; give a path in another directory")


def save_model_weights(model, output_path):
  """Writes our weights atomically; returns the files written.

  `*.weights.h5` (recommended): a Keras weights file with every variable;
  loads on every backend (`model.load_weights`), no TensorFlow needed.

  Anything else: a `tf.train.Checkpoint(model=model)` prefix. Under Keras 3
  TensorFlow's object graph does not follow layers held in Python lists or
  dicts (ResNet blocks, FPN levels, head towers), so such a checkpoint would
  lack most variables; it is written only when it holds every one of them,
  otherwise ValueError names the shortfall. An output inside a training
  run's model directory is refused (`check_output`).
  """
  check_output(output_path)
  if is_keras_weights_file(output_path):
    return [atomic.write_file(output_path, model.save_weights)]
  root = tf.train.Checkpoint(model=model)
  # Created now so the file holds it: `export.restore_model` (and any
  # `restore(...).assert_existing_objects_matched()`) expects every object
  # of a `tf.train.Checkpoint`, the save counter included.
  _ = root.save_counter

  def write(tmp):
    root.write(tmp)
    saved = [name for name, _ in tf.train.list_variables(tmp)
             if name.endswith("VARIABLE_VALUE")]
    if len(saved) < len(model.weights):
      raise ValueError(
          f"a tf.train.Checkpoint of this model holds {len(saved)} of its "
          f"{len(model.weights)} variables (layers kept in lists/dicts are "
          f"not tracked by TensorFlow under Keras 3); write "
          f"{output_path}.weights.h5 instead")

  return atomic.write_prefix(output_path, write)


def restore_tf1_checkpoint(model, path, prefix=None, modules="backbone",
                           print_fn=print):
  """Restores `model` from a TF1 name-based checkpoint of the seed's code.

  The seed's ImageNet backbone files (root-level names; `prefix` is the
  seed's `checkpoint.prefix`, e.g. `resnet101/`), whole-model checkpoints
  and TF1 SavedModel directories (no prefix). See `tf1_checkpoints` for
  the name mapping, the prefix semantics and the errors.

  Args:
    model: a built `ShapeMaskModel`.
    path: checkpoint prefix, checkpoint directory or SavedModel directory.
    prefix: graph scope stripped before the lookup (None: full names).
    modules: `all`, `backbone` or `backbone_fpn`.
    print_fn: where the restored/skipped table goes (None = silent).

  Returns:
    a `RestoreReport`.
  """
  return tf1_checkpoints.restore(model, path, prefix=prefix, modules=modules,
                                 print_fn=print_fn)


def load_model_weights(model, path):
  """Loads a whole model's Keras weights file (local or gs://).

  Raises:
    ValueError: naming the file, when its layout or shapes differ from the
      model's, or when it cannot be read (truncated, overwritten: HDF5
      reports it as an OSError).
  """
  with tempfile.TemporaryDirectory() as scratch:
    local = path
    if not os.path.exists(path):  # A remote (gs://) file: copy it first.
      local = os.path.join(scratch, "model" + KERAS_WEIGHTS_SUFFIX)
      tf.io.gfile.copy(path, local)
    try:
      model.load_weights(local)
    except (OSError, KeyError, RuntimeError) as e:
      # h5py: "Unable to synchronously open file (truncated file ...)",
      # a damaged object or dataset.
      raise ValueError(
          f"weights file {path} cannot be read ({errors.first_line(e)}); write it "
          "again (a JAX run writes it when it reaches its total steps) or "
          "give another one") from None
    except ValueError as e:
      raise ValueError(
          f"weights file {path} does not match the model built from the gin "
          f"config (same gin files and bindings as in training?): "
          f"{str(e).splitlines()[0]}") from e
  return path


def restore_partial(model, checkpoint_path, modules="all", print_fn=print):
  """Restores matching variables of `model` from a ShapeMask checkpoint.

  A `*.weights.h5` path goes to `restore_keras_weights`. Variables whose
  shape differs (e.g. class-dependent layers when the number of classes
  changed) or that the checkpoint lacks are skipped and reported.

  Args:
    model: a built `ShapeMaskModel`.
    checkpoint_path: checkpoint prefix or directory.
    modules: `all`, `backbone` or `backbone_fpn`.
    print_fn: where the restored/skipped table goes (None = silent).

  Returns:
    a `RestoreReport`.
  """
  if modules not in MODULES:
    raise ValueError(f"init_checkpoint_modules={modules!r} is not one of "
                     f"{sorted(MODULES)}")
  if is_keras_weights_file(checkpoint_path):
    return restore_keras_weights(model, checkpoint_path, modules, print_fn)
  checkpoint_path = paths.resolve_checkpoint(checkpoint_path)
  reader, keys = _checkpoint_keys_by_path(checkpoint_path)
  wanted = MODULES[modules]
  report = RestoreReport(restored=[], skipped=[])
  for path, variable in model_variable_paths(model).items():
    top = path.split("/")[1] if "/" in path else path
    if wanted is not None and top not in wanted:
      continue
    if path not in keys:
      report.skipped.append((path, "not in checkpoint"))
      continue
    key, shape = keys[path]
    ours = tuple(variable.shape)
    if tuple(shape) != ours:
      report.skipped.append(
          (path, f"shape differs: checkpoint {tuple(shape)} vs model {ours}"))
      continue
    variable.assign(reader.get_tensor(key))
    report.restored.append((path, ours))
  if not report.restored:
    raise ValueError(
        f"nothing restored from {checkpoint_path} (modules={modules}): is it "
        "a ShapeMask training checkpoint?")
  if print_fn is not None:
    print_fn(f"Restored from {checkpoint_path} (modules={modules}):\n"
             + report.table())
  return report


UNREADABLE_DIR = "unreadable"
# What a save killed before it finished leaves: TensorFlow's per-save
# staging folder `<prefix>_temp/` and the checkpoint state file's
# temporary copy.
_INTERRUPTED_SAVE = re.compile(r"(.+-\d+_temp|checkpoint\.tmp[0-9a-f]+)")
# What TensorFlow writes inside a staging folder: `part-<shard>` files.
_STAGED_PART = re.compile(r"part-\d+-of-\d+(\.index|\.data-\d+-of-\d+)?")


def _is_interrupted_save(directory, name):
  """A killed save's leftover: a state-file copy, or a staging folder that
  holds nothing but TensorFlow's `part-*` files (anything else in it is
  not ours to delete)."""
  if not _INTERRUPTED_SAVE.fullmatch(name):
    return False
  path = os.path.join(directory, name)
  if not tf.io.gfile.isdir(path):
    return name.startswith("checkpoint.tmp")
  return all(_STAGED_PART.fullmatch(entry.rstrip("/"))
             for entry in tf.io.gfile.listdir(path))


def remove_interrupted_saves(directory):
  """Deletes the leftovers of killed saves in `directory`; returns them.

  Only call it where no save is in progress (before a run starts saving).
  """
  if not tf.io.gfile.isdir(directory):
    return []
  removed = []
  for name in sorted(tf.io.gfile.listdir(directory)):
    name = name.rstrip("/")
    if not _is_interrupted_save(directory, name):
      continue
    path = os.path.join(directory, name)
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    else:
      tf.io.gfile.remove(path)
    removed.append(path)
  return removed


# Errors that say nothing about the checkpoint's files (a storage service
# unreachable or refusing): re-raised, never taken for damage.
_NOT_DAMAGE = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
               tf.errors.AbortedError, tf.errors.CancelledError,
               tf.errors.ResourceExhaustedError,
               tf.errors.PermissionDeniedError,
               tf.errors.UnauthenticatedError)


def _checkpoint_files(prefix):
  return tf.io.gfile.glob(prefix + ".index") + tf.io.gfile.glob(
      prefix + ".data-*")


def _free_prefix(target, name):
  """`target/name`, or `target/name.2`, ... when files of it exist there."""
  prefix, n = os.path.join(target, name), 1
  while tf.io.gfile.glob(prefix + ".*"):
    n += 1
    prefix = os.path.join(target, f"{name}.{n}")
  return prefix


def _move_unreadable(directory, prefixes, state):
  """Moves `prefixes`' files to `directory/unreadable/`; rewrites the state.

  Nothing there is replaced: a checkpoint whose name was moved before (the
  same step saved and damaged again) goes in as `<name>.2`, ... (still a
  checkpoint prefix with its `.index` and `.data-*` files).

  Returns:
    {prefix: the prefix it was moved to}.
  """
  target = os.path.join(directory, UNREADABLE_DIR)
  tf.io.gfile.makedirs(target)
  moved = {}
  for prefix in prefixes:
    new_prefix = _free_prefix(target, os.path.basename(prefix))
    for path in _checkpoint_files(prefix):
      tf.io.gfile.rename(path, new_prefix + path[len(prefix):],
                         overwrite=False)
    moved[prefix] = new_prefix
  gone = set(prefixes)
  paths = list(state.all_model_checkpoint_paths)
  times = list(state.all_model_checkpoint_timestamps)
  keep = [i for i, p in enumerate(paths) if p not in gone]
  kept_paths = [os.path.basename(paths[i]) for i in keep]
  if kept_paths:
    tf.compat.v1.train.update_checkpoint_state(
        directory, kept_paths[-1], all_model_checkpoint_paths=kept_paths,
        all_model_checkpoint_timestamps=(
            [times[i] for i in keep] if len(times) == len(paths) else None),
        last_preserved_timestamp=state.last_preserved_timestamp)
  else:
    tf.io.gfile.remove(os.path.join(directory, "checkpoint"))
  return moved


class _Unreadable(Exception):
  """A checkpoint's files cannot be read (internal to this module)."""


def _restore(checkpoint, prefix, directory):
  """Restores `prefix`; raises _Unreadable or CheckpointError (mismatch)."""
  try:
    if not tf.io.gfile.glob(prefix + ".index"):
      raise FileNotFoundError(f"{prefix}.index does not exist")
    status = checkpoint.restore(prefix)
    status.expect_partial()
    status.assert_existing_objects_matched()
  except _NOT_DAMAGE:
    raise
  except (IndexError, FileNotFoundError, tf.errors.OpError) as e:
    # Truncated data reads short (IndexError), overwritten bytes fail the
    # checksum (DataLossError), a missing or damaged file is an OpError.
    raise _Unreadable(errors.first_line(e)) from None
  except (AssertionError, ValueError) as e:
    raise errors.CheckpointError(
        f"checkpoint {prefix} does not match the model and optimizer built "
        f"from the gin config (the gin files and bindings of the run that "
        f"wrote it are in {os.path.join(directory, 'config.gin')}): "
        f"{errors.first_line(e)}") from None


def restore_checkpoint(checkpoint, prefix):
  """Restores one checkpoint into `checkpoint`'s (built) objects.

  Raises:
    CheckpointError: naming `prefix`, when it cannot be read or does not
      match the objects.
  """
  try:
    _restore(checkpoint, prefix, os.path.dirname(prefix))
  except _Unreadable as e:
    raise errors.CheckpointError(
        f"checkpoint {prefix} cannot be read ({e})") from None


def restore_newest_readable(checkpoint, directory, move_unreadable=False,
                            print_fn=print):
  """Restores the newest checkpoint of `directory` that reads cleanly.

  Checkpoints are tried newest first. One that cannot be read (truncated or
  overwritten data, a missing file) is reported and, with
  `move_unreadable`, its files are moved into `directory/unreadable/` and
  dropped from the directory's checkpoint list, so that the next save and
  every reader see the readable ones only.

  Args:
    checkpoint: a `tf.train.Checkpoint` whose objects all exist (built).
    directory: the model directory (its `checkpoint` state file lists the
      checkpoints).
    move_unreadable: bool, move unreadable checkpoints aside (training;
      an evaluation leaves the directory alone).
    print_fn: where the report of unreadable checkpoints goes (None =
      silent).

  Returns:
    the restored prefix, or None when the directory lists no checkpoint.

  Raises:
    CheckpointError: naming the checkpoint, when the newest readable one
      does not match the objects (another model or gin config), or naming
      every one when none can be read.
  """
  state = tf.train.get_checkpoint_state(directory)
  if state is None:
    return None
  prefixes = list(state.all_model_checkpoint_paths)
  if state.model_checkpoint_path and (
      state.model_checkpoint_path not in prefixes):
    prefixes.append(state.model_checkpoint_path)
  if not prefixes:
    return None
  unreadable = []
  restored = None
  for prefix in reversed(prefixes):
    try:
      _restore(checkpoint, prefix, directory)
    except _Unreadable as e:
      unreadable.append((prefix, str(e)))
      continue
    restored = prefix
    break
  if restored is None:
    details = "; ".join(f"{p} ({why})" for p, why in unreadable)
    raise errors.CheckpointError(
        f"no checkpoint in {directory} can be read: {details}. Move them "
        f"away to start from scratch, or restore them from a copy")
  if unreadable:
    moved = {}
    if move_unreadable:
      moved = _move_unreadable(directory, [p for p, _ in unreadable], state)
    for prefix, why in unreadable if print_fn is not None else ():
      where = ""
      if prefix in moved:
        target = os.path.dirname(moved[prefix])
        renamed = os.path.basename(moved[prefix])
        where = (f" moved to {target}"
                 + ("" if renamed == os.path.basename(prefix) else
                    f" as {renamed}") + ";")
      print_fn(f"Checkpoint {prefix} cannot be read ({why});{where} "
               f"using {restored} instead")
  return restored
