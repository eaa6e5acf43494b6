r"""Generates ShapeMask shape priors (k-means of box-normalised masks).

Example (COCO train2017, the layout of the reference's
kmeans_class_priors_91x20x32x32.npy):

  python tools/generate_shape_priors.py \
    --annotation_file=annotations/instances_train2017.json \
    --output=priors/kmeans_class_priors_91x20x32x32.npy

Every non-crowd instance mask is cropped to its tight box and resized to
prior_size x prior_size with soft values in [0, 1]; k-means (k-means++ seeding,
Lloyd iterations, seeded) runs per category and the centroids are stored at
row = category id, largest cluster first. Output: float32
[max category id + 1, num_clusters, prior_size, prior_size], or
[1, num_clusters, prior_size, prior_size] with --class_agnostic.

Fill rules: a category with fewer instances than --num_clusters gets its
class mean mask, then its instances (closest to the mean first), then their
left-right mirror images, repeated until the clusters are filled; a category
without instances, row 0 and unused ids get the mean mask of all instances.

Also writes a PNG grid of the priors (one row per category, one column per
cluster) and prints the number of instances per category.
"""

import os
import sys

from absl import app
from absl import flags

from official_shapemask.cli import entry
from official_shapemask.data_prep import shape_priors

_ANNOTATION_FILE = flags.DEFINE_string(
    'annotation_file', None, 'COCO instances JSON (e.g. train2017).')
_OUTPUT = flags.DEFINE_string(
    'output', None, 'Output .npy path (written to a temporary name, then '
    'renamed).')
_NUM_CLUSTERS = flags.DEFINE_integer(
    'num_clusters', 20, 'Priors (k-means clusters) per category, K.')
_PRIOR_SIZE = flags.DEFINE_integer('prior_size', 32,
                                   'Side of each prior in cells.')
_CLASS_AGNOSTIC = flags.DEFINE_bool(
    'class_agnostic', False,
    'Cluster all instances together; the output has one row [1, K, S, S].')
_SEED = flags.DEFINE_integer(
    'seed', 0, 'Seed of the k-means++ initialisation; the same seed gives a '
    'bitwise identical file.')
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', None, 'Rows of the output; default: largest category id '
    '+ 1 (91 for COCO).')
_GRID_PNG = flags.DEFINE_string(
    'grid_png', None, 'PNG grid of the priors; default: the --output path '
    'with a .png extension; "none" to skip.')

flags.mark_flags_as_required(['annotation_file', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    priors, summary = shape_priors.compute_shape_priors(
        _ANNOTATION_FILE.value,
        num_clusters=_NUM_CLUSTERS.value,
        prior_size=_PRIOR_SIZE.value,
        class_agnostic=_CLASS_AGNOSTIC.value,
        seed=_SEED.value,
        num_classes=_NUM_CLASSES.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'generate_shape_priors: error: {e}')
  for line in shape_priors.format_summary(summary):
    print(line)
  output = _OUTPUT.value
  shape_priors.save_array_atomic(priors, output)
  print(f'wrote shape priors {list(priors.shape)} float32 to {output}')
  grid = _GRID_PNG.value
  if grid is None:
    grid = os.path.splitext(output)[0] + '.png'
  if grid.lower() != 'none':
    if summary['class_agnostic']:
      names = {0: 'all classes'}
    else:
      names = summary['category_names']
    height, width = shape_priors.save_prior_grid_png(
        priors, grid, category_names=names)
    print(f'wrote prior grid {width}x{height} px to {grid}')


def console_entry():
  """Entry point of the console script and of the tools/ launcher."""
  entry.run(main, __name__)


if __name__ == '__main__':
  console_entry()
