"""gin helpers: short config names and parsing.

A short name (`shapemask_r101.gin`, `benchmarks/shapemask_r101_b256.gin`) is
looked up in the working directory, then in `GIN_DIR`: the package's
`configs/` folder where the package is installed (the wheel holds the
checkout's `gin/` there), the checkout's `gin/` otherwise (a checkout, or an
editable install of one).

`parse_config` fails before anything starts, naming the culprit, on an
unknown gin file, a syntax error (the file and line, or the binding), an
unknown configurable or parameter (gin's own check, once every configurable
module is imported), a macro that is bound but never used (a misspelt
`--gin_bindings="TOTAL_STEP=10"` would otherwise be ignored) and a macro that
is used but never defined. The run's operative config is written
by `operative_config`.
"""

import contextlib
import logging
import os

import gin
from gin import config as gin_config


def _gin_dir():
  """The package's gin files: `configs/` installed, else the checkout's gin/."""
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  installed = os.path.join(package, "configs")
  if os.path.isdir(installed):
    return installed
  return os.path.join(os.path.dirname(package), "gin")


GIN_DIR = _gin_dir()
_MACRO = "gin.macro"


class ConfigError(ValueError):
  """A gin file or binding is unknown, misspelt or incomplete."""


def find_gin_file(name, search_dirs=(GIN_DIR,)):
  """Resolves `shapemask_r101.gin` (or a path) to an existing file."""
  candidates = [name]
  if not name.endswith(".gin"):
    candidates.append(name + ".gin")
  for candidate in list(candidates):
    for directory in search_dirs:
      candidates.append(os.path.join(directory, candidate))
  for candidate in candidates:
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise ConfigError(
      f"gin file {name!r} not found (looked in the working directory and "
      f"{', '.join(search_dirs)})")


def register_configurables():
  """Imports every module that defines gin configurables.

  gin only knows a configurable after its module is imported; importing them
  all first makes an unknown name in a gin file fail at parse time.
  """
  # pylint: disable=g-import-not-at-top,unused-import
  from official_shapemask.dataloaders import input_reader  # noqa: F401
  from official_shapemask.dataloaders import shapemask_parser  # noqa: F401
  from official_shapemask.modeling import factory  # noqa: F401
  from official_shapemask.training import optimizers  # noqa: F401
  from official_shapemask.training import schedules  # noqa: F401
  from official_shapemask.training import settings  # noqa: F401


class _DropIncludeProbe(logging.Filter):
  """gin logs an error for every include before it tries the search path."""

  def filter(self, record):
    return record.msg not in ("Path not found: %s",
                              "system_path_file_exists:%s")


@contextlib.contextmanager
def _quiet_include_probe():
  flt = _DropIncludeProbe()
  logging.getLogger().addFilter(flt)
  try:
    yield
  finally:
    logging.getLogger().removeFilter(flt)


def _macro_references(value, out):
  """Adds the macro names referenced inside a bound value to `out`."""
  if isinstance(value, gin_config.ConfigurableReference):
    selector = value.scoped_selector
    if selector.endswith("/" + _MACRO):
      out.add(selector[:-len(_MACRO) - 1])
  elif isinstance(value, (list, tuple, set)):
    for v in value:
      _macro_references(v, out)
  elif isinstance(value, dict):
    for v in value.values():
      _macro_references(v, out)


def _macros():
  """The macros bound so far, and those some binding refers to."""
  defined, used = set(), set()
  for (scope, selector), params in gin_config._CONFIG.items():  # pylint: disable=protected-access
    if selector == _MACRO:
      defined.add(scope)
    for value in params.values():
      _macro_references(value, used)
  return defined, used


def check_macros(used_by_files=()):
  """Raises ConfigError for macros bound but unused, or used but unbound.

  Args:
    used_by_files: macros the gin files referred to before the command
      line's bindings were applied; a binding that overrides such a
      reference (`Experiment.eval_samples=8` beside `EVAL_SAMPLES = 5000`)
      does not make the file's macro a misspelling.
  """
  defined, used = _macros()
  unused = sorted(defined - used - set(used_by_files))
  undefined = sorted(used - defined)
  if undefined:
    raise ConfigError(f"gin macro(s) used but never bound: "
                      f"{', '.join(undefined)}")
  if unused:
    raise ConfigError(f"unknown gin macro(s) {', '.join(unused)}: bound but "
                      "used by no configurable (misspelt?)")


def _syntax_error_message(error):
  """One line naming the gin file (and line) or the binding that fails."""
  text = (error.text or "").strip()
  column = f" column {error.offset}" if error.offset else ""
  if error.filename:
    where = f"gin file {error.filename} line {error.lineno}{column}"
  else:
    where = f"--gin_bindings={text!r}{column}"
  line = f": {text}" if error.filename and text else ""
  return f"gin syntax error in {where}: {error.msg}{line}"


def parse_config(gin_files=(), gin_bindings=(), search_dirs=(GIN_DIR,)):
  """Parses gin files (short names allowed) and bindings.

  Raises:
    ConfigError: naming the file, configurable, parameter or macro.
  """
  register_configurables()
  files = [find_gin_file(f, search_dirs) for f in gin_files]
  for directory in search_dirs:
    if directory not in gin_config._LOCATION_PREFIXES:  # pylint: disable=protected-access
      gin.add_config_file_search_path(directory)
  try:
    with _quiet_include_probe():
      gin.parse_config_files_and_bindings(files, [], finalize_config=False)
      _, used_by_files = _macros()
      gin.parse_config_files_and_bindings([], list(gin_bindings),
                                          finalize_config=False)
  except SyntaxError as e:
    raise ConfigError(_syntax_error_message(e)) from None
  except (ValueError, IOError) as e:
    raise ConfigError(str(e)) from None
  check_macros(used_by_files)
  return files
