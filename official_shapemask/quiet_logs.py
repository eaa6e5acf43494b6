"""Keeps TensorFlow's start-up noise out of the tools' output.

A CPU run of a CUDA-enabled TensorFlow prints lines that read like failures
but are not (`E ... cuda_platform.cc:51] failed call to cuInit`,
`E ... oneDNN supports DT_INT64 only on platforms with AVX-512`, a `map_fn`
deprecation notice from tf-models-official's decoder, absl INFO lines such as
`functional_saver.py ... Sharding callback duration`); JAX on a machine
without a TPU says it could not open `libtpu.so`, Orbax warns about the
options of the read-only checkpoint manager that evaluation opens on
purpose, and a TensorFlow run that moves an unreadable checkpoint aside
gets a deprecation notice for the checkpoint-state call it uses.
`install()`, called by `train.py` and the tools before TensorFlow is
imported, removes exactly those:

* `TF_CPP_MIN_LOG_LEVEL` defaults to 2 (TensorFlow's C++ INFO and WARNING
  lines off; its ERROR and FATAL lines still come);
* Python log records below WARNING from code outside this repository
  (TensorFlow, Keras, absl, tf-models-official) are dropped, and the
  `KNOWN_PYTHON_MESSAGES` / `KNOWN_PYTHON_RECORDS` records at any level
  (the latter also on the loggers in `EXTRA_LOGGERS`);
* the process's stderr (file descriptor 2, where TensorFlow's C++ code
  writes) is passed through a small filter process that drops the C++ log
  lines in `KNOWN_NATIVE_LINES` and forwards everything else unchanged as it
  comes. Being a separate process, it still forwards what a crashing process
  wrote last (a fatal C++ CHECK, a Python traceback); it ignores Ctrl-C and
  ends when every writer has closed the pipe.

`SHAPEMASK_VERBOSE=1` turns all of this off (TensorFlow's own defaults).
Child processes inherit the filtered stderr and do not stack a second
filter. Standard library only; no TensorFlow import.
"""

import atexit
import logging
import os
import re
import select
import signal
import subprocess
import sys

VERBOSE_ENV = "SHAPEMASK_VERBOSE"
# "<st_dev>:<st_ino>" of the pipe that feeds the filter; a child process whose
# stderr is that pipe is already filtered.
_FILTERED_ENV = "SHAPEMASK_FILTERED_STDERR"

# TensorFlow's C++ log line prefixes: TSL's
# "2026-11-30 10:41:07.451274: E path/file.cc:51] message" and absl's
# "E1130 10:41:07.451274   12345 file.cc:51] message".
_NATIVE_PREFIX = (r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] "
                  r"|[IWEF]\d{4} [\d:.]+ +\d+ )\S*?")

# (pattern after the prefix, why it is harmless).
KNOWN_NATIVE_LINES = (
    (r"cuda_platform\.cc:\d+\] failed call to cuInit",
     "a CUDA-enabled TensorFlow on a machine without a usable GPU driver "
     "runs on the CPU"),
    (r"util\.cc:\d+\] oneDNN supports DT_INT64 only on platforms with "
     r"AVX-512", "an int64 op uses Eigen instead of oneDNN"),
    (r"\] Unable to register (?:cuDNN|cuFFT|cuBLAS) factory: Attempting to "
     r"register factory for plugin \S+ when one has already been registered",
     "TensorFlow and XLA both register the CUDA plugins"),
    (r"\] computation placer already registered",
     "TensorFlow and XLA both register the placer"),
)

# Substrings of Python warnings (log records) that are not ours to fix.
KNOWN_PYTHON_MESSAGES = (
    # tf-models-official's TfExampleDecoder decodes PNG masks with
    # tf.map_fn(..., dtype=...).
    "calling map_fn_v2 (from tensorflow.python.ops.map_fn) with dtype is "
    "deprecated",
    "Use fn_output_signature instead",
)

# (pattern matched at the start of a record's message, why it is harmless).
KNOWN_PYTHON_RECORDS = (
    (r"Unable to initialize backend 'tpu': .*Failed to open libtpu\.so",
     "JAX looks for a TPU first (logged at INFO by jax._src.xla_bridge); "
     "without libtpu.so it uses the GPUs or the CPU"),
    (r"CheckpointManagerOptions\.read_only=True, setting \w+=\w+\.$",
     "Orbax turns the saving options of a read-only checkpoint manager "
     "off; the JAX engine opens one on purpose to read checkpoints"),
    (r"Given directory is read only=",
     "the same read-only Orbax manager names its directory"),
    (r"From \S+: update_checkpoint_state \(from tensorflow\.python\."
     r"checkpoint\.checkpoint_management\) is deprecated",
     "weights/checkpoints.py rewrites the checkpoint list after moving an "
     "unreadable checkpoint aside; tf.train.CheckpointManager has no call "
     "for it"),
)
# Loggers that log known records directly (a logger's filter applies only
# to its own records, not to those of its children).
EXTRA_LOGGERS = ("jax._src.xla_bridge",)

_NATIVE_RE = re.compile(
    _NATIVE_PREFIX + "(?:" + "|".join(p for p, _ in KNOWN_NATIVE_LINES) + ")")
# A partial line that may still become a native log line is held back.
_MAYBE_NATIVE_START = re.compile(rb"^(?:\d|[IWEF]\d|[IWEF]$)")
_HOLD_SECONDS = 0.2

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_installed = False


