"""Shared fixtures.

Real data lives in ../shared/data/coco_tiny160 (relative to the repository
root); it is converted once per test session into a temporary directory.
"""
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COCO_TINY = (REPO_ROOT / ".." / "shared" / "data" / "coco_tiny160").resolve()
SHARED = (REPO_ROOT / ".." / "shared").resolve()
TF1_REFERENCE = SHARED / "reference" / "tpu_detection"

# Keep TensorFlow quiet and single-process friendly in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(config, items):
  """Modules with slow tests run first.

  Under pytest-xdist (`make test`: `--dist loadfile --no-loadscope-reorder`)
  each module runs whole in one worker, so module-scoped fixtures are built
  once; starting with the long modules keeps the workers from waiting for
  one of them at the end.
  """
  del config
  slow = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow)  # Stable.


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory):
  """One JAX persistent compilation cache for every JAX subprocess.

  JAX reads `JAX_COMPILATION_CACHE_DIR` from the environment the
  subprocesses inherit, so a process that compiles a program another one
  already compiled (a resumed `train.py`, its `--mode=eval` run) loads it
  instead of compiling for minutes. What the programs compute is the same.
  """
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(
        tmp_path_factory.mktemp("jax_cache"))
  yield


@pytest.fixture(scope="session")
def coco_tiny_root():
  """Path to coco_tiny160 (80 train + 80 val real COCO images)."""
  if not COCO_TINY.is_dir():
    pytest.skip(f"real test data not found at {COCO_TINY}")
  return COCO_TINY


def _convert(root, split, out_dir, num_shards):
  from official_shapemask.data_prep import coco_tfrecord
  prefix = str(out_dir / split)
  coco_tfrecord.convert_coco_to_tfrecords(
      image_dir=str(root / f"{split}2017"),
      object_annotations_file=str(
          root / "annotations" / f"instances_{split}2017.json"),
      output_file_prefix=prefix,
      num_shards=num_shards,
      num_workers=1,
      show_progress=False)
  return prefix + "-*"


@pytest.fixture(scope="session")
def tiny_val_records(coco_tiny_root, tmp_path_factory):
  """File pattern of coco_tiny160 val2017 converted to 4 TFRecord shards."""
  return _convert(coco_tiny_root, "val", tmp_path_factory.mktemp("val_rec"), 4)


@pytest.fixture(scope="session")
def tiny_train_records(coco_tiny_root, tmp_path_factory):
  """File pattern of coco_tiny160 train2017 converted to 4 TFRecord shards."""
  return _convert(coco_tiny_root, "train", tmp_path_factory.mktemp("train_rec"),
                  4)


@pytest.fixture(scope="session")
def tf1_reference_root():
  """The seed's TF1 code (../shared/reference/tpu_detection), an oracle."""
  if not SHARED.is_dir():
    pytest.skip(f"shared material not found at {SHARED}")
  assert (TF1_REFERENCE / "SOURCE.md").is_file(), (
      f"{SHARED} exists but holds no TF1 reference at {TF1_REFERENCE}")
  return TF1_REFERENCE


@pytest.fixture(scope="session")
def tf1_oracle(tf1_reference_root, tmp_path_factory):
  """Folder written once per session by tests/reference/tf1_oracle.py.

  The reference ShapeMask (ResNet-50-FPN, 128 px, 91 classes, random
  weights) run in its own process (`TF_USE_LEGACY_KERAS=1`): its TF1
  checkpoints, SavedModel, outputs, losses and detections (see the script).
  """
  out = tmp_path_factory.mktemp("tf1_oracle")
  env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3",
             CUDA_VISIBLE_DEVICES="")
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "tests" / "reference" / "tf1_oracle.py"),
       f"--reference={tf1_reference_root}", f"--output_dir={out}",
       "--image_size=128"],
      env=env, capture_output=True, text=True, timeout=1500, check=False)
  if result.returncode != 0 or not (out / "done").is_file():
    pytest.fail("the TF1 reference run failed:\n" + result.stderr[-5000:])
  return out


@pytest.fixture
def run_under_jax():
  """A function running `python -c script *args` with KERAS_BACKEND=jax.

  On the CPU, with the repository root and tests/modeling (for
  `tiny_detector`) on the path; `env` adds environment variables (e.g.
  `JAX_NUM_CPU_DEVICES`). Returns the `subprocess.CompletedProcess` (text
  output). Skips the test when JAX is not installed.
  """
  pytest.importorskip("jax")

  def run(script, *args, timeout=600, env=None):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(
                   [str(REPO_ROOT), str(REPO_ROOT / "tests" / "modeling")]),
               **(env or {}))
    return subprocess.run([sys.executable, "-c", script, *args], env=env,
                          capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO_ROOT), check=False)

  return run
