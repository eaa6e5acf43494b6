"""Every name the code uses exists: no leftovers of moved or renamed code.

Two static checks over the package, tools/, tests/ and train.py (read with
`ast` and `symtable`; nothing is imported):

* a global name a function reads is defined in its module or a builtin
  (a module that lost an import, `sys` say, fails only when that line runs);
* `module.name`, where `module` is one of ours imported by name (`from
  official_shapemask.weights import errors`), names something that module
  defines at its top level, or one of its submodules (a class that moved to
  another module fails only when that line runs: CI run 21 found four).

The last tests plant each kind of error and show the checks find it.
"""
import ast
import builtins
import pathlib
import symtable

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
OURS = ("official_shapemask", "tools", "tests")
_MODULE_GLOBALS = {"__file__", "__name__", "__doc__", "__spec__", "__path__",
                   "__builtins__", "__loader__", "__package__"}


def python_files(root):
  root = pathlib.Path(root)
  files = [p for folder in OURS for p in sorted((root / folder).rglob("*.py"))]
  if (root / "train.py").is_file():
    files.append(root / "train.py")
  return files


def undefined_globals(path):
  """`[(scope name, name)]` of globals read but defined nowhere."""
  source = pathlib.Path(path).read_text()
  top = symtable.symtable(source, str(path), "exec")
  if any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names)
         for n in ast.walk(ast.parse(source))):
    return []
  defined = {s.get_name() for s in top.get_symbols()
             if s.is_assigned() or s.is_imported() or s.is_namespace()}
  known = defined | set(dir(builtins)) | _MODULE_GLOBALS
  missing = []

  def walk(table):
    for symbol in table.get_symbols():
      global_read = symbol.is_referenced() and (
          symbol.is_global() or table is top)
      if global_read and symbol.get_name() not in known:
        missing.append((table.get_name(), symbol.get_name()))
    for child in table.get_children():
      walk(child)

  walk(top)
  return missing


def top_level_names(path):
  """Names a module defines at its top level (in ifs and trys too)."""
  names = set()

  def visit(statements):
    for node in statements:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                           ast.ClassDef)):
        names.add(node.name)
      elif isinstance(node, (ast.Import, ast.ImportFrom)):
        for alias in node.names:
          names.add(alias.asname or alias.name.split(".")[0])
      elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [
            node.target]
        for target in targets:
          for leaf in ast.walk(target):
            if isinstance(leaf, ast.Name):
              names.add(leaf.id)
      for field in ("body", "orelse", "finalbody", "handlers"):
        inner = getattr(node, field, None)
        if inner and not isinstance(node, (ast.FunctionDef,
                                           ast.AsyncFunctionDef,
                                           ast.ClassDef)):
          visit(inner)

  visit(ast.parse(pathlib.Path(path).read_text()).body)
  return names


def module_path(root, dotted):
  """The file (or package folder) of one of our modules, or None."""
  base = pathlib.Path(root).joinpath(*dotted.split("."))
  if base.with_suffix(".py").is_file():
    return base.with_suffix(".py")
  if (base / "__init__.py").is_file():
    return base
  return None


def unknown_attributes(root, path):
  """`[(line, "module.name")]` of attributes our modules do not have."""
  tree = ast.parse(pathlib.Path(path).read_text())
  aliases, elsewhere = {}, set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
        and node.module.split(".")[0] in OURS:
      for alias in node.names:
        dotted = f"{node.module}.{alias.name}"
        if module_path(root, dotted) is not None:
          aliases[alias.asname or alias.name] = dotted
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      elsewhere.update(a.asname or a.name.split(".")[0] for a in node.names)
  # A name also imported from another package (in another function, say)
  # is ambiguous to a scan without scopes: left out.
  aliases = {k: v for k, v in aliases.items() if k not in elsewhere}
  bad = []
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Attribute) and
            isinstance(node.value, ast.Name) and node.value.id in aliases):
      continue
    dotted = aliases[node.value.id]
    target = module_path(root, dotted)
    if target.is_dir():
      if module_path(root, f"{dotted}.{node.attr}") is not None:
        continue
      target = target / "__init__.py"
    names = top_level_names(target)
    if node.attr not in names and "__getattr__" not in names:
      bad.append((node.lineno, f"{dotted}.{node.attr}"))
  return bad


# -------------------------------------------------------------- the checks
def test_the_scan_finds_the_code():
  names = {p.relative_to(REPO_ROOT).as_posix()
           for p in python_files(REPO_ROOT)}
  assert {"official_shapemask/weights/errors.py", "tools/predict.py",
          "tests/test_names_resolve.py", "train.py"} <= names, sorted(names)


def test_every_global_name_is_defined():
  problems = [f"{p.relative_to(REPO_ROOT)}: {scope}: {name}"
              for p in python_files(REPO_ROOT)
              for scope, name in undefined_globals(p)]
  assert not problems, "\n".join(problems)


def test_every_attribute_of_our_modules_exists():
  problems = [f"{p.relative_to(REPO_ROOT)}:{line}: {name}"
              for p in python_files(REPO_ROOT)
              for line, name in unknown_attributes(REPO_ROOT, p)]
  assert not problems, "\n".join(problems)


# ------------------------------------------------------ planted violations
@pytest.fixture
def planted(tmp_path):
  package = tmp_path / "official_shapemask"
  (package / "weights").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "weights" / "__init__.py").write_text("")
  (package / "weights" / "errors.py").write_text(
      "import os\n"
      "class CheckpointTimeoutError(OSError):\n  pass\n"
      "if os.name == 'nt':\n  SEP = '\\\\'\nelse:\n  SEP = '/'\n"
      "def first_line(e):\n  return str(e)\n")
  return tmp_path


def test_a_lost_import_is_found(planted):
  user = planted / "official_shapemask" / "user.py"
  user.write_text("import os\n\ndef main():\n  print(os.sep, file=sys.stderr)\n")
  assert undefined_globals(user) == [("main", "sys")]
  user.write_text("import os, sys\n\ndef main():\n  print(os.sep, file=sys.stderr)\n")
  assert undefined_globals(user) == []


def test_a_moved_name_is_found(planted):
  user = planted / "official_shapemask" / "user.py"
  user.write_text(
      "from official_shapemask import weights\n"
      "from official_shapemask.weights import errors\n"
      "errors.first_line(1), errors.SEP, errors.CheckpointTimeoutError\n"
      "weights.errors\n"
      "errors.CheckpointUnreadableError\n"
      "weights.paths\n")
  assert unknown_attributes(planted, user) == [
      (5, "official_shapemask.weights.errors.CheckpointUnreadableError"),
      (6, "official_shapemask.weights.paths")]
