"""What an init checkpoint restored: module sets, variable paths, the table.

Shared by every reader of init checkpoints (`checkpoints`, `tf1_checkpoints`)
so that all of them print and return the same table.
"""

import dataclasses

import tensorflow as tf

# Which top-level model attributes each `init_checkpoint_modules` value
# restores (None: all of them).
MODULES = {
    "all": None,
    "backbone": ("backbone",),
    "backbone_fpn": ("backbone", "decoder"),
}


@dataclasses.dataclass
class RestoreReport:
  """Outcome of a partial restore: one row per model variable.

  Attributes:
    restored: `[(path, shape)]` of the variables restored.
    skipped: `[(path, reason)]` of the variables left as they were.
    ignored: counts of the file's entries that no variable took, by kind
      (`global_step`, `optimizer slots`, `classifier`, `other`); empty
      when the reader does not count them.
    ignored_examples: a few of the `other` names.
  """
  restored: list
  skipped: list
  ignored: dict = dataclasses.field(default_factory=dict)
  ignored_examples: list = dataclasses.field(default_factory=list)

  def table(self):
    rows = [("restored", p, str(tuple(s))) for p, s in self.restored]
    rows += [("skipped", p, r) for p, r in self.skipped]
    width = max([len(r[1]) for r in rows] + [8])
    lines = [f"{'status':<9} {'variable':<{width}} shape / reason"]
    lines += [f"{a:<9} {b:<{width}} {c}" for a, b, c in rows]
    lines.append(f"{len(self.restored)} restored, {len(self.skipped)} skipped")
    if self.ignored:
      counts = ", ".join(f"{n} {kind}" for kind, n in self.ignored.items())
      line = f"ignored in the file: {counts}"
      if self.ignored_examples:
        line += f" (other: {', '.join(self.ignored_examples)}, ...)"
      lines.append(line)
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
