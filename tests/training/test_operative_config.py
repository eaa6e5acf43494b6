"""config.gin of a model directory: when it is written, what is kept."""
import gin
import pytest

from official_shapemask.training import operative_config


@gin.configurable
def _configured(value=0):
  return value


@pytest.fixture
def config_with():
  """Binds `_configured.value` and calls it, so gin reports it as used."""

  def bind(value):
    with gin.unlock_config():
      gin.clear_config()
      gin.bind_parameter("_configured.value", value)
    assert _configured() == value

  yield bind
  with gin.unlock_config():
    gin.clear_config()


def _files(model_dir):
  return sorted(p.name for p in model_dir.iterdir())


def test_fresh_run_writes_at_the_start(tmp_path, config_with):
  config_with(1)
  model_dir = tmp_path / "run"
  recorder = operative_config.TrainingConfigRecorder(str(model_dir),
                                                     print_fn=None)
  recorder.training_begins(resumed=False, step=0)
  assert _files(model_dir) == ["config.gin"]
  assert "_configured.value = 1" in (model_dir / "config.gin").read_text()


def test_resumed_run_writes_only_before_its_first_save(tmp_path, config_with):
  config_with(1)
  operative_config.write_training_config(str(tmp_path), 0)
  first = (tmp_path / "config.gin").read_text()
  config_with(2)
  printed = []
  recorder = operative_config.TrainingConfigRecorder(str(tmp_path),
                                                     print_fn=printed.append)
  recorder.training_begins(resumed=True, step=40)
  # A run that stops here (no-op resume, failed start, early divergence)
  # leaves the training config alone.
  assert (tmp_path / "config.gin").read_text() == first
  assert _files(tmp_path) == ["config.gin"]
  recorder.before_save()
  assert "_configured.value = 2" in (tmp_path / "config.gin").read_text()
  # Named after the step the new config trains from.
  assert (tmp_path / "config-40.gin").read_text() == first
  assert printed and str(tmp_path / "config-40.gin") in printed[0]
  recorder.before_save()  # Once only.
  assert _files(tmp_path) == ["config-40.gin", "config.gin"]


def test_same_config_keeps_no_copy_and_names_never_clash(tmp_path,
                                                         config_with):
  config_with(1)
  assert operative_config.write_training_config(str(tmp_path), 0)[1] is None
  assert operative_config.write_training_config(str(tmp_path), 0)[1] is None
  config_with(2)
  _, kept = operative_config.write_training_config(str(tmp_path), 0)
  assert kept == str(tmp_path / "config-0.gin")
  config_with(3)
  _, kept = operative_config.write_training_config(str(tmp_path), 0)
  assert kept == str(tmp_path / "config-0-2.gin")
  assert "value = 2" in (tmp_path / "config-0-2.gin").read_text()
  assert "value = 3" in (tmp_path / "config.gin").read_text()
  assert not [n for n in _files(tmp_path) if n.startswith(".")]


def test_eval_and_other_workers_never_touch_config_gin(tmp_path, config_with):
  config_with(1)
  operative_config.write_training_config(str(tmp_path), 0)
  before = (tmp_path / "config.gin").read_text()
  config_with(2)
  operative_config.write_eval_config(str(tmp_path))
  assert "value = 2" in (tmp_path / "eval_config.gin").read_text()
  worker = operative_config.TrainingConfigRecorder(str(tmp_path),
                                                   enabled=False)
  worker.training_begins(resumed=False)
  worker.before_save()
  assert (tmp_path / "config.gin").read_text() == before
  assert _files(tmp_path) == ["config.gin", "eval_config.gin"]
