"""Exports a trained ShapeMask checkpoint as a SavedModel for serving.

Runs official_shapemask/cli/export_saved_model.py (`--help` explains it); where
the package is installed, the same program is the
`shapemask-export-saved-model` command.
"""

from official_shapemask.cli import export_saved_model

if __name__ == "__main__":
  export_saved_model.console_entry()
