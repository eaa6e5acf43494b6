"""`--help` exits 0 on train.py and every program in tools/.

absl's help flags exit with status 1 by themselves;
`official_shapemask.help_flags` makes them exit 0 (`cli/entry.run`). A flag
that does not parse still exits 1.
"""
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOLS = REPO_ROOT / "tools"
# train.py and tools/*.py run as scripts; the benchmark tooling of
# tools/bench as modules (`python -m tools.bench.<name>`), its shell script
# with bash.
SCRIPTS = sorted(
    [REPO_ROOT / "train.py"] +
    [p for p in TOOLS.rglob("*.py") if "__main__" in p.read_text()] +
    sorted(TOOLS.rglob("*.sh")))


def _run(script, *args):
  if script.suffix == ".sh":
    command = ["bash", str(script)]
  elif script.parent == TOOLS / "bench":
    command = [sys.executable, "-m", f"tools.bench.{script.stem}"]
  else:
    command = [sys.executable, str(script)]
  # This checkout's package first (an installed one may be another's).
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
             PYTHONPATH=os.pathsep.join(
                 [str(REPO_ROOT)] + [p for p in [os.environ.get(
                     "PYTHONPATH")] if p]))
  return subprocess.run(command + list(args), cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)


def test_every_script_is_listed():
  names = {p.name for p in SCRIPTS}
  assert {"train.py", "predict.py", "export_saved_model.py",
          "create_coco_tfrecord.py", "benchmark.py", "benchmark_input.py",
          "benchmark_eval.py", "gpu_benchmark.sh"} <= names
  # Every launcher of tools/ (all but the package marker) is a script.
  assert names >= {p.name for p in TOOLS.glob("*.py")
                   if p.name != "__init__.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_exits_0_with_the_usage(script):
  proc = _run(script, "--help")
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  usage = proc.stdout
  assert len(usage.splitlines()) >= 10, usage
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["-?", "--helpshort", "--helpfull"])
def test_other_absl_help_flags_exit_0(flag):
  proc = _run(REPO_ROOT / "train.py", flag)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--model_dir" in proc.stdout


def test_a_bad_flag_still_exits_1():
  proc = _run(REPO_ROOT / "tools" / "predict.py", "--no_such_flag")
  assert proc.returncode == 1
  assert "Unknown command line flag 'no_such_flag'" in proc.stderr
  proc = _run(REPO_ROOT / "tools" / "make_synthetic_coco.py")  # Required.
  assert proc.returncode == 1
  assert "--output_dir" in proc.stderr
