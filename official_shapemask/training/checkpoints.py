"""Checkpoint paths and partial restore for fine-tuning.

Training checkpoints are `tf.train.Checkpoint(model=..., optimizer=...)`.
A TensorFlow checkpoint stores each variable once, under the shortest path
through the object graph, so the key of a variable depends on what else was
saved. Partial restore therefore walks the checkpoint's own object graph
along the model's attribute path (`model/backbone/...`) to find each
variable, and compares shapes before assigning.
"""

import dataclasses

import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

# Which top-level model attributes each `init_checkpoint_modules` value
# restores.
MODULES = {
    "all": None,
    "backbone": ("backbone",),
    "backbone_fpn": ("backbone", "decoder"),
}


@dataclasses.dataclass
class RestoreReport:
  """Outcome of a partial restore: one row per model variable."""
  restored: list  # [(path, shape)]
  skipped: list  # [(path, reason)]

  def table(self):
    rows = [("restored", p, str(tuple(s))) for p, s in self.restored]
    rows += [("skipped", p, r) for p, r in self.skipped]
    width = max([len(r[1]) for r in rows] + [8])
    lines = [f"{'status':<9} {'variable':<{width}} shape / reason"]
    lines += [f"{a:<9} {b:<{width}} {c}" for a, b, c in rows]
    lines.append(f"{len(self.restored)} restored, {len(self.skipped)} skipped")
    return "\n".join(lines)


def _is_variable(obj):
  return isinstance(obj, tf.Variable) or isinstance(
      getattr(obj, "_value", None), tf.Variable)


def model_variable_paths(model, root_name="model"):
  """Maps `model/<attr>/.../<var>` object paths to the model's variables."""
  out, seen = {}, set()

  def walk(obj, path):
    if id(obj) in seen:
      return
    seen.add(id(obj))
    if _is_variable(obj):
      out[path] = obj
      return
    children = obj._trackable_children(save_type="checkpoint")  # pylint: disable=protected-access
    for name, child in children.items():
      walk(child, f"{path}/{name}")

  walk(model, root_name)
  return out


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


def resolve_checkpoint(path):
  """A checkpoint prefix from a file prefix or a model directory."""
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise FileNotFoundError(f"no checkpoint found in directory {path}")
    return latest
  if not tf.io.gfile.glob(path + ".index") and not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  return path


def restore_partial(model, checkpoint_path, modules="all", print_fn=print):
  """Restores matching variables of `model` from a ShapeMask checkpoint.

  Variables whose shape differs (e.g. class-dependent layers when the number
  of classes changed) or that the checkpoint lacks are skipped and reported.

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
  checkpoint_path = resolve_checkpoint(checkpoint_path)
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
