"""The package as a user installs it: wheel, console scripts, gin files.

Builds the wheel from a copy of the checkout (pyproject.toml, README.md,
official_shapemask/, gin/), installs it without dependencies into a fresh
virtual environment that sees this environment's packages (a `.pth` file), and
runs its commands from a folder outside the checkout with no PYTHONPATH, so
that only the installed package can answer.
"""
import os
import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "official_shapemask"
GIN = REPO_ROOT / "gin"
COMMANDS = ("train", "create-coco-tfrecord", "generate-shape-priors",
            "make-synthetic-coco", "export-saved-model", "predict",
            "convert-tf1-checkpoint", "convert-legacy-checkpoint", "demo")


def _run(args, timeout, **kwargs):
  return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                        timeout=timeout, check=False, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """The wheel built from a copy of the checkout (the checkout stays clean)."""
  pytest.importorskip("setuptools")
  tmp = tmp_path_factory.mktemp("wheel")
  src = tmp / "src"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  shutil.copytree(PACKAGE, src / PACKAGE.name, ignore=ignore)
  shutil.copytree(GIN, src / GIN.name, ignore=ignore)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO_ROOT / name, src / name)
  result = _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                 "--no-build-isolation", "--no-index", "--no-cache-dir",
                 "--wheel-dir", tmp / "dist", src], timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  wheels = sorted((tmp / "dist").glob("official_shapemask-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
  """`(bin folder, site-packages)` of a fresh venv holding only the wheel."""
  venv = tmp_path_factory.mktemp("venv")
  result = _run([sys.executable, "-m", "venv", "--without-pip", venv],
                timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  python = venv / "bin" / "python"
  purelib = pathlib.Path(_run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()"
       "['purelib'])"], timeout=60).stdout.strip())
  # This environment's packages (TensorFlow, Keras, pip, ...) after the
  # venv's own: the wheel's official_shapemask comes first.
  shared = [sysconfig.get_paths()["purelib"]] + site.getsitepackages()
  (purelib / "shared_env.pth").write_text("".join(
      f"import site; site.addsitedir({p!r})\n" for p in dict.fromkeys(shared)))
  result = _run([python, "-m", "pip", "install", "--no-deps", "--no-index",
                 "--ignore-installed", "--no-compile", wheel], timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return venv / "bin", purelib


def _outside_env(tmp_path):
  """Runs from `tmp_path` with no PYTHONPATH: the checkout is invisible."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return dict(cwd=str(tmp_path), env=env)


def test_wheel_holds_every_module_and_gin_file(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  modules = {str(p.relative_to(REPO_ROOT)) for p in PACKAGE.rglob("*.py")}
  assert modules and not modules - names, sorted(modules - names)
  configs = {f"official_shapemask/configs/{p.relative_to(GIN)}"
             for p in GIN.rglob("*.gin")}
  assert "official_shapemask/configs/shapemask_r101.gin" in configs
  assert not configs - names, sorted(configs - names)
  assert not [n for n in names if n.startswith(("tests/", "tools/"))]
  entry_points = next(n for n in names if n.endswith("entry_points.txt"))
  text = zipfile.ZipFile(wheel).read(entry_points).decode()
  for command in COMMANDS:
    assert f"shapemask-{command} = official_shapemask.cli." in text, command


def test_installed_package_finds_gin_files_by_name(installed, tmp_path):
  _, purelib = installed
  script = ("import official_shapemask\n"
            "from official_shapemask.training import gin_utils\n"
            "print(official_shapemask.__file__)\n"
            "for name in ('shapemask_r101.gin', 'tiny_cpu',\n"
            "             'benchmarks/shapemask_r101_b256.gin'):\n"
            "  print(gin_utils.find_gin_file(name))\n")
  result = _run([installed[0] / "python", "-c", script], timeout=120,
                **_outside_env(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.split()
  configs = purelib / "official_shapemask" / "configs"
  assert lines == [str(purelib / "official_shapemask" / "__init__.py"),
                   str(configs / "shapemask_r101.gin"),
                   str(configs / "tiny_cpu.gin"),
                   str(configs / "benchmarks" / "shapemask_r101_b256.gin")]


def test_console_scripts_run_outside_the_checkout(installed, tmp_path):
  bin_dir, _ = installed
  for command in COMMANDS:
    assert (bin_dir / f"shapemask-{command}").is_file(), command
  env = _outside_env(tmp_path)
  result = _run([bin_dir / "shapemask-train", "--help"], timeout=120, **env)
  text = result.stdout + result.stderr
  assert result.returncode in (0, 1) and "Traceback" not in text, text
  assert "Train and evaluate ShapeMask" in text and "--gin_file:" in text
  # A real action: the seed's config is found by name in the installed
  # package, its include resolved and parsed; a misspelt macro then stops
  # the run before anything starts, in one line.
  model_dir = tmp_path / "run"
  result = _run([bin_dir / "shapemask-train", "--gin_file=shapemask_r101.gin",
                 "--gin_bindings=TOTAL_STEP=10", f"--model_dir={model_dir}"],
                timeout=300, **env)
  assert result.returncode == 1, result.stderr[-3000:]
  assert ("train.py: error: unknown gin macro(s) TOTAL_STEP"
          in result.stderr), result.stderr[-3000:]
  assert not model_dir.exists()
  # A tool's real action: a tiny synthetic COCO set.
  out = tmp_path / "synthetic"
  result = _run([bin_dir / "shapemask-make-synthetic-coco",
                 f"--output_dir={out}", "--num_train=2", "--num_val=1",
                 "--image_size=64"], timeout=120, **env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (out / "annotations" / "instances_train.json").is_file()
