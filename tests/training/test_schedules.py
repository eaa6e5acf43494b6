"""Tests for official_shapemask.training.schedules (reference §8, seed table)."""
import json
import math
import os
import pathlib
import subprocess
import sys

import gin
import keras
import numpy as np
import pytest

from official_shapemask.training import schedules

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _values(schedule, steps):
  return [float(keras.ops.convert_to_numpy(schedule(s))) for s in steps]


def test_seed_batch64_schedule_values():
  # Reference §8 / seed: warmup 0.0067 -> 0.08 over 500 steps, 0.08 until
  # 30,000, absolute 0.008 from 30,000 and 0.0008 from 40,000.
  schedule = schedules.StepDecayWithWarmup()
  got = _values(schedule, [0, 250, 500, 29999, 30000, 40000, 44999])
  np.testing.assert_allclose(
      got, [0.0067, 0.04335, 0.08, 0.08, 0.008, 0.0008, 0.0008], rtol=1e-5)


# Seed scaling rows: (batch, total, warmup, init LR, decay 1, decay 2); levels
# are 0.1x and 0.01x of the initial LR, warmup always starts at 0.0067.
# Expected values are written out by hand from the table.
_SCALING_ROWS = {
    256: dict(warmup=1600, lr=0.24, steps=(7500, 10000),
              levels=(0.024, 0.0024), total=11250,
              # step 800: 0.0067 + 0.5 * (0.24 - 0.0067)
              middle=(800, 0.12335)),
    1024: dict(warmup=1093, lr=0.64, steps=(2188, 2656),
               levels=(0.064, 0.0064), total=2813,
               # step 546: 0.0067 + 546 / 1093 * (0.64 - 0.0067)
               middle=(546, 0.32306029277218665)),
    2048: dict(warmup=600, lr=0.64, steps=(1200, 1600),
               levels=(0.064, 0.0064), total=1800,
               # step 300: 0.0067 + 0.5 * (0.64 - 0.0067)
               middle=(300, 0.32335)),
}


@pytest.mark.parametrize('batch', sorted(_SCALING_ROWS))
def test_seed_scaling_rows(batch):
  row = _SCALING_ROWS[batch]
  schedule = schedules.StepDecayWithWarmup(
      warmup_learning_rate=0.0067,
      warmup_steps=row['warmup'],
      init_learning_rate=row['lr'],
      learning_rate_levels=row['levels'],
      learning_rate_steps=row['steps'])
  first, second = row['steps']
  level1, level2 = row['levels']
  checks = [
      (0, 0.0067),
      row['middle'],
      (row['warmup'] - 1,
       0.0067 + (row['warmup'] - 1) / row['warmup'] * (row['lr'] - 0.0067)),
      (row['warmup'], row['lr']),
      (first - 1, row['lr']),
      (first, level1),
      (second - 1, level1),
      (second, level2),
      (row['total'] - 1, level2),
  ]
  steps, expected = zip(*checks)
  np.testing.assert_allclose(_values(schedule, steps), expected, rtol=1e-5)


def test_warmup_is_monotonic_and_linear():
  schedule = schedules.StepDecayWithWarmup()
  values = np.array(_values(schedule, range(0, 501, 50)))
  assert np.all(np.diff(values) > 0)
  np.testing.assert_allclose(np.diff(values), np.diff(values)[0], rtol=1e-4)


def test_zero_warmup_starts_at_init():
  schedule = schedules.StepDecayWithWarmup(
      warmup_learning_rate=0.0, warmup_steps=0, init_learning_rate=0.1,
      learning_rate_levels=[0.01], learning_rate_steps=[10])
  np.testing.assert_allclose(_values(schedule, [0, 9, 10]), [0.1, 0.1, 0.01],
                             rtol=1e-6)


def test_no_decay_levels():
  schedule = schedules.StepDecayWithWarmup(
      warmup_steps=10, init_learning_rate=0.5, learning_rate_levels=(),
      learning_rate_steps=())
  np.testing.assert_allclose(_values(schedule, [10, 10**6]), [0.5, 0.5],
                             rtol=1e-6)


