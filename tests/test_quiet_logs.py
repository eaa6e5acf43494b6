"""official_shapemask.quiet_logs: TensorFlow's start-up noise off, errors on.

The lines below are the ones `make demo` printed on this project's CPU
machine (TensorFlow 2.20) before the filter existed.
"""
import logging
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import threading

import pytest

from official_shapemask import quiet_logs

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

CUINIT = ("2026-11-30 10:41:07.451274: E external/local_xla/xla/"
          "stream_executor/cuda/cuda_platform.cc:51] failed call to cuInit: "
          "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")
ONEDNN = ("2026-11-30 10:41:38.961770: E tensorflow/core/util/util.cc:131] "
          "oneDNN supports DT_INT64 only on platforms with AVX-512. Falling "
          "back to the default Eigen-based implementation if present.")
CUDNN_ABSL = ("E0000 00:00:1732958467.123456   12345 cuda_dnn.cc:8310] Unable "
              "to register cuDNN factory: Attempting to register factory for "
              "plugin cuDNN when one has already been registered")
REAL_ERROR = ("2026-11-30 10:41:07.451274: E tensorflow/core/framework/"
              "op_kernel.cc:1855] OP_REQUIRES failed at conv_ops.cc:1: "
              "RESOURCE_EXHAUSTED: out of memory")

# A TensorFlow C++ ERROR/WARNING line or an absl-formatted Python one.
TF_LOG_LINE = re.compile(
    r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [EWF] |[EWF]\d{4} "
    r"[\d:.]+ +\d+ \S+\] )", re.MULTILINE)


def tensorflow_log_lines(text):
  """The TensorFlow E/W/F log lines of a captured output."""
  return [m.group(0) + text[m.end():].split("\n", 1)[0]
          for m in TF_LOG_LINE.finditer(text)]


def test_known_lines_and_real_errors():
  for line in (CUINIT, ONEDNN, CUDNN_ABSL, CUINIT + "\r"):
    assert quiet_logs.is_known_native_line(line), line
    assert quiet_logs.is_known_native_line(line.encode()), line
  for line in (REAL_ERROR,
               "failed call to cuInit",  # Not a log line (e.g. our text).
               "train: 50%|#####     | 8/16",
               CUINIT.replace(": E external", ": E my_plugin") .replace(
                   "cuda_platform.cc", "cuda_plat.cc")):
    assert not quiet_logs.is_known_native_line(line), line


def _pipe_through_filter(chunks, hold_seconds=0.05):
  read_in, write_in = os.pipe()
  read_out, write_out = os.pipe()
  worker = threading.Thread(target=quiet_logs.filter_stream,
                            args=(read_in, write_out, hold_seconds))
  worker.start()
  for chunk in chunks:
    os.write(write_in, chunk)
  os.close(write_in)
  worker.join(timeout=10)
  os.close(write_out)
  out = b""
  while True:
    data = os.read(read_out, 65536)
    if not data:
      break
    out += data
  os.close(read_in)
  os.close(read_out)
  return out.decode()


def test_filter_stream_drops_known_lines_and_keeps_the_rest():
  text = _pipe_through_filter([
      (CUINIT + "\n").encode(),
      b"\rtrain:  50%|#####",  # A progress bar: no newline, passes at once.
      b"\rtrain: 100%|##########\n",
      # A known line split over two writes is still recognised.
      ONEDNN[:40].encode(), (ONEDNN[40:] + "\n").encode(),
      (REAL_ERROR + "\n" + CUDNN_ABSL + "\nTraceback (most recent call "
       "last):\nValueError: boom\n").encode(),
      b"2026 no newline at the end",
  ])
  assert text == ("\rtrain:  50%|#####\rtrain: 100%|##########\n" +
                  REAL_ERROR + "\nTraceback (most recent call last):\n"
                  "ValueError: boom\n2026 no newline at the end")


def test_python_filter():
  noise = quiet_logs.PythonNoiseFilter()

  def record(level, path, message):
    return logging.LogRecord("tensorflow", level, path, 1, message, None,
                             None)

  site = "/x/.venv/lib/python3.11/site-packages/tensorflow/saver.py"
  ours = str(REPO_ROOT / "official_shapemask" / "training" / "modes.py")
  assert not noise.filter(record(logging.INFO, site, "Sharding callback"))
  assert noise.filter(record(logging.INFO, ours, "our progress"))
  assert noise.filter(record(logging.WARNING, site, "a real warning"))
  assert not noise.filter(record(
      logging.WARNING, site, "From x.py:1: calling map_fn_v2 (from "
      "tensorflow.python.ops.map_fn) with dtype is deprecated and will be "
      "removed in a future version."))


