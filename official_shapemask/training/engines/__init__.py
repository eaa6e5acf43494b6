"""Training engines, one file per Keras backend (`<backend>_engine.py`).

Each defines `Engine`, an implementation of `base.Engine`; `load` picks the
one of the running Keras backend.
"""

import importlib
import pkgutil

from official_shapemask.training import settings


def available():
  """The backends that have an engine here (`tensorflow`, `jax`, ...)."""
  return sorted(name[:-len("_engine")] for _, name, _ in
                pkgutil.iter_modules(__path__) if name.endswith("_engine"))


def load(backend):
  """The `Engine` class for Keras backend `backend`.

  Raises:
    settings.InvalidInputError: no engine runs under that backend (one
      line naming those that do).
  """
  if backend not in available():
    raise settings.InvalidInputError(
        f"no training engine for KERAS_BACKEND={backend!r}; engines exist "
        f"for {', '.join(available())}")
  module = importlib.import_module(f"{__name__}.{backend}_engine")
  return module.Engine
