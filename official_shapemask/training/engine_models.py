"""The model and optimizer both engines train, built from a gin file.

`build_model_and_optimizer` is the builder `weights/any_engine` runs in its
converter subprocess (`engine_switch.BUILDER`): the subprocess has the
backend of the engine that wrote a checkpoint and restores it into these.
"""

from official_shapemask.modeling import factory
from official_shapemask.training import gin_utils
from official_shapemask.training import optimizers
from official_shapemask.training import settings as settings_lib
from official_shapemask.training import validation


def build_model_and_optimizer(config_path):
  """The engines' model and built optimizer from the gin file `config_path`.

  The model with the engines' overrides (`validation.model_overrides`: the
  prior file's local copy, nothing frozen without an init checkpoint), the
  optimizer of `build_momentum_optimizer` built on its trainable variables
  (as both engines build them).
  """
  gin_utils.parse_config([config_path], [])
  settings = settings_lib.create("")
  model = factory.build_shapemask_model(
      **validation.model_overrides(settings, print_fn=None))
  optimizer = optimizers.build_momentum_optimizer()
  optimizer.build(model.trainable_variables)
  return model, optimizer
