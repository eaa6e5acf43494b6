"""Converts a checkpoint or SavedModel of the seed's TF1 code to ours.

Runs official_shapemask/cli/convert_tf1_checkpoint.py (`--help` explains it);
where the package is installed, the same program is the
`shapemask-convert-tf1-checkpoint` command.
"""

from official_shapemask.cli import convert_tf1_checkpoint

if __name__ == "__main__":
  convert_tf1_checkpoint.console_entry()
