"""Converts a COCO instances JSON and its images into ShapeMask TFRecords.

Runs official_shapemask/cli/create_coco_tfrecord.py (`--help` explains it);
where the package is installed, the same program is the
`shapemask-create-coco-tfrecord` command.
"""

from official_shapemask.cli import create_coco_tfrecord

if __name__ == "__main__":
  create_coco_tfrecord.console_entry()
