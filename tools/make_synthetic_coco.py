"""A procedural COCO-format instance segmentation dataset of coloured shapes.

Runs official_shapemask/cli/make_synthetic_coco.py (`--help` explains it);
where the package is installed, the same program is the
`shapemask-make-synthetic-coco` command.
"""

from official_shapemask.cli import make_synthetic_coco

if __name__ == "__main__":
  make_synthetic_coco.console_entry()