def verbose():
  """True when `SHAPEMASK_VERBOSE` asks for TensorFlow's full output."""
  return os.environ.get(VERBOSE_ENV, "").strip().lower() not in (
      "", "0", "false", "no")


def is_known_native_line(line):
  """Whether one stderr line (bytes or str, no newline) is known noise."""
  if isinstance(line, bytes):
    line = line.decode("utf-8", errors="replace")
  return bool(_NATIVE_RE.search(line.rstrip("\r")))


_KNOWN_RECORD_RE = re.compile(
    "|".join(f"(?:{p})" for p, _ in KNOWN_PYTHON_RECORDS), re.MULTILINE)


def is_known_python_message(message):
  """Whether a log record's message (any level) is known noise."""
  return any(known in message for known in KNOWN_PYTHON_MESSAGES) or bool(
      _KNOWN_RECORD_RE.match(message))


class PythonNoiseFilter(logging.Filter):
  """Drops the known records and, with `drop_info`, the INFO/DEBUG records
  of other packages."""

  def __init__(self, drop_info=True):
    super().__init__()
    self.drop_info = drop_info

  def filter(self, record):
    try:
      message = record.getMessage()
    except (TypeError, ValueError):
      message = str(record.msg)
    if is_known_python_message(message):
      return False
    if self.drop_info and record.levelno < logging.WARNING:
      path = os.path.abspath(record.pathname or "")
      return path.startswith(_REPO_ROOT + os.sep) and (
          os.sep + "site-packages" + os.sep not in path)
    return True


def filter_stream(in_fd, out_fd, hold_seconds=_HOLD_SECONDS):
  """Copies `in_fd` to `out_fd` until EOF, without the known native lines.

  Complete lines are forwarded as they arrive; a partial line (a progress
  bar's carriage-return update) is forwarded at once, unless it may be the
  start of a C++ log line, which is held until its newline or for
  `hold_seconds`. After `out_fd` fails (reader gone) the input is still
  drained so writers never block.
  """
  pending = b""
  out_ok = True

  def emit(data):
    nonlocal out_ok
    while out_ok and data:
      try:
        data = data[os.write(out_fd, data):]
      except InterruptedError:
        continue
      except OSError:
        out_ok = False

  while True:
    if pending and not select.select([in_fd], [], [], hold_seconds)[0]:
      emit(pending)
      pending = b""
    try:
      chunk = os.read(in_fd, 65536)
    except InterruptedError:
      continue
    if not chunk:
      break
    lines = (pending + chunk).split(b"\n")
    pending = lines.pop()
    emit(b"".join(line + b"\n" for line in lines
                  if not is_known_native_line(line)))
    if pending and not _MAYBE_NATIVE_START.match(pending):
      emit(pending)
      pending = b""
  if pending and not is_known_native_line(pending):
    emit(pending)


def _fd_identity(fd):
  stat = os.fstat(fd)
  return f"{stat.st_dev}:{stat.st_ino}"


def _start_native_filter():
  """Routes fd 2 through a filter process; returns False where it cannot."""
  if os.name != "posix":
    return False
  try:
    if os.environ.get(_FILTERED_ENV) == _fd_identity(2):
      return True  # Inherited from a parent that filters already.
  except OSError:
    return False  # No stderr at all.
  read_fd, write_fd = os.pipe()
  saved_fd = os.dup(2)
  try:
    proc = subprocess.Popen(
        # -I: no user site, no PYTHON* variables, script dir not on sys.path.
        [sys.executable, "-I", os.path.abspath(__file__)],
        stdin=read_fd, stdout=saved_fd, stderr=saved_fd, close_fds=True)
  except OSError:
    for fd in (read_fd, write_fd, saved_fd):
      os.close(fd)
    return False
  os.close(read_fd)
  sys.stderr.flush()
  os.dup2(write_fd, 2)
  os.close(write_fd)
  os.environ[_FILTERED_ENV] = _fd_identity(2)

  def stop():
    try:
      sys.stderr.flush()
    except (OSError, ValueError):
      pass
    os.dup2(saved_fd, 2)  # Closes this process's end of the pipe.
    os.close(saved_fd)
    try:
      proc.wait(timeout=10)  # Until children holding the pipe are done.
    except subprocess.TimeoutExpired:
      pass

  atexit.register(stop)
  return True


def install():
  """Quiets TensorFlow's known start-up noise (see the module docstring).

  Call it first thing in a tool's `main` / `__main__` block, before
  TensorFlow is imported. Does nothing with `SHAPEMASK_VERBOSE=1`, and
  nothing the second time.

  Returns:
    bool, whether the noise filters are on.
  """
  global _installed
  if verbose():
    return False
  if _installed:
    return True
  _installed = True
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  noise = PythonNoiseFilter()
  for name in ("absl", "tensorflow", "keras", "root"):
    logging.getLogger(None if name == "root" else name).addFilter(noise)
  known_only = PythonNoiseFilter(drop_info=False)
  for name in EXTRA_LOGGERS:
    logging.getLogger(name).addFilter(known_only)
  _start_native_filter()
  return True


def _filter_main():
  # The tool's Ctrl-C reaches the whole process group: keep forwarding its
  # last words until it closes the pipe.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  filter_stream(0, 1)


if __name__ == "__main__":
  _filter_main()
