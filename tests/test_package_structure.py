"""The package's import graph: layering, no private imports, no cycles.

Reads the source with `ast` (nothing is imported), so it also covers imports
made inside functions.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "official_shapemask"
# Model code runs under any Keras backend and knows nothing of the data,
# training, evaluation or serving code.
MODEL_PARTS = ("modeling", "ops", "losses")
NOT_FOR_MODEL = ("dataloaders", "training", "evaluation", "serving")


def _module_name(path):
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules():
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path):
  """(imported module, names) pairs and private attributes used on them."""
  tree = ast.parse(path.read_text(), filename=str(path))
  modules, aliases = [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        modules.append((alias.name, ()))
        aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = tuple(a.name for a in node.names)
      modules.append((node.module, names))
      for a in node.names:
        # `from package import module` binds a module.
        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
  private = set()
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and aliases[node.value.id].startswith("official_shapemask")):
      private.add(f"{aliases[node.value.id]}.{node.attr}")
  return modules, private


def _package_edges():
  known = _modules()
  edges = {}
  for name, path in known.items():
    targets = set()
    for module, names in _imports(path)[0]:
      if not module.startswith("official_shapemask"):
        continue
      # `from official_shapemask.x import y`: y may be a module of x.
      subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in known]
      targets.update(subs or ([module] if module in known else []))
    targets.discard(name)
    edges[name] = targets
  return edges


@pytest.mark.parametrize("part", MODEL_PARTS)
def test_model_code_imports_no_data_training_or_tensorflow(part):
  offenders = []
  for name, path in _modules().items():
    if not name.startswith(f"official_shapemask.{part}"):
      continue
    for module, _ in _imports(path)[0]:
      top = module.split(".")
      if top[0] in ("tensorflow", "tf_keras", "official") or (
          top[0] == "official_shapemask" and len(top) > 1
          and top[1] in NOT_FOR_MODEL):
        offenders.append(f"{name} imports {module}")
  assert not offenders, offenders


def test_no_private_names_used_across_modules():
  offenders = []
  for name, path in _modules().items():
    modules, private = _imports(path)
    offenders += [f"{name} uses {p}" for p in sorted(private)]
    for module, names in modules:
      if module.startswith("official_shapemask"):
        offenders += [f"{name} imports {module}.{n}" for n in names
                      if n.startswith("_") and not n.startswith("__")]
  assert not offenders, offenders


def test_no_import_cycles():
  edges = _package_edges()
  cycles = []
  state = {}

  def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack)
    stack.pop()
    state[node] = "done"

  for node in sorted(edges):
    if node not in state:
      visit(node, [])
  assert not cycles, [" -> ".join(c) for c in cycles]


def test_checker_sees_a_cycle_and_a_private_import(tmp_path):
  """The checks above would fail on the patterns they guard against."""
  source = tmp_path / "m.py"
  source.write_text("from official_shapemask.dataloaders import shapemask_parser"
                    "\nshapemask_parser._pad_or_clip(1, 2, 3)\n")
  _, private = _imports(source)
  assert private == {"official_shapemask.dataloaders.shapemask_parser."
                     "_pad_or_clip"}