_SCRIPT = textwrap.dedent("""
    import logging, os, sys, subprocess
    from official_shapemask import quiet_logs
    quiet_logs.install()
    print("level", os.environ.get("TF_CPP_MIN_LOG_LEVEL"), flush=True)
    os.write(2, ({cuinit!r} + "\\n").encode())
    os.write(2, ({real!r} + "\\n").encode())
    logging.getLogger("tensorflow").warning(
        "calling map_fn_v2 (from tensorflow.python.ops.map_fn) with dtype is "
        "deprecated")
    logging.getLogger("tensorflow").warning("a real warning")
    # A child inherits the filtered stderr and adds no second filter.
    subprocess.run([sys.executable, "-c", "import os, sys; "
                    "from official_shapemask import quiet_logs; "
                    "quiet_logs.install(); "
                    "os.write(2, ({cuinit!r} + '\\\\nchild says hi\\\\n')"
                    ".encode())"], check=True)
    sys.stderr.write("last words before the crash\\n")
    os.abort()
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_crash_output_survives_and_verbose_shows_all(tmp_path, verbose):
  script = tmp_path / "tool.py"
  script.write_text(_SCRIPT.format(cuinit=CUINIT, real=REAL_ERROR))
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet_logs.VERBOSE_ENV)}
  env["PYTHONPATH"] = str(REPO_ROOT)  # The checkout's package.
  if verbose:
    env[quiet_logs.VERBOSE_ENV] = "1"
  proc = subprocess.run([sys.executable, str(script)], env=env,
                        capture_output=True, text=True, timeout=60,
                        check=False)
  assert proc.returncode != 0  # os.abort()
  err = proc.stderr
  assert REAL_ERROR in err and "a real warning" in err
  assert "child says hi" in err
  assert err.rstrip().endswith("last words before the crash")
  if verbose:
    assert "level None" in proc.stdout
    assert err.count("failed call to cuInit") == 2 and "map_fn_v2" in err
  else:
    assert "level 2" in proc.stdout
    assert "cuInit" not in err and "map_fn_v2" not in err


@pytest.mark.parametrize("value,expected", [
    ("", False), ("0", False), ("false", False), ("1", True), ("yes", True)])
def test_verbose_switch(monkeypatch, value, expected):
  monkeypatch.setenv(quiet_logs.VERBOSE_ENV, value)
  assert quiet_logs.verbose() is expected


def test_tensorflow_run_is_quiet_and_its_errors_show(tmp_path):
  """A healthy TensorFlow run prints no E/W lines; a failing op still does."""
  script = tmp_path / "tf_run.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      from official_shapemask import quiet_logs
      quiet_logs.install()
      import tensorflow as tf
      x = tf.constant([[1, 2], [3, 4]], tf.int64)
      print("healthy", int(tf.reduce_sum(tf.matmul(x, x))), flush=True)
      tf.io.read_file(sys.argv[1])
  """))
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet_logs.VERBOSE_ENV)}
  env["PYTHONPATH"] = str(REPO_ROOT)  # The checkout's package.
  missing = tmp_path / "no_such_file"
  proc = subprocess.run([sys.executable, str(script), str(missing)], env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert "healthy 54" in proc.stdout
  assert proc.returncode == 1
  assert not tensorflow_log_lines(proc.stderr), proc.stderr[-3000:]
  assert "NotFoundError" in proc.stderr and str(missing) in proc.stderr


# The records below are the ones a JAX run of train.py (libtpu, Orbax) and a
# TensorFlow resume past an unreadable checkpoint printed on this project's
# CPU machine before they were filtered (message text as logged).
LIBTPU = ("Unable to initialize backend 'tpu': INTERNAL: Failed to open "
          "libtpu.so: libtpu.so: cannot open shared object file: No such "
          "file or directory")
ORBAX_READ_ONLY = (
    "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.",
    "CheckpointManagerOptions.read_only=True, setting create=False.",
    "CheckpointManagerOptions.read_only=True, setting max_to_keep=None.",
    "Given directory is read only=/tmp/run/checkpoints")
TF_STATE_DEPRECATION = (
    "From /work/official_shapemask/weights/checkpoints.py:371: "
    "update_checkpoint_state (from tensorflow.python.checkpoint."
    "checkpoint_management) is deprecated and will be removed in a future "
    "version.\nInstructions for updating:\nUse `tf.train.CheckpointManager` "
    "to manage checkpoints rather than manually editing the Checkpoint "
    "proto.")


def test_known_python_records_and_their_neighbours():
  def record(level, message, name="absl"):
    return logging.LogRecord(name, level, "/x/site-packages/y.py", 1, message,
                             None, None)

  noise = quiet_logs.PythonNoiseFilter()
  known_only = quiet_logs.PythonNoiseFilter(drop_info=False)
  for message in ORBAX_READ_ONLY + (TF_STATE_DEPRECATION,):
    assert not noise.filter(record(logging.WARNING, message)), message
  assert not known_only.filter(record(logging.INFO, LIBTPU, "jax._src"))
  for message in (
      # Orbax refusing a save or a delete would be a bug of ours: it shows.
      "/tmp/run/checkpoints is read only, save will be skipped",
      "CheckpointManagerOptions.read_only=True, setting",
      # Another backend failing, another deprecated call: they show.
      "Unable to initialize backend 'cuda': no GPU driver",
      "From x.py:1: remove_checkpoint (from tensorflow.python.checkpoint."
      "checkpoint_management) is deprecated",
      "a real warning mentioning libtpu.so"):
    assert noise.filter(record(logging.WARNING, message)), message
    assert known_only.filter(record(logging.INFO, message, "jax._src"))
  # The known-only filter keeps other INFO lines (the others drop them).
  assert known_only.filter(record(logging.INFO, "compiled in 3 s"))
  assert not noise.filter(record(logging.INFO, "compiled in 3 s"))


_JAX_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    from absl import app
    from official_shapemask import help_flags, quiet_logs
    quiet_logs.install()

    def main(argv):
      model_dir = argv[1]
      import jax
      print("devices", jax.devices(), flush=True)  # Looks for a TPU first.
      import tensorflow as tf
      from official_shapemask.weights import checkpoints, jax_checkpoints
      # Evaluation's read-only Orbax manager (train_step: unused to list).
      os.makedirs(os.path.join(model_dir, "checkpoints"))
      manager = jax_checkpoints.CheckpointManager(model_dir, None,
                                                  read_only=True)
      print("orbax steps", manager.all_steps(), flush=True)
      # A TensorFlow resume that moves an unreadable checkpoint aside.
      tf_dir = os.path.join(model_dir, "tf")
      ckpt = tf.train.Checkpoint(v=tf.Variable(1.0))
      saver = tf.train.CheckpointManager(ckpt, tf_dir, max_to_keep=3)
      saver.save()
      newest = saver.save()
      data = tf.io.gfile.glob(newest + ".data-*")[0]
      with open(data, "r+b") as f:
        f.truncate(2)
      restored = checkpoints.restore_newest_readable(
          ckpt, tf_dir, move_unreadable=True, print_fn=None)
      print("restored", os.path.basename(restored), flush=True)

    help_flags.run(main)
""")


@pytest.mark.parametrize("verbose", [False, True])
def test_jax_orbax_and_tf_resume_records_are_quiet(tmp_path, verbose):
  """libtpu.so, Orbax's read-only options and the checkpoint-state notice
  come from the very calls the engines make; only they are dropped."""
  pytest.importorskip("jax")
  pytest.importorskip("orbax.checkpoint")
  script = tmp_path / "engine.py"
  script.write_text(_JAX_SCRIPT.format(repo=str(REPO_ROOT)))
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", quiet_logs.VERBOSE_ENV,
                      "JAX_PLATFORMS")}  # Unset: JAX tries the TPU first.
  env.update(KERAS_BACKEND="jax", PYTHONPATH=str(REPO_ROOT),
             CUDA_VISIBLE_DEVICES="")
  if verbose:
    env[quiet_logs.VERBOSE_ENV] = "1"
  proc = subprocess.run([sys.executable, str(script), str(tmp_path / "run")],
                        env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "orbax steps []" in proc.stdout
  assert "restored ckpt-1" in proc.stdout
  err = proc.stderr
  lines = ("Failed to open libtpu.so", "read_only=True, setting",
           "Given directory is read only=", "update_checkpoint_state")
  if verbose:  # The calls above do print them.
    for line in lines:
      assert line in err, (line, err[-3000:])
  else:
    for line in lines:
      assert line not in err, (line, err[-3000:])
