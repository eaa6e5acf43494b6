"""weights/any_engine.py: the newest step of either engine, neutral files.

In-process, TensorFlow backend, small Keras models (the ShapeMask runs of
both engines are in tests/training/test_engine_switch.py): which step a
model directory's listing gives, the neutral files' round trip between two
models built in one process (other variable paths, same keys), each
refusal, and what an Orbax step says when JAX is not installed.
"""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.training import optimizers
from official_shapemask.weights import any_engine
from official_shapemask.weights import errors


def _tf_checkpoints(model_dir, steps):
  manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(v=tf.Variable(1.0)), str(model_dir), 10)
  for step in steps:
    manager.save(step)


def test_newest_step_of_either_engine(tmp_path):
  run = tmp_path / "run"
  assert any_engine.newest_step(str(tmp_path / "none")) is None
  _tf_checkpoints(run, (2, 8))
  for name in ("5", "10", "12.orbax-checkpoint-tmp-1700000000"):
    (run / "checkpoints" / name).mkdir(parents=True)
  (run / "shapemask-10.weights.h5").write_bytes(b"h5")
  steps = any_engine.list_steps(str(run), weights_files=True)
  assert [(r.step, r.format) for r in steps] == [
      (2, "tf_checkpoint"), (5, "orbax"), (8, "tf_checkpoint"), (10, "orbax"),
      (10, "keras_weights")]
  newest = any_engine.newest_step(str(run))
  assert newest == (10, "jax", str(run / "checkpoints" / "10"), "orbax")
  assert newest.describe() == (
      f"the JAX engine's checkpoint {run / 'checkpoints' / '10'}")
  # At one step the file that needs no conversion under TensorFlow wins.
  weights = any_engine.newest_step(str(run), weights_files=True)
  assert weights.format == "keras_weights" and weights.step == 10
  assert weights.describe() == (
      f"the JAX engine's weights file {run / 'shapemask-10.weights.h5'}")
  tf_newest = any_engine.newest_step(str(run), engine="tensorflow")
  assert tf_newest == (8, "tensorflow", str(run / "ckpt-8"), "tf_checkpoint")
  assert any_engine.model_dir_of(newest) == str(run)
  assert any_engine.model_dir_of(tf_newest) == str(run)
  assert any_engine.orbax_step(str(run / "checkpoints" / "5")) == (
      5, "jax", str(run / "checkpoints" / "5"), "orbax")
  assert any_engine.orbax_step(str(run)) is None
  # A listed TensorFlow checkpoint whose files are gone is not a step.
  for path in tf.io.gfile.glob(str(run / "ckpt-8.*")):
    os.remove(path)
  assert any_engine.newest_step(str(run), engine="tensorflow").step == 2


def _build(units=4, frozen=False, optimizer="sgd"):
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(units),
                            keras.layers.BatchNormalization(),
                            keras.layers.Dense(2)])
  model.layers[0].trainable = not frozen
  if optimizer == "sgd":
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
  else:
    opt = optimizers.TF1Momentum(0.1)
  opt.build(model.trainable_variables)
  return model, opt


def test_neutral_files_carry_every_variable(tmp_path):
  model, optimizer = _build()
  rng = np.random.default_rng(0)
  # Unlike the initial values everywhere: weights, statistics, step, slots.
  for v in list(model.variables) + list(optimizer.variables):
    v.assign(np.full(v.shape, 7, v.dtype) if "iteration" in v.path else
             rng.normal(size=v.shape).astype(v.dtype))
  any_engine.write(model, optimizer, 7, str(tmp_path))
  state = any_engine.read_state(str(tmp_path))
  assert state["optimizer"]["class"] == "SGD"
  assert state["optimizer"]["config"]["momentum"] == pytest.approx(0.9)
  assert state["optimizer"]["keys"][:3] == ["iteration", "learning_rate",
                                            "slot/0/momentum"]
  # A second model of this process: other paths (sequential_1/dense_2/...).
  other, other_optimizer = _build()
  assert other.variables[0].path != model.variables[0].path
  assert any_engine.load(str(tmp_path), other, other_optimizer) == 7
  for a, b in zip(list(model.variables) + list(optimizer.variables),
                  list(other.variables) + list(other_optimizer.variables)):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # Weights only (evaluation, export): the optimizer is left alone.
  third, third_optimizer = _build()
  assert any_engine.load(str(tmp_path), third) == 7
  np.testing.assert_array_equal(third.weights[0].numpy(),
                                model.weights[0].numpy())
  assert int(third_optimizer.iterations.numpy()) == 0


def test_state_that_cannot_carry_over_is_refused(tmp_path):
  model, optimizer = _build()
  source = any_engine.StepRef(6, "jax", "/runs/a/checkpoints/6", "orbax")
  any_engine.write(model, optimizer, 6, str(tmp_path), source=source)
  described = "the JAX engine's checkpoint /runs/a/checkpoints/6 (step 6)"

  def refusal(target):
    before = [v.numpy().copy() for v in target[0].variables]
    with pytest.raises(errors.CheckpointMismatchError) as err:
      any_engine.load(str(tmp_path), *target)
    # Refused before anything was assigned.
    for a, v in zip(before, target[0].variables):
      np.testing.assert_array_equal(a, v.numpy())
    return err.value

  error = refusal(_build(optimizer="tf1"))
  assert isinstance(error, any_engine.OptimizerMismatchError)
  assert (error.saved_class, error.our_class) == ("SGD", "TF1Momentum")
  assert str(error) == (
      f"cannot resume from {described}: its optimizer is SGD, this run's is "
      "TF1Momentum, so its 8 optimizer variables (e.g. "
      f"{optimizer.variables[-1].path}) cannot carry over")
  error = refusal(_build(frozen=True))
  assert isinstance(error, any_engine.OptimizerMismatchError)
  assert str(error) == (  # Paths without the uniquifying numbers.
      f"cannot resume from {described}: its model trained 6 variables, this "
      "run's trains 4 (first difference: sequential/dense/kernel vs "
      "sequential/batch_normalization/gamma): the frozen layers differ, so "
      "the optimizer slots do not correspond")
  error = refusal(_build(units=5))
  assert not isinstance(error, any_engine.OptimizerMismatchError)
  assert str(error).startswith(
      f"{described} does not match the model built from the gin config: ")
  assert "\n" not in str(error)


def test_an_orbax_step_without_jax_says_what_to_install(tmp_path,
                                                         monkeypatch):
  monkeypatch.setattr(any_engine, "engine_available",
                      lambda engine: engine == "tensorflow")
  ref = any_engine.StepRef(6, "jax", str(tmp_path / "checkpoints" / "6"),
                           "orbax")
  with pytest.raises(any_engine.EngineUnavailableError) as err:
    any_engine.convert(ref, "", str(tmp_path), "unused:builder")
  assert str(err.value) == (
      f"the JAX engine's checkpoint {ref.path} (step 6) is read by the JAX "
      "engine, which is not installed: pip install official_shapemask[jax]")
  assert not os.listdir(tmp_path)  # Nothing started, nothing written.
