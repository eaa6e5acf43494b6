"""Converts a checkpoint of tf-models-official's legacy ShapeMask to ours.

Runs official_shapemask/cli/convert_legacy_checkpoint.py (`--help` explains
it); where the package is installed, the same program is the
`shapemask-convert-legacy-checkpoint` command.
"""

from official_shapemask.cli import convert_legacy_checkpoint

if __name__ == "__main__":
  convert_legacy_checkpoint.console_entry()
