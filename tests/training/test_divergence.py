"""The loss-explosion rule (divergence.LossGuard), on plain numbers."""
import math

import pytest

from official_shapemask.training import divergence


def test_first_step_sets_the_limit_until_a_loss_is_reported():
  guard = divergence.LossGuard(factor=20.0)
  assert guard.limit() is None
  assert guard.limit_from_first(12.0) == pytest.approx(240.0)
  assert guard.check(12.0) is None  # The first step never explodes.
  assert guard.check(240.0, first=12.0) is None
  assert guard.check(241.0, first=12.0) == "explosion"
  assert guard.check(math.nan) == "non-finite"
  assert guard.check(math.inf, first=12.0) == "non-finite"


def test_reference_is_the_lowest_running_median_and_never_rises():
  guard = divergence.LossGuard(factor=10.0, window=3)
  for loss in (12.0, 11.0, 10.0):
    guard.record(loss)
  assert guard.reference == pytest.approx(11.0)  # Median of 12, 11, 10.
  for loss in (8.0, 6.0):
    guard.record(loss)
  assert guard.reference == pytest.approx(8.0)  # Median of 10, 8, 6.
  # A slow climb moves the running median up, not the reference.
  for loss in (9.0, 12.0, 20.0, 40.0, 70.0):
    guard.record(loss)
  assert guard.reference == pytest.approx(8.0)
  assert guard.limit() == pytest.approx(80.0)
  assert guard.check(79.0) is None
  assert guard.check(81.0) == "explosion"
  guard.record(math.nan)  # Ignored.
  assert guard.reference == pytest.approx(8.0)


def test_floor_keeps_a_converged_run_from_stopping_on_one_batch():
  guard = divergence.LossGuard(factor=20.0)
  for _ in range(10):
    guard.record(0.02)
  assert guard.limit() == pytest.approx(20.0 * divergence.FLOOR)
  assert guard.check(5.0) is None


def test_healthy_run_of_the_tiny_config_never_fires():
  # Total losses of steps 1-40 of a tiny_cpu.gin run on coco_tiny160
  # (batch 4, one report per step, warmup to 0.02 over 20 steps).
  losses = [13.21, 12.21, 12.48, 12.23, 12.44, 12.63, 12.91, 13.19, 13.04,
            12.34, 12.83, 12.96, 12.43, 12.74, 12.23, 12.33, 11.52, 11.62,
            12.46, 12.03, 11.76, 11.86, 11.65, 12.19, 12.48, 12.43, 13.09,
            11.46, 11.68, 11.41, 11.06, 11.44, 11.22, 12.18, 10.84, 12.07,
            11.53, 11.29, 11.43, 11.11]
  guard = divergence.LossGuard()
  first = losses[0]
  for loss in losses:
    assert guard.check(loss, first=first) is None
    guard.record(loss)


def test_disabled_checks_only_for_nan_and_inf():
  guard = divergence.LossGuard(factor=0)
  assert not guard.enabled and guard.limit() == math.inf
  guard.record(1.0)
  assert guard.check(1e30) is None
  assert guard.check(math.nan) == "non-finite"


def test_describe_names_the_numbers():
  guard = divergence.LossGuard(factor=20.0)
  guard.record(12.0)
  text = guard.describe(1.5e6, guard.limit())
  assert "1.5e+06" in text and "240" in text and "12" in text
  assert issubclass(divergence.LossExplosionError, divergence.DivergenceError)
  assert issubclass(divergence.NonFiniteLossError, divergence.DivergenceError)
  with pytest.raises(ValueError, match="window"):
    divergence.LossGuard(window=0)
