"""The `make demo` job: ShapeMask end to end on a fresh clone, on a CPU.

Runs official_shapemask/cli/demo.py (`--help` explains it); where the package
is installed, the same program is the `shapemask-demo` command.
"""

from official_shapemask.cli import demo

if __name__ == "__main__":
  demo.console_entry()
