"""`TF1Momentum` equals TF1's `MomentumOptimizer`; Keras' SGD does not.

The reference is `tf.compat.v1.train.MomentumOptimizer` itself, run eagerly
in this process on the same gradients and the same learning rate per step:
a warmup (0.002 -> 0.02 over 4 steps) and drops at steps 7 and 10, 12 steps.
`TF1Momentum` must follow it under the TensorFlow backend (eager,
`tf.function`, MirroredStrategy over two logical CPUs) and under JAX
(`stateless_apply` in `jax.jit`, as the JAX engine's step calls it), and
keep its accumulators through a TensorFlow checkpoint as SGD keeps its
momentum slots. Keras' SGD (`momentum_form='keras'`) agrees with it at a
constant learning rate and not after a change of it.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.training import optimizers
from official_shapemask.training import schedules

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 12
SCHEDULE = dict(warmup_learning_rate=0.002, warmup_steps=4,
                init_learning_rate=0.02, learning_rate_levels=(0.002, 0.0002),
                learning_rate_steps=(7, 10))
SHAPES = ((3, 4), (5,), (2, 2, 3, 4))
# TF1 and TF1Momentum do the same float32 operations: measured 0 difference
# eagerly; 1e-6 leaves room for other kernels (XLA's fused ones, JAX).
TOLERANCE = 1e-6


def _schedule():
  return schedules.StepDecayWithWarmup(**SCHEDULE)


@pytest.fixture(scope="module")
def problem():
  """Initial values and 12 steps of gradients (float32)."""
  rng = np.random.default_rng(7)
  init = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
  grads = [[rng.normal(size=s).astype(np.float32) for s in SHAPES]
           for _ in range(STEPS)]
  return init, grads


def _tf1_run(init, grads, nesterov=False, learning_rate=None):
  """TF1's MomentumOptimizer: weights and momentum slots after each step."""
  variables = [tf.Variable(x) for x in init]
  step = tf.Variable(0, dtype=tf.int64)
  schedule = _schedule()
  lr = (lambda: schedule(step)) if learning_rate is None else learning_rate
  optimizer = tf.compat.v1.train.MomentumOptimizer(lr, momentum=0.9,
                                                   use_nesterov=nesterov)
  weights, slots = [], []
  for grad in grads:
    optimizer.apply_gradients(
        zip([tf.constant(g) for g in grad], variables))
    step.assign_add(1)
    weights.append([v.numpy() for v in variables])
    slots.append([optimizer.get_slot(v, "momentum").numpy()
                  for v in variables])
  return weights, slots


def _keras_run(optimizer, init, grads, traced=False):
  """A Keras optimizer on the same problem: weights after each step.

  `traced`: each update runs in a `tf.function` (as in the train loop).
  """
  variables = [keras.Variable(x) for x in init]
  optimizer.build(variables)

  def apply(grad):
    optimizer.apply_gradients(zip(grad, variables))

  apply = tf.function(apply) if traced else apply
  weights = []
  for grad in grads:
    apply([tf.constant(g) for g in grad])
    weights.append([v.numpy() for v in variables])
  return weights, variables


def _max_relative(got, want):
  return max(float(np.abs(a - b).max() / np.abs(b).max())
             for a, b in zip(got, want))


@pytest.mark.parametrize("nesterov", [False, True])
def test_tf1_form_equals_tf1_momentum_optimizer(problem, nesterov):
  init, grads = problem
  want, want_slots = _tf1_run(init, grads, nesterov)
  optimizer = optimizers.TF1Momentum(_schedule(), momentum=0.9,
                                     nesterov=nesterov)
  got, _ = _keras_run(optimizer, init, grads)
  for step in range(STEPS):
    assert _max_relative(got[step], want[step]) < TOLERANCE, step
  for got_slot, want_slot in zip(optimizer.accumulators, want_slots[-1]):
    np.testing.assert_allclose(got_slot.numpy(), want_slot, rtol=1e-6)
  assert int(optimizer.iterations.numpy()) == STEPS
  # The weights moved by far more than the tolerance.
  assert _max_relative(got[-1], init) > 0.01


def test_tf1_form_inside_tf_function(problem):
  init, grads = problem
  want, _ = _tf1_run(init, grads)
  optimizer = optimizers.TF1Momentum(_schedule(), momentum=0.9)
  got, _ = _keras_run(optimizer, init, grads, traced=True)
  assert _max_relative(got[-1], want[-1]) < TOLERANCE