def test_step_schedule_serialization_round_trip_non_default():
  schedule = schedules.StepDecayWithWarmup(
      warmup_learning_rate=0.001, warmup_steps=7, init_learning_rate=0.3,
      learning_rate_levels=(0.2, 0.05, 0.01),
      learning_rate_steps=(11, 20, 31))
  config = keras.saving.serialize_keras_object(schedule)
  assert config['registered_name'] == 'official_shapemask>StepDecayWithWarmup'
  restored = keras.saving.deserialize_keras_object(config)
  assert type(restored) is schedules.StepDecayWithWarmup
  assert restored.get_config() == schedule.get_config()
  steps = [0, 3, 7, 10, 11, 19, 20, 30, 31, 100]
  np.testing.assert_allclose(_values(restored, steps), _values(schedule, steps))
  np.testing.assert_allclose(
      _values(restored, [3, 11, 20, 31]),
      [0.001 + 3 / 7 * 0.299, 0.2, 0.05, 0.01], rtol=1e-5)


def test_cosine_serialization_round_trip_non_default():
  schedule = schedules.CosineWithWarmup(
      warmup_learning_rate=0.01, warmup_steps=13, init_learning_rate=0.7,
      total_steps=113, alpha=0.2)
  config = keras.saving.serialize_keras_object(schedule)
  restored = keras.saving.deserialize_keras_object(config)
  assert type(restored) is schedules.CosineWithWarmup
  assert restored.get_config() == schedule.get_config()
  steps = [0, 6, 13, 50, 113, 500]
  np.testing.assert_allclose(_values(restored, steps), _values(schedule, steps))


def test_cosine_endpoints_and_middle():
  schedule = schedules.CosineWithWarmup(
      warmup_learning_rate=0.0067, warmup_steps=500, init_learning_rate=0.08,
      total_steps=45000)
  got = _values(schedule, [0, 250, 500, 22750, 45000, 50000])
  np.testing.assert_allclose(
      got, [0.0067, 0.04335, 0.08, 0.04, 0.0, 0.0], rtol=1e-5, atol=1e-7)
  with_alpha = schedules.CosineWithWarmup(
      warmup_learning_rate=0.0, warmup_steps=0, init_learning_rate=1.0,
      total_steps=100, alpha=0.1)
  np.testing.assert_allclose(
      _values(with_alpha, [0, 25, 50, 100, 101]),
      [1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55, 0.1, 0.1],
      rtol=1e-5)


@pytest.mark.parametrize('kwargs, message', [
    (dict(learning_rate_levels=(0.1,), learning_rate_steps=(600, 700)),
     'same length'),
    (dict(learning_rate_steps=(40000, 30000)), 'strictly increasing'),
    (dict(learning_rate_steps=(30000, 30000)), 'strictly increasing'),
    (dict(learning_rate_steps=(400, 40000)), 'warmup_steps = 500'),
    (dict(learning_rate_steps=(500, 40000)), 'warmup_steps = 500'),
    (dict(warmup_steps=-1), 'warmup_steps must be >= 0'),
    (dict(warmup_steps=2.5), 'warmup_steps must be an integer'),
    (dict(init_learning_rate=float('nan')), 'init_learning_rate'),
    (dict(init_learning_rate=-0.1), 'init_learning_rate'),
    (dict(learning_rate_levels=(0.008, 'x')), 'learning_rate_levels[1]'),
    (dict(learning_rate_levels=0.008), 'sequences'),
])
def test_step_schedule_bad_arguments(kwargs, message):
  with pytest.raises(ValueError) as err:
    schedules.StepDecayWithWarmup(**kwargs)
  assert message in str(err.value)
  assert 'StepDecayWithWarmup' in str(err.value)


@pytest.mark.parametrize('kwargs, message', [
    (dict(total_steps=500), 'total_steps = 500 must be greater than'),
    (dict(total_steps=100), 'warmup_steps = 500'),
    (dict(alpha=1.5), 'alpha'),
    (dict(alpha=-0.1), 'alpha'),
    (dict(warmup_learning_rate=float('inf')), 'warmup_learning_rate'),
])
def test_cosine_bad_arguments(kwargs, message):
  args = dict(warmup_learning_rate=0.0067, warmup_steps=500,
              init_learning_rate=0.08, total_steps=45000)
  args.update(kwargs)
  with pytest.raises(ValueError, match='CosineWithWarmup') as err:
    schedules.CosineWithWarmup(**args)
  assert message in str(err.value)


