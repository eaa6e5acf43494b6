"""Import graph of the package, tools/ and train.py: layers, privacy, cycles.

Reads the source with `ast` (nothing is imported), so it also covers imports
made inside functions. The layers, lowest first (a module imports its own
folder and lower layers only; folders of one layer do not import each
other):

  0 official_shapemask/*.py (quiet_logs)
  1 ops, losses               model code: keras.ops only, no TensorFlow
  2 modeling
  3 dataloaders, evaluation, data_prep
  4 weights                   weights I/O
  5 training
  6 serving
  7 cli                       the programs
  8 tools/, train.py          launchers and the benchmark tooling

Every check is a function of a source root, so the tests at the end run them
on planted violations (a synthetic tree, and a copy of the real one) and
show that each one fails when it should.
"""
import ast
import pathlib
import shutil

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "official_shapemask"
RANKS = {
    "base": 0,
    "ops": 1, "losses": 1,
    "modeling": 2,
    "dataloaders": 3, "evaluation": 3, "data_prep": 3,
    "weights": 4,
    "training": 5,
    "serving": 6,
    "cli": 7,
    "tools": 8,
}
MODEL_GROUPS = ("ops", "losses", "modeling")
NOT_IN_MODEL_CODE = ("tensorflow", "tf_keras", "official")
# Modules whose absence means the scan looked in the wrong place.
ANCHORS = ("official_shapemask.modeling.shapemask_model",
           "official_shapemask.cli.train", "official_shapemask.weights.paths",
           "tools.predict", "tools.bench.benchmark", "train")


# ---------------------------------------------------------------- the scan
def source_files(root):
  """`{module name: path}` of the package, tools/ and train.py under root."""
  root = pathlib.Path(root)
  paths = sorted((root / PACKAGE).rglob("*.py")) + sorted(
      (root / "tools").rglob("*.py"))
  if (root / "train.py").is_file():
    paths.append(root / "train.py")
  out = {}
  for path in paths:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def group_of(name):
  """The layer folder of module `name` (None: not in any layer)."""
  parts = name.split(".")
  if parts[0] in ("tools", "train"):
    return "tools"
  if parts[0] != PACKAGE:
    return None
  if len(parts) == 1:
    return "base"
  if len(parts) == 2 and parts[1] not in RANKS:  # A root-level module.
    return "base"
  return parts[1] if parts[1] in RANKS else None


def _is_package(path):
  return path.name == "__init__.py"


class _Module:
  """What one source file imports and which private names it reaches."""

  def __init__(self, name, path, known):
    self.name = name
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if _is_package(path) else name.rpartition(".")[0]
    self.imports = []  # (module, line), every import statement.
    self.edges = set()  # modules of `known` it imports.
    self.private = set()  # `module.attr..._private` it uses.
    self.sys_path = []  # lines that touch sys.path.
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          self._add(alias.name, node.lineno, known)
          if alias.asname:
            aliases[alias.asname] = alias.name
          else:
            top = alias.name.split(".")[0]
            aliases[top] = top
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          anchor = package.split(".")
          anchor = anchor[:len(anchor) - node.level + 1]
          base = ".".join(anchor + ([base] if base else []))
        subs = []
        for alias in node.names:
          target = f"{base}.{alias.name}"
          aliases[alias.asname or alias.name] = target
          if target in known:
            subs.append(target)
          if _is_private(alias.name) and base.split(".")[0] in (
              PACKAGE, "tools"):
            self.private.add(target)
        if subs:
          for target in subs:
            self._add(target, node.lineno, known)
        else:
          self._add(base, node.lineno, known)
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute):
        chain = _chain(node)
        if chain and chain[0] == "sys" and aliases.get("sys") == "sys" and (
            len(chain) > 1 and chain[1] == "path"):
          self.sys_path.append(node.lineno)
        if chain and chain[0] in aliases:
          self._check_private(aliases[chain[0]].split(".") + chain[1:], known)
    self.sys_path = sorted(set(self.sys_path))

  def _add(self, module, line, known):
    self.imports.append((module, line))
    if module in known and module != self.name:
      self.edges.add(module)

  def _check_private(self, parts, known):
    if parts[0] not in (PACKAGE, "tools", "train"):
      return
    # The longest prefix that is a module; private names after it.
    for end in range(len(parts), 0, -1):
      if ".".join(parts[:end]) in known:
        break
    else:
      return
    if ".".join(parts[:end]) == self.name:
      return
    for i in range(end, len(parts)):
      if _is_private(parts[i]):
        self.private.add(".".join(parts[:i + 1]))
        return


