"""absl's flags parser for the programs, with `--help` exiting 0.

absl's help flags (`--help`, `-?`, `--helpshort`, `--helpfull`,
`--helpxml`) print the usage and then exit with status 1, so a script or CI
job that asks a tool for its usage reads a failure. `parse_flags` is the
flags parser `cli/entry.run` gives `app.run`: it exits 0 after the help was
printed; a flag that does not parse still exits 1 with absl's message.
`run(main)` is `app.run(main)` with it (the benchmark tools). Standard
library and absl only (no TensorFlow import).
"""

import sys

from absl import app
from absl import flags


def parse_flags(argv):
  """Parses `argv` into absl's FLAGS; help exits 0, a bad flag exits 1.

  Returns:
    the arguments left after the flags (program name first).
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error:
    # absl's own report of the bad flag, and exit status 1.
    return app.parse_flags_with_usage(argv)
  except SystemExit as e:
    # While flags are parsed, only the help flags exit (status 1), after
    # printing the usage: asking for help is no failure.
    if e.code == 1:
      sys.exit(0)
    raise


def run(main):
  """`absl.app.run(main)`, with `--help` exiting 0 (see the module doc)."""
  app.run(main, flags_parser=parse_flags)
