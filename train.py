"""Train and evaluate ShapeMask.

Runs official_shapemask/cli/train.py (`--help` explains it); where the package
is installed, the same program is the `shapemask-train` command.
"""

from official_shapemask.cli import train

if __name__ == "__main__":
  train.console_entry()
