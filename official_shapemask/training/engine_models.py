"""The model and optimizer both engines train, built from a gin file.

`build_model_and_optimizer` is the builder `weights/any_engine` runs in its
converter subprocess (`engine_switch.BUILDER`): the subprocess has the
backend of the engine that wrote a checkpoint and restores it into these.
"""

from official_shapemask.modeling import factory
from official_shapemask.training import experiment
from official_shapemask.training import gin_utils


def build_model_and_optimizer(config_path):
  """The engines' model and built optimizer from the gin file `config_path`.

  The model with the engines' overrides (`Experiment.model_overrides`: the
  prior file's local copy, nothing frozen without an init checkpoint), the
  optimizer of `build_momentum_optimizer` built on its trainable variables
  (as both engines build them).
  """
  gin_utils.parse_config([config_path], [])
  settings = experiment.Experiment("", print_fn=lambda *a, **k: None)
  model = factory.build_shapemask_model(**settings.model_overrides(say=False))
  optimizer = experiment.build_momentum_optimizer()
  optimizer.build(model.trainable_variables)
  return model, optimizer