def _is_private(name):
  return name.startswith("_") and not name.startswith("__")


def _chain(node):
  """`a.b.c` of an attribute chain rooted at a name, as `[a, b, c]`."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return [node.id] + parts[::-1]


def scan(root):
  known = source_files(root)
  return {name: _Module(name, path, known) for name, path in known.items()}


# ---------------------------------------------------------------- the checks
def found_problems(modules):
  """Why the scan cannot be trusted: nothing found, or unplaced modules."""
  problems = [f"no module found for the layer {g!r}" for g in RANKS
              if not any(group_of(n) == g for n in modules)]
  problems += [f"{a} not found" for a in ANCHORS if a not in modules]
  problems += [f"{n} is in no layer (add its folder to RANKS)"
               for n in sorted(modules) if group_of(n) is None]
  return problems


def layer_violations(modules):
  out = []
  for name, module in sorted(modules.items()):
    mine = group_of(name)
    for target in sorted(module.edges):
      theirs = group_of(target)
      if mine is None or theirs is None or theirs == mine:
        continue
      if RANKS[theirs] >= RANKS[mine]:
        out.append(f"{name} ({mine}, layer {RANKS[mine]}) imports {target} "
                   f"({theirs}, layer {RANKS[theirs]})")
  return out


def model_code_violations(modules):
  out = []
  for name, module in sorted(modules.items()):
    if group_of(name) in MODEL_GROUPS:
      out += [f"{name} imports {m} (line {line})"
              for m, line in module.imports
              if m.split(".")[0] in NOT_IN_MODEL_CODE]
  return out


def private_violations(modules):
  return [f"{name} uses {p}" for name, module in sorted(modules.items())
          for p in sorted(module.private)]


def sys_path_violations(modules):
  return [f"{name} touches sys.path (line {line})"
          for name, module in sorted(modules.items())
          for line in module.sys_path]


def import_cycles(modules):
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(modules[node].edges):
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, stack)
    stack.pop()
    state[node] = "done"

  for node in sorted(modules):
    if node not in state:
      visit(node, [])
  return cycles


# ---------------------------------------------------------------- this tree
@pytest.fixture(scope="module")
def modules():
  return scan(REPO_ROOT)


def test_the_scan_finds_every_layer_and_places_every_module(modules):
  assert not found_problems(modules), found_problems(modules)
  # The imports are read: edges the code is known to have.
  assert "official_shapemask.cli.train" in modules["train"].edges
  assert ("official_shapemask.weights.checkpoints" in modules[
      "official_shapemask.training.engines.tensorflow_engine"].edges)
  assert ("official_shapemask.modeling.shapemask_model"
          in modules["official_shapemask.modeling.factory"].edges)


def test_layer_order(modules):
  assert not layer_violations(modules), layer_violations(modules)


def test_model_code_imports_no_tensorflow(modules):
  assert not model_code_violations(modules), model_code_violations(modules)


def test_no_private_names_used_across_modules(modules):
  assert not private_violations(modules), private_violations(modules)


def test_no_sys_path_edits(modules):
  assert not sys_path_violations(modules), sys_path_violations(modules)


def test_no_import_cycles(modules):
  assert not import_cycles(modules), import_cycles(modules)


# ---------------------------------------------------------------- planted
def _write(root, files):
  for relative, text in files.items():
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _minimal_tree(root):
  """One module per layer, each importing the one below: every check passes."""
  files = {f"{PACKAGE}/__init__.py": "", f"{PACKAGE}/quiet_logs.py": "",
           "train.py": f"from {PACKAGE}.cli import train\n",
           "tools/__init__.py": "", "tools/predict.py": "",
           "tools/bench/__init__.py": "", "tools/bench/benchmark.py": ""}
  below = f"{PACKAGE}.quiet_logs"
  for group in sorted(RANKS, key=RANKS.get):
    if group in ("base", "tools"):
      continue
    files[f"{PACKAGE}/{group}/__init__.py"] = ""
    files[f"{PACKAGE}/{group}/m.py"] = f"import keras\nimport {below}\n"
  for anchor in ANCHORS:
    if anchor.startswith(PACKAGE):
      files[anchor.replace(".", "/") + ".py"] = "import keras\n"
  _write(root, files)
  return root


def test_planted_tree_without_violations_passes(tmp_path):
  modules = scan(_minimal_tree(tmp_path))
  assert not found_problems(modules), found_problems(modules)
  for check in (layer_violations, model_code_violations, private_violations,
                sys_path_violations, import_cycles):
    assert not check(modules), (check.__name__, check(modules))


def test_a_wrong_path_or_an_unplaced_folder_fails(tmp_path):
  empty = scan(tmp_path / "nowhere")
  assert not empty
  assert "no module found for the layer 'modeling'" in found_problems(empty)
  _write(_minimal_tree(tmp_path), {f"{PACKAGE}/extras/thing.py": ""})
  assert found_problems(scan(tmp_path)) == [
      f"{PACKAGE}.extras.thing is in no layer (add its folder to RANKS)"]


@pytest.mark.parametrize("relative,text,expected", [
    (f"{PACKAGE}/ops/up.py", f"from {PACKAGE}.modeling import m\n",
     f"{PACKAGE}.ops.up (ops, layer 1) imports {PACKAGE}.modeling.m "
     "(modeling, layer 2)"),
    (f"{PACKAGE}/dataloaders/up.py",
     f"def f():\n  import {PACKAGE}.training.m\n",
     f"{PACKAGE}.dataloaders.up (dataloaders, layer 3) imports "
     f"{PACKAGE}.training.m (training, layer 5)"),
    (f"{PACKAGE}/serving/up.py", f"from {PACKAGE}.cli.m import main\n",
     f"{PACKAGE}.serving.up (serving, layer 6) imports {PACKAGE}.cli.m "
     "(cli, layer 7)"),
    (f"{PACKAGE}/evaluation/side.py", f"from {PACKAGE}.data_prep import m\n",
     f"{PACKAGE}.evaluation.side (evaluation, layer 3) imports "
     f"{PACKAGE}.data_prep.m (data_prep, layer 3)"),
    (f"{PACKAGE}/cli/up.py", "import tools.predict\n",
     f"{PACKAGE}.cli.up (cli, layer 7) imports tools.predict (tools, layer 8)"),
])
def test_layer_check_fails_on_a_planted_upward_import(tmp_path, relative,
                                                      text, expected):
  _write(_minimal_tree(tmp_path), {relative: text})
  assert layer_violations(scan(tmp_path)) == [expected]


def test_model_code_check_fails_on_planted_tensorflow(tmp_path):
  _write(_minimal_tree(tmp_path), {
      f"{PACKAGE}/losses/tf.py": "def f():\n  import tensorflow as tf\n",
      f"{PACKAGE}/modeling/mg.py": "from official.vision import ops\n",
      f"{PACKAGE}/dataloaders/ok.py": "import tensorflow\n"})
  assert model_code_violations(scan(tmp_path)) == [
      f"{PACKAGE}.losses.tf imports tensorflow (line 2)",
      f"{PACKAGE}.modeling.mg imports official.vision (line 1)"]


@pytest.mark.parametrize("text,expected", [
    (f"from {PACKAGE}.ops import m\nm._hidden()\n", f"{PACKAGE}.ops.m._hidden"),
    (f"from {PACKAGE}.ops.m import _hidden\n", f"{PACKAGE}.ops.m._hidden"),
    (f"import {PACKAGE}.ops.m\n{PACKAGE}.ops.m._hidden()\n",
     f"{PACKAGE}.ops.m._hidden"),
    (f"import {PACKAGE}.ops.m as alias\nalias._TABLE['x']\n",
     f"{PACKAGE}.ops.m._TABLE"),
    (f"from {PACKAGE} import ops\nops.m._hidden.value\n",
     f"{PACKAGE}.ops.m._hidden"),
    (f"from {PACKAGE}.ops.m import Thing\nThing._cache.clear()\n",
     f"{PACKAGE}.ops.m.Thing._cache"),
    ("from . import m\nm._hidden()\n", f"{PACKAGE}.modeling.m._hidden"),
])
def test_private_check_fails_on_planted_private_access(tmp_path, text,
                                                       expected):
  _write(_minimal_tree(tmp_path), {f"{PACKAGE}/modeling/user.py": text})
  assert private_violations(scan(tmp_path)) == [
      f"{PACKAGE}.modeling.user uses {expected}"]


def test_private_check_allows_own_and_foreign_private_names(tmp_path):
  _write(_minimal_tree(tmp_path), {
      f"{PACKAGE}/modeling/own.py":
          f"import gin.config\nimport {PACKAGE}.modeling.own as me\n"
          "_X = 1\nme._X\ngin.config._CONFIG\nobj = object()\nobj._y\n"})
  assert not private_violations(scan(tmp_path))


def test_sys_path_check_fails_on_planted_edits(tmp_path):
  _write(_minimal_tree(tmp_path), {
      "tools/bench/hack.py": "import os\nimport sys\n\n"
                             "sys.path.insert(0, os.getcwd())\n",
      "train.py": "import sys\nsys.path[:0] = ['x']\n"})
  assert sys_path_violations(scan(tmp_path)) == [
      "tools.bench.hack touches sys.path (line 4)",
      "train touches sys.path (line 2)"]


def test_cycle_check_fails_on_a_planted_cycle(tmp_path):
  _write(_minimal_tree(tmp_path), {
      f"{PACKAGE}/training/a.py": f"from {PACKAGE}.training import b\n",
      f"{PACKAGE}/training/b.py": "def f():\n"
                                  f"  from {PACKAGE}.training import c\n",
      f"{PACKAGE}/training/c.py": f"import {PACKAGE}.training.a\n"})
  assert import_cycles(scan(tmp_path)) == [
      f"{PACKAGE}.training.a -> {PACKAGE}.training.b -> "
      f"{PACKAGE}.training.c -> {PACKAGE}.training.a"]


def test_checks_fail_on_a_copy_of_this_tree_with_planted_violations(
    tmp_path):
  for name in (PACKAGE, "tools"):
    shutil.copytree(REPO_ROOT / name, tmp_path / name,
                    ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(REPO_ROOT / "train.py", tmp_path / "train.py")
  anchors = tmp_path / PACKAGE / "ops" / "anchors.py"
  anchors.write_text(anchors.read_text() + "\n\ndef _planted():\n"
                     f"  from {PACKAGE}.training import gin_utils\n"
                     "  return gin_utils._gin_dir()\n")
  modules = scan(tmp_path)
  assert not found_problems(modules)
  assert layer_violations(modules) == [
      f"{PACKAGE}.ops.anchors (ops, layer 1) imports "
      f"{PACKAGE}.training.gin_utils (training, layer 5)"]
  assert private_violations(modules) == [
      f"{PACKAGE}.ops.anchors uses {PACKAGE}.training.gin_utils._gin_dir"]
