"""Generates ShapeMask shape priors (k-means of box-normalised masks).

Runs official_shapemask/cli/generate_shape_priors.py (`--help` explains it);
where the package is installed, the same program is the
`shapemask-generate-shape-priors` command.
"""

from official_shapemask.cli import generate_shape_priors

if __name__ == "__main__":
  generate_shape_priors.console_entry()
