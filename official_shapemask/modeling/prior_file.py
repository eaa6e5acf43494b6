"""Reads and validates a shape-prior ``.npy`` file (numpy only).

The model builder (`modeling.factory`) loads priors through this module; the
k-means generator that writes such files lives with the data tools
(`data_prep.shape_priors`). The array is float32 ``[C, K, S, S]``: one row
per class slot (the raw category id; ``C = 1`` in class-agnostic mode), ``K``
priors of ``S x S`` soft masks in [0, 1], in the tight-box frame.
"""

import os

import numpy as np


def load_shape_priors(path, num_classes=None, class_agnostic=False):
  """Loads and validates a shape-prior ``.npy`` file.

  Args:
    path: path of a ``.npy`` array ``[C, K, S, S]``.
    num_classes: int or None; when given (and not ``class_agnostic``), ``C``
      must equal it.
    class_agnostic: bool; when True, ``C`` must be 1 (``num_classes`` is then
      the model's class count and is not compared).

  Returns:
    float32 ``[C, K, S, S]``, values clipped to [0, 1].

  Raises:
    FileNotFoundError: the file does not exist (path named).
    ValueError: naming the path, when the file is not a numeric ``.npy``, is
      not 4-D, its masks are not square, it holds non-finite values or values
      outside [0, 1] (beyond 1e-3), or its class count differs (both numbers).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'shape prior file not found: {path}')
  try:
    priors = np.load(path, allow_pickle=False)
  except Exception as e:  # np.load raises several types for bad files.
    raise ValueError(
        f'shape prior file {path} is not a readable .npy array: {e}') from None
  if not np.issubdtype(priors.dtype, np.number):
    raise ValueError(f'shape prior file {path} holds dtype {priors.dtype}; '
                     'expected floats.')
  if priors.ndim != 4:
    raise ValueError(
        f'shape prior file {path} has shape {priors.shape}; expected 4-D '
        '[num_classes, num_clusters, size, size].')
  if priors.shape[2] != priors.shape[3] or min(priors.shape) < 1:
    raise ValueError(
        f'shape prior file {path} has shape {priors.shape}; the priors must '
        'be square and non-empty.')
  priors = priors.astype(np.float32)
  if not np.all(np.isfinite(priors)):
    raise ValueError(f'shape prior file {path} holds NaN or infinite values.')
  if priors.min() < -1e-3 or priors.max() > 1.0 + 1e-3:
    raise ValueError(
        f'shape prior file {path} has values in [{priors.min()}, '
        f'{priors.max()}]; priors are soft masks in [0, 1].')
  if class_agnostic:
    if priors.shape[0] != 1:
      raise ValueError(
          f'shape prior file {path} has {priors.shape[0]} classes but '
          'class-agnostic masks need 1 (a file made with --class_agnostic).')
  elif num_classes is not None and priors.shape[0] != num_classes:
    raise ValueError(
        f'shape prior file {path} has {priors.shape[0]} classes but the '
        f'model has num_classes = {num_classes}.')
  return np.clip(priors, 0.0, 1.0)
