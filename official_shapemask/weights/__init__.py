"""Weights I/O: every way weights come into or go out of a ShapeMask model.

TensorFlow training checkpoints (`checkpoints`), the JAX engine's Orbax
checkpoints (`jax_checkpoints`), the TF1 reference's name-based checkpoints
(`tf1_checkpoints`, names in `tf1_names`), keras-hub ResNet presets
(`keras_hub_weights`), the Model Garden port's checkpoints
(`legacy_shapemask`, `legacy_converter`), the init-checkpoint dispatch
(`init_checkpoint`) and the table every restore prints (`restore_report`).
Where a checkpoint is (`paths`), how a weights file is written (`atomic`) and
what fails (`errors`) are each written once here.

Imports modeling (to walk the model's layers), never training or serving.
"""
