"""Reads the TF1 reference's name-based checkpoints into our model.

Three kinds of file come from the seed's code (tensorflow/tpu
`models/official/detection`), all name-based (`tf.train.Saver`), all read
here with `tf.train.load_checkpoint` only:

* **ImageNet backbone files**, the seed's `RESNET_CHECKPOINT`
  (`gs://cloud-tpu-checkpoints/shapemask/retinanet/resnet101-checkpoint-2018-02-24`;
  also `gs://cloud-tpu-checkpoints/retinanet/resnet50-checkpoint-2018-02-07`,
  which the seed does not name, and the `resnet-nhwc-*` checkpoints of the
  TF1 ResNet code). They hold root-level names (`conv2d/kernel`,
  `batch_normalization_7/moving_variance`, ...), a classifier `dense/*`,
  `global_step` and optimizer slots.
* **Whole-model checkpoints** of a ShapeMask run (`resnet50/...`, `fpn/...`,
  `retinanet/class_net/...`, `prior_mask/...`, `coarse_mask/...`,
  `fine_mask/...`).
* The `variables/` of a **TF1 SavedModel** exported by that code (a
  directory with `saved_model.pb`; the same names as a whole-model file).

`prefix` means what `checkpoint.prefix` means in the seed
(`modeling/base_model.py::build_assignment_map`): the reference takes the
graph variables whose names start with the prefix and looks each up in the
file **with the prefix removed**; `prefix=None` looks up the full names.
So the seed's ImageNet files load with `prefix='resnet101/'` (graph
`resnet101/conv2d/kernel` <- file `conv2d/kernel`), and whole-model files
and SavedModels with no prefix. The seed's code compiles the prefix as a
regular expression anchored at the start; the prefixes it uses are plain
scope names, taken literally here.

Unlike the reference, which skips without a word whatever it does not find
(and trains from scratch when the prefix matches nothing), this reader
fails with a message that names the file: a missing or unreadable path, a
prefix or module set that restores nothing (showing names the file does
hold), a ResNet of another depth, a tensor whose shape differs (except the
class-dependent predictors, which are skipped and listed when the class
count differs), and a module that the file holds only in part. The name
mapping is `tf1_names`.
"""

import re
import threading

import numpy as np
import tensorflow as tf

from official_shapemask.weights import errors
from official_shapemask.weights import paths
from official_shapemask.weights import restore_report
from official_shapemask.weights import tf1_names

# Seconds allowed for opening a checkpoint (for gs:// paths without a
# network, where TensorFlow's GCS client may retry for minutes).
OPEN_TIMEOUT_S = 60

_SLOT = re.compile(
    r"/(Momentum|ExponentialMovingAverage|Adam(_\d+)?|RMSProp(_\d+)?|"
    r"Adagrad|LARS|Ftrl(_\d+)?)$")
