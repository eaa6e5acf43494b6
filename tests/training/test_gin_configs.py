"""Every gin config parses, builds its model and gives the seed's schedules.

The data macros are bound to existing dummy paths and a [91, 20, 32, 32]
shape-prior file (or one of the config's own class count and mask crop
size). The R-101 model at 1024 px is built and one training step
is traced (not run) on CPU with the real input pipeline's tensor specs.
"""
import os
import pathlib
import re
import subprocess
import sys

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from official_shapemask.dataloaders import shapemask_parser
from official_shapemask.modeling import factory
from official_shapemask.training import datasets
from official_shapemask.training import gin_utils
from official_shapemask.training import optimizers
from official_shapemask.training import settings
from official_shapemask.training import train_loop
from official_shapemask.training import validation

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
GIN_DIR = REPO_ROOT / "gin"
GIN_FILES = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob("*.gin"))

# Hand-written from the issue / the seed's table: batch, total steps, warmup
# (steps, start LR), init LR, decay steps, absolute levels, image size,
# ResNet depth, classes.
def _row(batch, total, warmup, warmup_lr, lr, steps, levels, size, depth,
         classes=91):
  return dict(batch=batch, total=total, warmup=warmup, warmup_lr=warmup_lr,
              lr=lr, steps=steps, levels=levels, size=size, depth=depth,
              classes=classes)


EXPECTED = {
    "shapemask_base.gin": _row(64, 45000, 500, 0.0067, 0.08, (30000, 40000),
                               (0.008, 0.0008), 640, 50),
    "shapemask_r50.gin": _row(64, 45000, 500, 0.0067, 0.08, (30000, 40000),
                              (0.008, 0.0008), 1024, 50),
    "shapemask_r101.gin": _row(64, 45000, 500, 0.0067, 0.08, (30000, 40000),
                               (0.008, 0.0008), 1024, 101),
    "benchmarks/shapemask_r101_b256.gin": _row(
        256, 11250, 1600, 0.0067, 0.24, (7500, 10000), (0.024, 0.0024), 1024,
        101),
    "benchmarks/shapemask_r101_b1024.gin": _row(
        1024, 2813, 1093, 0.0067, 0.64, (2188, 2656), (0.064, 0.0064), 1024,
        101),
    "benchmarks/shapemask_r101_b2048.gin": _row(
        2048, 1800, 600, 0.0067, 0.64, (1200, 1600), (0.064, 0.0064), 1024,
        101),
    "tiny_cpu.gin": _row(4, 200, 20, 0.002, 0.02, (150,), (0.002,), 128, 10),
}
# The parser's mask sampler: the seed's runs used the seed-era one; the
# CPU-sized configs keep the parser's default (docs/architecture.md).
SEED_SAMPLER = {n: "seed_2019" for n in EXPECTED}
SEED_SAMPLER.update({"tiny_cpu.gin": "pad_2020", "demo.gin": "pad_2020"})
# The seed's momentum form and weight decay likewise (docs/seed.md).
SEED_TRAINING = {n: ("tf1", "seed_2019") for n in EXPECTED}
SEED_TRAINING.update({"tiny_cpu.gin": ("keras", "all"),
                      "demo.gin": ("keras", "all")})
# Any other file (demo.gin, ...) is parsed, checked against its own macros
# and, when small, built.
OTHERS = [n for n in GIN_FILES if n not in EXPECTED]


@pytest.fixture(scope="module")
def data_paths(tmp_path_factory):
  """A train pattern that matches a file and priors for 91 and 7 classes."""
  tmp = tmp_path_factory.mktemp("gin_data")
  (tmp / "train-00000-of-00001").write_bytes(b"")
  paths = {"TRAIN_FILE_PATTERN": str(tmp / "train-*")}
  for classes in (91, 7):
    priors = tmp / f"priors_{classes}.npy"
    np.save(priors, np.random.default_rng(classes).uniform(
        0, 1, (classes, 20, 32, 32)).astype(np.float32))
    paths[classes] = str(priors)
  return paths


def _priors_file(data_paths, classes, size=32):
  key = classes if size == 32 else (classes, size)
  if key not in data_paths:
    path = os.path.join(os.path.dirname(data_paths[91]),
                        f"priors_{classes}_{size}.npy")
    np.save(path, np.random.default_rng(classes).uniform(
        0, 1, (classes, 20, size, size)).astype(np.float32))
    data_paths[key] = path
  return data_paths[key]


