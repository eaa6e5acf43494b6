"""Runs ShapeMask on images: PNG overlays and a COCO results JSON.

Runs official_shapemask/cli/predict.py (`--help` explains it); where the
package is installed, the same program is the `shapemask-predict` command.
"""

from official_shapemask.cli import predict

if __name__ == "__main__":
  predict.console_entry()