def test_keras_form_differs_after_a_change_of_learning_rate(problem):
  init, grads = problem
  # Constant learning rate: the two forms give the same weights.
  constant, _ = _tf1_run(init, grads, learning_rate=0.01)
  sgd, _ = _keras_run(keras.optimizers.SGD(0.01, momentum=0.9), init, grads)
  assert _max_relative(sgd[-1], constant[-1]) < 1e-5
  # Warmup and drops: Keras' velocity carries the old step sizes.
  want, _ = _tf1_run(init, grads)
  sgd, _ = _keras_run(keras.optimizers.SGD(_schedule(), momentum=0.9), init,
                      grads)
  differences = [_max_relative(sgd[s], want[s]) for s in range(STEPS)]
  assert differences[0] < TOLERANCE  # Step 0: no history yet.
  assert min(differences[1:]) > 1e-3, differences


def test_build_momentum_optimizer_forms():
  sgd = optimizers.build_momentum_optimizer(0.1)
  assert type(sgd) is keras.optimizers.SGD  # The default: today's runs.
  assert (sgd.momentum, sgd.nesterov) == (0.9, False)
  tf1 = optimizers.build_momentum_optimizer(0.1, momentum=0.8, nesterov=True,
                                            momentum_form="tf1")
  assert isinstance(tf1, optimizers.TF1Momentum)
  assert (tf1.momentum, tf1.nesterov) == (0.8, True)
  with pytest.raises(ValueError, match="momentum_form='tf2'.*'keras', 'tf1'"):
    optimizers.build_momentum_optimizer(0.1, momentum_form="tf2")
  with pytest.raises(ValueError, match="momentum"):
    optimizers.TF1Momentum(0.1, momentum=1.5)


def test_config_round_trip_keeps_the_schedule():
  optimizer = optimizers.TF1Momentum(_schedule(), momentum=0.9, nesterov=True)
  config = optimizer.get_config()
  assert (config["momentum"], config["nesterov"]) == (0.9, True)
  revived = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
  assert isinstance(revived, optimizers.TF1Momentum)
  assert revived.get_config() == config
  assert revived._learning_rate.get_config() == _schedule().get_config()  # pylint: disable=protected-access


def test_accumulators_save_and_restore_like_sgd_slots(problem, tmp_path):
  init, grads = problem
  want, _ = _keras_run(optimizers.TF1Momentum(_schedule(), momentum=0.9),
                       init, grads)
  # Five steps, a checkpoint, then a fresh optimizer and variables restored
  # from it finish the other seven: the same weights as without the break.
  first = optimizers.TF1Momentum(_schedule(), momentum=0.9)
  _, variables = _keras_run(first, init, grads[:5])
  path = tf.train.Checkpoint(optimizer=first, weights=variables).save(
      str(tmp_path / "ckpt"))
  # The same entries (names and shapes) as SGD's momentum slots.
  sgd = keras.optimizers.SGD(_schedule(), momentum=0.9)
  _, sgd_variables = _keras_run(sgd, init, grads[:5])
  sgd_path = tf.train.Checkpoint(optimizer=sgd, weights=sgd_variables).save(
      str(tmp_path / "sgd"))
  saved = dict(tf.train.list_variables(path))
  assert saved == dict(tf.train.list_variables(sgd_path))
  assert sum(1 for k in saved if k.startswith("optimizer/_variables/")) == (
      len(SHAPES))  # One accumulator per variable (+ the step counter).

  second = optimizers.TF1Momentum(_schedule(), momentum=0.9)
  restored = [keras.Variable(np.zeros_like(x)) for x in init]
  second.build(restored)
  tf.train.Checkpoint(optimizer=second, weights=restored).restore(
      path).assert_consumed()
  assert int(second.iterations.numpy()) == 5
  for a, b in zip(second.accumulators, first.accumulators):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  for grad in grads[5:]:
    second.apply_gradients(zip([tf.constant(g) for g in grad], restored))
  assert _max_relative([v.numpy() for v in restored], want[-1]) < TOLERANCE


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from official_shapemask.training import optimizers, schedules
    data = np.load(sys.argv[1])
    shapes, steps, schedule = json.loads(sys.argv[2])
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
      variables = [keras.Variable(data[f"init{i}"]) for i in range(len(shapes))]
      optimizer = optimizers.TF1Momentum(
          schedules.StepDecayWithWarmup(**schedule), momentum=0.9)
      optimizer.build(variables)

    @tf.function
    def step(grads):
      strategy.run(lambda g: optimizer.apply_gradients(zip(g, variables)),
                   args=(grads,))

    for s in range(steps):
      # Replica r gets gradients g{s}_*_r{r}.
      step(strategy.experimental_distribute_values_from_function(
          lambda ctx: [tf.constant(data[
              f"g{s}_{i}_r{ctx.replica_id_in_sync_group}"])
              for i in range(len(shapes))]))
    np.savez(sys.argv[3], *[v.numpy() for v in variables])
    print("OK", strategy.num_replicas_in_sync)
