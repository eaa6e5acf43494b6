"""Runs a program of this package under absl, whoever started it.

A program here can be started three ways: `python tools/<name>.py` (or
`python train.py`) in a checkout, the `shapemask-<name>` console script of an
installed package, or `python -m official_shapemask.cli.<name>`. absl's
`--help` shows the docstring of `__main__` and the flags of the module named
by `sys.argv[0]`; in the first two ways that is a launcher, not the module
that defines the flags. `run` makes both the program module's, so every way
prints the same help.
"""

import sys

from absl import app
from absl import flags

from official_shapemask import help_flags


def run(main, module_name):
  """`app.run(main)` with the help of module `module_name`; `--help` exits
  0 (`help_flags.parse_flags`).

  Args:
    main: the program's `main(argv)`.
    module_name: `__name__` of the module that defines `main` and its flags
      (their flags must be defined before this call).
  """
  module = sys.modules[module_name]
  launcher = sys.modules["__main__"]
  if launcher is not module:
    launcher.__doc__ = module.__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, flags_parser=help_flags.parse_flags)