def test_inside_sgd_optimizer():
  schedule = schedules.StepDecayWithWarmup()
  optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9)
  variable = keras.Variable(np.ones((2,), np.float32))
  optimizer.build([variable])
  for step, expected in [(0, 0.0067), (250, 0.04335), (30000, 0.008),
                         (40000, 0.0008)]:
    optimizer.iterations.assign(step)
    np.testing.assert_allclose(
        float(keras.ops.convert_to_numpy(optimizer.learning_rate)), expected,
        rtol=1e-5)
  # One update at step 40,000 uses lr 0.0008: v <- v - lr * grad.
  optimizer.apply_gradients([(keras.ops.ones((2,)), variable)])
  np.testing.assert_allclose(keras.ops.convert_to_numpy(variable),
                             [1 - 0.0008] * 2, rtol=1e-6)
  # The optimizer's own config round trip keeps the schedule.
  restored = keras.optimizers.SGD.from_config(optimizer.get_config())
  assert isinstance(restored._learning_rate, schedules.StepDecayWithWarmup)
  assert restored._learning_rate.get_config() == schedule.get_config()


def test_traced_with_tf_function():
  import tensorflow as tf
  schedule = schedules.StepDecayWithWarmup()
  fn = tf.function(schedule, jit_compile=True)
  got = [float(fn(tf.constant(s, tf.int64))) for s in [250, 30000]]
  np.testing.assert_allclose(got, [0.04335, 0.008], rtol=1e-5)


@gin.configurable('take_learning_rate', module='test_schedules')
def _take_learning_rate(learning_rate=None):
  """Stands in for an optimizer builder that receives a gin schedule."""
  return learning_rate


def test_gin_bindings_and_builder():
  with gin.unlock_config():
    gin.clear_config()
    try:
      gin.parse_config("""
          StepDecayWithWarmup.warmup_steps = 1600
          StepDecayWithWarmup.init_learning_rate = 0.24
          StepDecayWithWarmup.learning_rate_levels = [0.024, 0.0024]
          StepDecayWithWarmup.learning_rate_steps = [7500, 10000]
          schedules.CosineWithWarmup.warmup_learning_rate = 0.0
          CosineWithWarmup.warmup_steps = 10
          CosineWithWarmup.init_learning_rate = 1.0
          CosineWithWarmup.total_steps = 110
          take_learning_rate.learning_rate = @StepDecayWithWarmup()
      """)
      step = schedules.build_learning_rate_schedule()
      assert type(step) is schedules.StepDecayWithWarmup
      np.testing.assert_allclose(_values(step, [800, 7500, 10000]),
                                 [0.12335, 0.024, 0.0024], rtol=1e-5)
      # Explicit arguments win over bindings.
      override = schedules.build_learning_rate_schedule(init_learning_rate=0.5)
      assert override.init_learning_rate == 0.5
      assert override.warmup_steps == 1600
      cosine = schedules.build_learning_rate_schedule(kind='cosine')
      assert type(cosine) is schedules.CosineWithWarmup
      np.testing.assert_allclose(_values(cosine, [5, 10, 60, 110]),
                                 [0.5, 1.0, 0.5, 0.0], atol=1e-6)
      # A gin reference builds an instance of the plain registered class, so
      # it still serializes.
      instance = _take_learning_rate()
      assert type(instance) is schedules.StepDecayWithWarmup
      assert keras.saving.deserialize_keras_object(
          keras.saving.serialize_keras_object(instance)).get_config() == (
              step.get_config())
      with pytest.raises(ValueError, match="unknown kind 'linear'"):
        schedules.build_learning_rate_schedule(kind='linear')
    finally:
      gin.clear_config()


def test_works_under_jax_backend():
  code = (
      'from official_shapemask.training import schedules\n'
      'import keras, numpy as np\n'
      'assert keras.backend.backend() == "jax"\n'
      's = schedules.StepDecayWithWarmup()\n'
      'c = schedules.CosineWithWarmup(0.0067, 500, 0.08, 45000)\n'
      'import jax\n'
      'f = jax.jit(lambda x: (s(x), c(x)))\n'
      'print([float(f(t)[0]) for t in (0, 250, 500, 30000, 40000)],'
      ' float(f(45000)[1]))\n')
  env = dict(os.environ, KERAS_BACKEND='jax', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = result.stdout.strip().splitlines()[-1]
  values, cosine_end = line.rsplit(' ', 1)
  np.testing.assert_allclose(json.loads(values),
                             [0.0067, 0.04335, 0.08, 0.008, 0.0008], rtol=1e-5)
  assert abs(float(cosine_end)) < 1e-7