_CLASSIFIER = re.compile(r"^dense(_\d+)?/(kernel|bias)$")
_RESNET_SCOPE = re.compile(r"^resnet(\d+)/conv2d/kernel$")
_TF2_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def call_with_timeout(fn, timeout_s, what):
  """`fn()`, or `errors.CheckpointTimeoutError` naming `what` after `timeout_s`.

  The call runs in a daemon thread, which is left behind on timeout (a
  blocked network read cannot be cancelled from Python) and does not keep
  the process from exiting.
  """
  outcome = {}

  def run():
    try:
      outcome["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      outcome["error"] = e

  thread = threading.Thread(target=run, name="open-checkpoint", daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    raise errors.CheckpointTimeoutError(
        f"reading {what} did not finish within {timeout_s} s (no network "
        "access to it?)")
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


def _open(path):
  resolved = paths.resolve_checkpoint(path)
  reader = tf.train.load_checkpoint(resolved)
  return resolved, reader, reader.get_variable_to_shape_map()


def open_checkpoint(path, timeout_s=OPEN_TIMEOUT_S):
  """Resolves and opens a checkpoint: `(prefix, reader, name -> shape)`.

  Raises:
    FileNotFoundError: nothing at `path`.
    OSError: naming `path`, when it cannot be read
      (`errors.CheckpointTimeoutError` after `timeout_s`).
  """
  try:
    return call_with_timeout(lambda: _open(path), timeout_s, path)
  except (FileNotFoundError, errors.CheckpointTimeoutError):
    raise
  except (tf.errors.OpError, OSError, ValueError) as e:
    message = getattr(e, "message", None) or str(e)
    raise OSError(f"cannot read checkpoint {path}: "
                  f"{message.strip().splitlines()[0]}") from None


def is_name_based(shapes):
  """Whether a checkpoint's keys are TF1 graph names (no object graph)."""
  return _TF2_GRAPH_KEY not in shapes


def _lookup(name, prefix):
  """The file name the reference looks up for graph name `name`."""
  if not prefix:
    return name
  return name[len(prefix):] if name.startswith(prefix) else None


def _examples(names, count=6):
  names = sorted(names)
  shown = ", ".join(names[:count])
  return shown + (f", ... ({len(names)} in all)" if len(names) > count else "")


def _model_names(names):
  """File names that are not slots, steps or bookkeeping."""
  return [n for n in names if n != "global_step" and not _SLOT.search(n)
          and not n.startswith("_")]


def check_backbone(path, shapes, prefix, depth):
  """Fails, naming the file, when the backbone cannot come from it.

  Checks (from names only) that the reference's lookup of our stem finds
  it and that the file's ResNet has `depth`: an ImageNet file read without
  its prefix, a whole-model file read with one, a prefix that matches
  nothing, and another depth all fail here, before any tensor is read.

  Args:
    path: the checkpoint (for the messages).
    shapes: its name -> shape map.
    prefix: the reference's `checkpoint.prefix` (None: full names).
    depth: our ResNet depth.

  Raises:
    ValueError: naming `path`, the prefix and both depths where relevant.
  """
  scope = tf1_names.backbone_scope(depth)
  names = _model_names(shapes)
  stem = _lookup(scope + "conv2d/kernel", prefix)
  file_scopes = sorted({int(m.group(1)) for m in
                        map(_RESNET_SCOPE.match, names) if m})
  root_convs = tf1_names.root_conv_count(names)
  prefix_text = "no prefix" if not prefix else f"prefix {prefix!r}"

  def depth_text(count):
    found = tf1_names.depth_of_conv_count(count)
    return (f"ResNet-{found}" if found else "ResNet") + (
        f" ({count} convolutions)")

  if stem is None:
    raise ValueError(
        f"{path}: prefix {prefix!r} matches none of the model's backbone "
        "variables "
        f"(they are {scope}...: the model is ResNet-{depth}); for the "
        f"seed's ImageNet file of this depth use prefix {scope!r}")
  base = stem[:-len("conv2d/kernel")]
  if stem not in shapes:
    hint = ""
    if file_scopes and file_scopes != [depth]:
      hint = (f"; the file holds a ResNet-{file_scopes[0]} "
              f"(resnet{file_scopes[0]}/...), the model is ResNet-{depth}")
    elif file_scopes and prefix:
      hint = ("; it is a whole-model checkpoint (names start with "
              f"{scope}): read it with no prefix")
    elif root_convs and not prefix:
      hint = (f"; it holds root-level names (an ImageNet backbone file, a "
              f"{depth_text(root_convs)}): read it with prefix {scope!r}")
    raise ValueError(
        f"{path}: {prefix_text} restores nothing into the ResNet-{depth} "
        f"backbone (looked up {stem!r}); the file holds e.g. "
        f"{_examples(names)}{hint}")
  count = tf1_names.root_conv_count(names, base)
  expected = tf1_names.resnet_conv_count(depth)
  if count != expected:
    raise ValueError(
        f"{path} holds a {depth_text(count)} backbone under "
        f"{base or 'the root'!r}, but the model is ResNet-{depth} "
        f"({expected} convolutions)")


def _ignored_counts(unused):
  """Counts of the file's names that no restored variable used."""
  counts = {"global_step": 0, "optimizer slots": 0, "classifier": 0,
            "other": 0}
  other = []
  for name in unused:
    if name == "global_step" or name.endswith("/global_step"):
      counts["global_step"] += 1
    elif _SLOT.search(name):
      counts["optimizer slots"] += 1
    elif _CLASSIFIER.match(name):  # An ImageNet file's root-level classifier.
      counts["classifier"] += 1
    else:
      counts["other"] += 1
      other.append(name)
  return counts, other


def restore(model, path, prefix=None, modules="backbone", print_fn=print):
  """Restores `model` from a TF1 checkpoint; see the module docstring.

  Args:
    model: a built `ShapeMaskModel`.
    path: checkpoint prefix, a directory with a `checkpoint` file, or a
      SavedModel directory (its `variables/variables`).
    prefix: the reference's `checkpoint.prefix` (`resnet101/` for the
      seed's ImageNet files); None looks up the full graph names.
    modules: `all`, `backbone` or `backbone_fpn`.
    print_fn: where the restored/skipped table goes (None = silent).

  Returns:
    a `RestoreReport`; `ignored` counts the file's entries no variable took
    (global step, optimizer slots, classifier, other).

  Raises:
    FileNotFoundError, OSError: naming `path` (missing, unreadable).
    ValueError: naming `path`, when the file does not fit (see the module
      docstring).
  """
  module_sets = restore_report.MODULES
  if modules not in module_sets:
    raise ValueError(f"init_checkpoint_modules={modules!r} is not one of "
                     f"{sorted(module_sets)}")
  resolved, reader, shapes = open_checkpoint(path)
  if not is_name_based(shapes):
    raise ValueError(
        f"{path} is a TF2 object-based checkpoint, not a TF1 name-based one; "
        "restore it with checkpoints.restore_partial")
  depth = model.backbone.get_config()["depth"]
  wanted = module_sets[modules]
  if wanted is None or "backbone" in wanted:
    check_backbone(path, shapes, prefix, depth)
  try:  # The table's paths: TensorFlow's object paths, as restore_partial.
    object_paths = {id(v): p
                    for p, v in restore_report.model_variable_paths(model).items()}
  except AttributeError:  # Another Keras backend: Keras' variable paths.
    object_paths = {}
  report = restore_report.RestoreReport(restored=[], skipped=[])
  mismatched, used = [], set()
  found_in = {}  # module -> [found, missing names]
  assignments = []
  for entry in tf1_names.tf1_variables(model):
    our_path = object_paths.get(id(entry.variable), entry.variable.path)
    if wanted is not None and entry.module not in wanted:
      continue
    key = _lookup(entry.name, prefix)
    if key is None:
      report.skipped.append(
          (our_path, f"outside prefix {prefix!r} ({entry.name})"))
      continue
    counts = found_in.setdefault(entry.module, [0, []])
    if key not in shapes:
      counts[1].append(key)
      report.skipped.append((our_path, f"not in checkpoint ({key})"))
      continue
    counts[0] += 1
    used.add(key)
    theirs = tuple(shapes[key])
    ours = tuple(entry.variable.shape)
    stored = (1, 1) + theirs if entry.dense_to_conv else theirs
    if stored != ours:
      if entry.class_dependent:
        report.skipped.append(
            (our_path, f"class-dependent, shape differs: checkpoint {key} "
             f"{theirs} vs model {ours}"))
      else:
        mismatched.append(f"{key} {theirs} vs {our_path} {ours}")
      continue
    assignments.append((entry, key, our_path))
  if mismatched:
    raise ValueError(
        f"{path}: {len(mismatched)} tensor(s) have another shape than the "
        f"model's (another width or head size?): {_examples(mismatched, 3)}")
  partial = {m: c[1] for m, c in found_in.items() if c[0] and c[1]}
  if partial:
    module, missing = next(iter(partial.items()))
    raise ValueError(
        f"{path} holds the model's {module} only in part: "
        f"{len(missing)} of its variables are missing, e.g. "
        f"{_examples(missing, 3)}")
  if not assignments:
    raise ValueError(
        f"nothing restored from {path} ({'no prefix' if not prefix else 'prefix ' + repr(prefix)}"
        f", modules={modules}); the file holds e.g. "
        f"{_examples(_model_names(shapes))}")
  for entry, key, our_path in assignments:
    value = reader.get_tensor(key).astype(np.float32)
    if entry.dense_to_conv:
      value = value.reshape(tuple(entry.variable.shape))
    entry.variable.assign(value)
    report.restored.append((our_path, tuple(entry.variable.shape)))
  if wanted is None or "prior_head" in wanted:
    priors = getattr(model.prior_head, "shape_priors", None)
    if priors is not None:
      report.skipped.append(
          (object_paths.get(id(priors), priors.path),
           "not in TF1 checkpoints (comes from shape_prior_path)"))
  counts, other = _ignored_counts(set(shapes) - used)
  report.ignored = counts
  report.ignored_examples = sorted(other)[:5]
  if print_fn is not None:
    where = resolved if resolved == str(path) else f"{path} ({resolved})"
    print_fn(f"Restored from TF1 checkpoint {where} (prefix={prefix!r}, "
             f"modules={modules}):\n" + report.table())
  return report