def _parse(name, data_paths, *extra, classes=91, size=32):
  """Parses `name` with the data macros bound; returns its class count."""
  with gin.unlock_config():
    gin.clear_config()
  priors = _priors_file(data_paths, classes, size)
  bindings = [f"TRAIN_FILE_PATTERN='{data_paths['TRAIN_FILE_PATTERN']}'",
              f"SHAPE_PRIOR_PATH='{priors}'"] + list(extra)
  gin_utils.parse_config([name], bindings)
  bound = gin.get_bindings(factory.build_shapemask_model)
  bound_classes = bound.get("num_classes", 91)
  bound_size = bound.get("mask_crop_size", 32)
  if (bound_classes, bound_size) != (classes, size):
    # Priors of the file's own class count and mask crop size.
    return _parse(name, data_paths, *extra, classes=bound_classes,
                  size=bound_size)
  return bound_classes


@pytest.fixture(autouse=True)
def _clean_gin():
  yield
  with gin.unlock_config():
    gin.clear_config()
  keras.mixed_precision.set_global_policy("float32")


def _model_bindings():
  return gin.get_bindings(factory.build_shapemask_model)


def _lr(schedule, step):
  return float(keras.ops.convert_to_numpy(schedule(step)))


def test_the_seed_configs_exist():
  assert set(EXPECTED) <= set(GIN_FILES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_gin_file_parses_and_gives_its_settings(name, data_paths, tmp_path):
  _parse(name, data_paths)
  row = EXPECTED[name]
  exp = settings.Settings(str(tmp_path / "run"))
  assert exp.train_batch_size == row["batch"]
  assert exp.total_steps == row["total"]
  assert exp.train_file_pattern == data_paths["TRAIN_FILE_PATTERN"]
  model = _model_bindings()
  assert model["image_size"] == row["size"]
  assert model["backbone_depth"] == row["depth"]
  assert model["num_classes"] == row["classes"]
  assert model["shape_prior_path"] == data_paths[row["classes"]]
  # The reference's losses.
  assert (model["focal_loss_alpha"], model["huber_loss_delta"]) == (0.4, 0.15)
  if name != "tiny_cpu.gin":  # The reference's levels.
    assert (model["min_level"], model["max_level"]) == (3, 7)
  # The inputs (priors of the model's class count) pass the pre-start checks.
  validation.validate_inputs("train", exp.train_file_pattern, None, None)

  optimizer = optimizers.build_momentum_optimizer()
  form, l2_rule = SEED_TRAINING[name]
  assert isinstance(optimizer, {"tf1": optimizers.TF1Momentum,
                                "keras": keras.optimizers.SGD}[form])
  assert optimizer.momentum == 0.9 and not optimizer.nesterov
  assert model.get("l2_variables", "all") == l2_rule
  # The schedule as the optimizer serializes it (checkpointed runs).
  schedule = keras.optimizers.schedules.deserialize(
      optimizer.get_config()["learning_rate"])
  expect = lambda value: pytest.approx(value, rel=1e-5)  # noqa: E731
  assert _lr(schedule, 0) == expect(row["warmup_lr"])
  assert _lr(schedule, row["warmup"] // 2) == expect(
      (row["warmup_lr"] + row["lr"]) / 2 if row["warmup"] % 2 == 0 else
      row["warmup_lr"] + (row["warmup"] // 2) / row["warmup"] *
      (row["lr"] - row["warmup_lr"]))
  assert _lr(schedule, row["warmup"]) == expect(row["lr"])
  assert _lr(schedule, row["steps"][0] - 1) == expect(row["lr"])
  for step, level in zip(row["steps"], row["levels"]):
    assert _lr(schedule, step - 1) > level  # Switches exactly at the step.
    assert _lr(schedule, step) == expect(level)
  assert _lr(schedule, row["total"]) == expect(row["levels"][-1])


@pytest.mark.parametrize("name", [n for n in GIN_FILES
                                  if n.startswith("benchmarks/")])
def test_scaling_rows_change_only_the_schedule(name, data_paths):
  # Their model is the R-101 one that test_r101_builds_and_traces builds.
  _parse("shapemask_r101.gin", data_paths)
  r101 = _model_bindings()
  _parse(name, data_paths)
  assert _model_bindings() == r101


@pytest.mark.parametrize("name", GIN_FILES)
def test_mask_sampler_of_each_config(name, data_paths):
  _parse(name, data_paths)
  sampler = gin.get_bindings(shapemask_parser.Parser).get(
      "mask_sampler", "pad_2020")
  assert sampler in shapemask_parser.MASK_SAMPLERS
  if name in SEED_SAMPLER:
    assert sampler == SEED_SAMPLER[name]


def test_mask_sampler_binding_reaches_the_train_parser(data_paths,
                                                       monkeypatch):
  built = []
  monkeypatch.setattr(datasets.input_reader, "build_dataset",
                      lambda pattern, parser, *args, **kwargs:
                      built.append(parser))
  for sampler in shapemask_parser.MASK_SAMPLERS:
    _parse("tiny_cpu.gin", data_paths, f"Parser.mask_sampler = '{sampler}'")
    model = factory.build_shapemask_model()
    datasets.make_train_dataset_fn("unused-*", 4, model)(
        tf.distribute.InputContext())
    assert (built[-1].mode, built[-1].mask_sampler) == ("train", sampler)


def _check_built(model, name, data_paths):
  row = EXPECTED[name]
  assert model.image_size == row["size"]
  assert model.backbone.get_config()["depth"] == row["depth"]
  assert model.head.get_config()["num_classes"] == row["classes"]
  priors = model.prior_head.shape_priors.numpy()
  assert priors.shape == (row["classes"], 20, 32, 32)  # K from the file.
  np.testing.assert_allclose(priors, np.load(data_paths[row["classes"]]))


def test_tiny_cpu_builds(data_paths):
  _parse("tiny_cpu.gin", data_paths)
  _check_built(factory.build_shapemask_model(), "tiny_cpu.gin", data_paths)


@pytest.mark.parametrize("name", OTHERS)
def test_other_gin_files_parse_and_small_ones_build(name, data_paths,
                                                    tmp_path):
  classes = _parse(name, data_paths)
  exp = settings.Settings(str(tmp_path / "run"))
  assert exp.total_steps > 0 and exp.train_batch_size > 0
  validation.validate_inputs("train", exp.train_file_pattern, None, None)
  schedule = keras.optimizers.schedules.deserialize(
      optimizers.build_momentum_optimizer().get_config()["learning_rate"])
  config = schedule.get_config()
  if "warmup_learning_rate" in config:
    assert _lr(schedule, 0) == pytest.approx(config["warmup_learning_rate"])
  for step in (0, exp.total_steps // 2, exp.total_steps):
    assert 0 < _lr(schedule, step) < 10
  bound = _model_bindings()
  if name in SEED_TRAINING:
    form, l2_rule = SEED_TRAINING[name]
    assert gin.query_parameter(
        "build_momentum_optimizer.momentum_form") == form
    assert bound.get("l2_variables", "all") == l2_rule
  if bound.get("image_size", 1024) <= 256:  # Cheap enough to build here.
    model = factory.build_shapemask_model()
    assert model.image_size == bound["image_size"]
    assert model.prior_head.shape_priors.shape[0] == classes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shapemask_base.gin", "shapemask_r50.gin"])
def test_r50_configs_build(name, data_paths):
  _parse(name, data_paths)
  _check_built(factory.build_shapemask_model(), name, data_paths)


@pytest.mark.slow
def test_r101_builds_and_traces_one_train_step(data_paths, tiny_train_records):
  _parse("shapemask_r101.gin", data_paths)
  model = factory.build_shapemask_model()
  _check_built(model, "shapemask_r101.gin", data_paths)
  assert model.count_params() > 50_000_000
  optimizer = optimizers.build_momentum_optimizer()
  optimizer.build(model.trainable_variables)
  # Specs of the real training input at 1024 px, batch 1 (graph only).
  dataset = datasets.make_train_dataset_fn(
      tiny_train_records, 1, model)(tf.distribute.InputContext())
  images_spec, labels_spec = dataset.element_spec
  assert images_spec.shape == (1, 1024, 1024, 3)
  loop = train_loop.TrainLoop(tf.distribute.get_strategy(), model, optimizer)
  concrete = tf.function(loop.replica_step).get_concrete_function(
      images_spec, labels_spec)
  assert set(concrete.structured_outputs) == set(train_loop.LOSS_KEYS)
  op_types = [op.type for op in concrete.graph.get_operations()]
  assert op_types.count("Conv2D") >= 104 + 5  # R101 + FPN (+ heads).
  assert "Conv2DBackpropFilter" in op_types  # Gradients are part of it.
  assert int(optimizer.iterations.numpy()) == 0  # Traced, never run.


# ------------------------------------------------------------ unknown names
@pytest.mark.parametrize("binding,name", [
    ("Experimentt.total_steps = 3", "Experimentt"),
    ("Experiment.total_stepz = 3", "total_stepz"),
    ("build_shapemask_model.num_clases = 3", "num_clases"),
    ("TOTAL_STEP = 3", "TOTAL_STEP"),  # A misspelt macro.
    ("Experiment.steps_per_loop = %STEPS_PER_LOOOP", "STEPS_PER_LOOOP"),
])
def test_unknown_names_fail_at_parse(binding, name, data_paths):
  with pytest.raises(gin_utils.ConfigError, match=name):
    _parse("tiny_cpu.gin", data_paths, binding)


def test_unknown_gin_file_and_include(tmp_path, data_paths):
  with pytest.raises(gin_utils.ConfigError, match="nosuch.gin"):
    _parse("nosuch.gin", data_paths)
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'not_there.gin'\n")
  with pytest.raises(gin_utils.ConfigError, match="not_there.gin"):
    _parse(str(bad), data_paths)


def test_syntax_errors_name_the_binding_or_the_file(tmp_path, data_paths):
  with pytest.raises(gin_utils.ConfigError) as err:
    _parse("tiny_cpu.gin", data_paths, "TOTAL_STEPS=2a")
  assert "--gin_bindings='TOTAL_STEPS=2a'" in str(err.value)
  assert "\n" not in str(err.value)
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'tiny_cpu.gin'\nTOTAL_STEPS = 2a\n")
  with pytest.raises(gin_utils.ConfigError) as err:
    _parse(str(bad), data_paths)
  assert f"gin file {bad} line 2" in str(err.value)


def _run_train_py(*args, timeout=240):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)


@pytest.mark.parametrize("binding,error", [
    ("TOTAL_STEP=10", "unknown gin macro(s) TOTAL_STEP"),
    ("TOTAL_STEPS=2a", "gin syntax error in --gin_bindings='TOTAL_STEPS=2a'"),
])
def test_train_py_bad_binding_fails_before_start(tmp_path, data_paths,
                                                 binding, error):
  model_dir = tmp_path / "run"
  result = _run_train_py(
      "--gin_file=tiny_cpu.gin",
      f"--gin_bindings=TRAIN_FILE_PATTERN='{data_paths['TRAIN_FILE_PATTERN']}'",
      f"--gin_bindings={binding}", f"--model_dir={model_dir}")
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"train.py: error: {error}" in result.stderr
  assert "Traceback" not in result.stderr
  assert not model_dir.exists()


def test_train_py_help_explains_every_flag():
  result = _run_train_py("--help", timeout=120)
  text = result.stdout + result.stderr
  # absl prints the usage to stdout and exits 1 after --help.
  assert result.returncode in (0, 1) and "Traceback" not in text, text
  source = (REPO_ROOT / "official_shapemask" / "cli" / "train.py").read_text()
  flags = re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source)
  assert set(flags) >= {"gin_file", "gin_bindings", "model_dir", "mode",
                        "strategy", "tpu", "eval_timeout"}
  for flag in flags:
    match = re.search(rf"--{flag}: (.+?)(?=\n  --|\Z)", text, re.S)
    assert match, flag
    assert len(match.group(1).split()) >= 6, (flag, match.group(1))


def test_overriding_a_macros_only_use_is_not_a_misspelling(data_paths):
  """tiny_cpu.gin sets EVAL_SAMPLES for Experiment.eval_samples; binding
  the parameter itself leaves the file's macro unused, which is fine; a
  macro bound on the command line and used nowhere is still refused."""
  _parse("tiny_cpu.gin", data_paths, "Experiment.eval_samples = 8")
  assert gin.query_parameter("Experiment.eval_samples") == 8
  with pytest.raises(gin_utils.ConfigError, match="EVAL_SAMPLEZ"):
    _parse("tiny_cpu.gin", data_paths, "EVAL_SAMPLEZ = 8")


def test_every_configurable_module_is_registered():
  """A run's config.gin names every configurable it called (e.g.
  `build_dataset.cache`); parsing it elsewhere (export, a resumed run)
  needs `register_configurables` to import each module that defines one."""
  package = REPO_ROOT / "official_shapemask"
  defining = sorted(
      ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
      for path in package.rglob("*.py")
      if "@gin.configurable" in path.read_text())
  assert "official_shapemask.dataloaders.input_reader" in defining
  script = (
      "import sys\n"
      "from official_shapemask.training import gin_utils\n"
      "gin_utils.register_configurables()\n"
      "print(' '.join(m for m in sys.argv[1:] if m not in sys.modules))\n")
  proc = subprocess.run(
      [sys.executable, "-c", script, *defining], cwd=REPO_ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES=""),
      capture_output=True, text=True, timeout=300, check=True)
  assert proc.stdout.split() == [], proc.stdout