""")


@pytest.mark.slow  # A TensorFlow subprocess with two logical devices.
def test_tf1_form_under_mirrored_strategy(problem, tmp_path):
  """Two replicas, other gradients each: TF1 on the summed gradients."""
  init, grads = problem
  rng = np.random.default_rng(8)
  other = [[rng.normal(size=s).astype(np.float32) for s in SHAPES]
           for _ in range(STEPS)]
  arrays = {f"init{i}": x for i, x in enumerate(init)}
  for k in range(STEPS):
    for i in range(len(SHAPES)):
      arrays[f"g{k}_{i}_r0"] = grads[k][i]
      arrays[f"g{k}_{i}_r1"] = other[k][i]
  np.savez(tmp_path / "in.npz", **arrays)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
             KERAS_BACKEND="tensorflow", PYTHONPATH=str(REPO_ROOT))
  result = subprocess.run(
      [sys.executable, "-c", _MIRRORED_SCRIPT, str(tmp_path / "in.npz"),
       json.dumps([SHAPES, STEPS, SCHEDULE]), str(tmp_path / "out.npz")],
      env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
      check=False)
  assert result.returncode == 0 and "OK 2" in result.stdout, (
      result.stdout[-2000:] + result.stderr[-5000:])
  out = np.load(tmp_path / "out.npz")
  got = [out[f"arr_{i}"] for i in range(len(SHAPES))]
  # Keras' optimizer sums the replicas' gradients (the train loop scales
  # the loss by 1 / replicas first).
  summed = [[a + b for a, b in zip(g, o)] for g, o in zip(grads, other)]
  want, _ = _tf1_run(init, summed)
  assert _max_relative(got, want[-1]) < TOLERANCE


_JAX_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import keras
    import numpy as np
    from official_shapemask.training import optimizers, schedules
    data = np.load(sys.argv[1])
    shapes, steps, schedule, nesterov = json.loads(sys.argv[2])
    variables = [keras.Variable(data[f"init{i}"]) for i in range(len(shapes))]
    optimizer = optimizers.TF1Momentum(
        schedules.StepDecayWithWarmup(**schedule), momentum=0.9,
        nesterov=nesterov)
    optimizer.build(variables)
    apply = jax.jit(optimizer.stateless_apply)  # As jax_step.TrainStep.
    opt_state = [v.value for v in optimizer.variables]
    weights = [v.value for v in variables]
    for k in range(steps):
      grads = [data[f"g{k}_{i}"] for i in range(len(shapes))]
      weights, opt_state = apply(opt_state, grads, weights)
    np.savez(sys.argv[3], *[np.asarray(w) for w in weights])
    print("OK", keras.backend.backend())
""")


@pytest.mark.parametrize("nesterov", [False, True])
def test_tf1_form_under_jax(problem, run_under_jax, tmp_path, nesterov):
  init, grads = problem
  arrays = {f"init{i}": x for i, x in enumerate(init)}
  arrays.update({f"g{k}_{i}": grads[k][i] for k in range(STEPS)
                 for i in range(len(SHAPES))})
  np.savez(tmp_path / "in.npz", **arrays)
  result = run_under_jax(_JAX_SCRIPT, str(tmp_path / "in.npz"),
                         json.dumps([SHAPES, STEPS, SCHEDULE, nesterov]),
                         str(tmp_path / "out.npz"))
  assert result.returncode == 0 and "OK jax" in result.stdout, (
      result.stdout[-2000:] + result.stderr[-5000:])
  out = np.load(tmp_path / "out.npz")
  want, _ = _tf1_run(init, grads, nesterov)
  got = [out[f"arr_{i}"] for i in range(len(SHAPES))]
  assert _max_relative(got, want[-1]) < TOLERANCE
