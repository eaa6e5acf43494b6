"""One training run per model directory, and a model directory it can write.

`train.py --mode=train|train_and_eval` holds `model_dir/train.lock` from
before it restores anything until it ends (`hold`), for either engine:

* A second training run on the same directory stops before it reads or
  writes anything there, in one line naming the holder (host, pid, start
  time) and the lock file.
* A holder that died without releasing (`kill -9`, a crash, a preempted
  machine) is taken over, saying so: on a local filesystem the lock is a
  `fcntl.flock` on the file, which the kernel drops when its process ends;
  a lock file left by a process of this host that no longer runs is
  therefore free. A lock file of another host is never taken over
  silently: its process cannot be checked from here, so the error says to
  delete the file once that run is known to be over.
* `--mode=eval` reads only: it neither takes the lock nor waits for it.
* Only the chief process holds the lock: TF_CONFIG's chief (or worker 0
  when the cluster has no chief) of a `multi_worker` run, process 0 of a
  multi-host JAX run (its index once the processes joined); the others
  hold nothing (`chief_process`). A second multi-worker or multi-host job
  on the same directory stops on its chief; its other processes then wait
  for a chief that is gone until their own timeouts end them.

Remote directories (`gs://...`, anything with `://`) have no file locks.
There the lock is an object written with `tf.io.gfile` and read back after
`SETTLE_SECONDS`: of two runs that start within that time, the later
writer wins and the other stops naming it. This is best effort: an object
store that does not show the newer object within the settle time (or two
writes closer together than its read-after-write guarantee) can let both
start, and a run on another host is never taken over (delete the object
once that run is over).

Before the lock is taken, `check_writable` writes and deletes a probe file
in `model_dir` (creating it if missing), so a directory that cannot be
written is named at once instead of at the first checkpoint save, after
the compute up to it. `check_model_dir` names a `--model_dir` that is a
file, for every mode.
"""

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import time
import uuid

import tensorflow as tf

try:
  import fcntl
except ImportError:  # Not POSIX: the lock file alone, no liveness check.
  fcntl = None

LOCK_FILE = "train.lock"
SETTLE_SECONDS = 2.0


class RunDirError(Exception):
  """`--model_dir` cannot be used: held by another run, a file, unwritable."""


def is_remote(path):
  return "://" in str(path)


def check_model_dir(model_dir):
  """Raises RunDirError when `model_dir` is an existing file (any mode)."""
  if tf.io.gfile.exists(model_dir) and not tf.io.gfile.isdir(model_dir):
    raise RunDirError(f"--model_dir {model_dir} is a file, not a directory")


def _missing_parents(path):
  """`path` and its missing ancestors, deepest first."""
  missing = []
  path = os.path.abspath(path)
  while path and not os.path.exists(path):
    missing.append(path)
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return missing


def check_writable(model_dir):
  """Creates `model_dir` if missing and proves it can be written.

  Returns:
    the directories created (deepest first; a local path), to remove if the
    run ends before it wrote anything (`remove_if_empty`).

  Raises:
    RunDirError: one line naming the directory and the reason.
  """
  check_model_dir(model_dir)
  created = [] if is_remote(model_dir) else _missing_parents(model_dir)
  probe = os.path.join(model_dir, f".write-test-{uuid.uuid4().hex}")
  try:
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("probe")
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as e:
    remove_if_empty(created)
    reason = getattr(e, "strerror", None) or getattr(e, "message", None) or (
        str(e))
    reason = reason.strip().splitlines()[0] if reason.strip() else (
        type(e).__name__)
    for prefix in (f"{probe}; ", f"{probe}: "):  # TensorFlow names the probe.
      reason = reason.replace(prefix, "")
    raise RunDirError(
        f"--model_dir {model_dir} cannot be written ({reason}); training "
        "would fail at its first checkpoint save: give a directory this "
        "user can write to") from None
  return created


def remove_if_empty(created):
  """Removes the directories `check_writable` created, if still empty."""
  for path in created:
    try:
      os.rmdir(path)
    except OSError:
      return


def chief_process(strategy_name="one_device", backend="tensorflow",
                  environ=None, process_index=None):
  """Whether this process is the one that holds the run's lock.

  TensorFlow `multi_worker`: TF_CONFIG's `chief` task, or worker 0 when the
  cluster has no chief (evaluators and other workers hold nothing).
  JAX: process 0, from `process_index` (`jax.process_index()` once the
  processes joined; a TPU pod sets no id) or else
  `KERAS_DISTRIBUTION_PROCESS_ID` (unset: a single process). Every other
  case: True.
  """
  environ = os.environ if environ is None else environ
  if backend == "jax":
    if process_index is not None:
      return int(process_index) == 0
    return int(environ.get("KERAS_DISTRIBUTION_PROCESS_ID") or 0) == 0
  if strategy_name != "multi_worker":
    return True
  try:
    config = json.loads(environ.get("TF_CONFIG") or "{}")
  except ValueError:
    return True  # The strategy names the bad TF_CONFIG when it starts.
  task = config.get("task") or {}
  return is_chief_task(task.get("type"), int(task.get("index") or 0),
                       config.get("cluster") or {})


def is_chief_task(task_type, index, cluster):
  """The chief of a tf.distribute cluster: its `chief` task, or worker 0
  when `cluster` (job name -> addresses) has no chief job."""
  if task_type in (None, "chief"):
    return True
  return task_type == "worker" and index == 0 and "chief" not in cluster


def _process_start(pid):
  """The start time of process `pid` in clock ticks (Linux), or None."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _alive(holder):
  """Whether the holder's process (of this host) still runs."""
  pid = int(holder.get("pid") or 0)
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Another user's process: it exists.
  recorded = holder.get("process_start")
  now = _process_start(pid)
  return not (recorded and now and recorded != now)  # Not a reused pid.


def _describe(holder):
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
          f"started {holder.get('started', '?')}")


def _parse(text):
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


class RunLock:
  """`model_dir/train.lock` for one training run (see the module docstring).

  Args:
    model_dir: the run's directory (local or remote).
    print_fn: reports a lock taken over from a process that died.
    remote: None = by the path (`://`); True forces the object-store
      protocol (tests run it on a local directory).
    settle_seconds: the remote protocol's wait before reading back.
  """

  def __init__(self, model_dir, print_fn=print, remote=None,
               settle_seconds=SETTLE_SECONDS):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILE)
    self.print_fn = print_fn
    self.remote = is_remote(model_dir) if remote is None else bool(remote)
    self.settle_seconds = settle_seconds
    self.info = None
    self._fd = None

  def _own_info(self):
    now = time.time()
    return {
        "host": socket.gethostname(), "pid": os.getpid(),
        "started": datetime.datetime.fromtimestamp(
            now, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "process_start": _process_start(os.getpid()),
        "token": uuid.uuid4().hex,
        "command": " ".join(os.path.basename(a) if i == 0 else a
                            for i, a in enumerate(sys.argv))[:300],
    }

  def _held_error(self, holder):
    if holder.get("host") != socket.gethostname():
      return RunDirError(
          f"--model_dir {self.model_dir} is in use by another training run "
          f"({_describe(holder)}; lock file {self.path}); its process cannot "
          "be checked from this host: if that run is over, delete the lock "
          "file and start again (--mode=eval may read the directory "
          "meanwhile)")
    return RunDirError(
        f"--model_dir {self.model_dir} is in use by another training run "
        f"({_describe(holder)}; lock file {self.path}): wait for it to end or "
        "stop it (--mode=eval may read the directory meanwhile)")

  def _took_over(self, holder):
    if self.print_fn is not None:
      self.print_fn(
          f"Took over {self.path} from a training run that is no longer "
          f"running ({_describe(holder)})")

  # --------------------------------------------------------------- local
  def _acquire_local(self):
    for _ in range(10):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        if fcntl is not None:
          try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
              raise
            holder = _parse(os.pread(fd, 65536, 0).decode(
                "utf-8", "replace")) or {}
            raise self._held_error(holder) from None
        try:  # A releasing holder may have unlinked the file meanwhile.
          same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
          same = False
        if not same:
          os.close(fd)
          fd = None
          continue
        holder = _parse(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
        if holder and holder.get("host") != socket.gethostname():
          raise self._held_error(holder)  # Not checkable from here.
        if holder and fcntl is None and _alive(holder):
          raise self._held_error(holder)
        self.info = self._own_info()
        data = json.dumps(self.info, indent=1).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd, fd = fd, None
        if holder:
          self._took_over(holder)
        return
      finally:
        if fd is not None:
          os.close(fd)
    raise RunDirError(f"cannot take the lock file {self.path}: it keeps "
                      "being replaced by another process")

  def _release_local(self):
    try:
      os.unlink(self.path)  # Still ours: we hold its flock.
    except FileNotFoundError:
      pass
    finally:
      os.close(self._fd)
      self._fd = None

  # -------------------------------------------------------------- remote
  def _read_remote(self):
    try:
      with tf.io.gfile.GFile(self.path, "r") as f:
        return _parse(f.read())
    except tf.errors.NotFoundError:
      return None

  def _acquire_remote(self):
    holder = self._read_remote()
    if holder:
      if holder.get("host") != socket.gethostname() or _alive(holder):
        raise self._held_error(holder)
    self.info = self._own_info()
    with tf.io.gfile.GFile(self.path, "w") as f:
      f.write(json.dumps(self.info, indent=1))
    time.sleep(self.settle_seconds)
    now = self._read_remote()
    if not now or now.get("token") != self.info["token"]:
      self.info = None
      raise self._held_error(now or {})
    if holder:
      self._took_over(holder)

  def _release_remote(self):
    now = self._read_remote()
    if now and now.get("token") == self.info["token"]:
      tf.io.gfile.remove(self.path)

  # -------------------------------------------------------------- public
  def acquire(self):
    """Takes the lock, or raises RunDirError naming its holder."""
    try:
      if self.remote:
        self._acquire_remote()
      else:
        self._acquire_local()
    except (OSError, tf.errors.OpError) as e:
      reason = getattr(e, "strerror", None) or str(e)
      raise RunDirError(f"cannot write the lock file {self.path} "
                        f"({reason.strip().splitlines()[0]})") from None
    return self

  def release(self):
    """Gives the lock up (deletes the file); safe to call twice."""
    if self.info is None:
      return
    try:
      if self.remote:
        self._release_remote()
      elif self._fd is not None:
        self._release_local()
    finally:
      self.info = None


@contextlib.contextmanager
def hold(model_dir, chief=True, print_fn=print):
  """Holds `model_dir` for a training run (a no-op on non-chief processes).

  Checks first that `model_dir` can be written (creating it); directories
  this created are removed again if the run leaves them empty (a start that
  failed on its inputs leaves no trace).

  Raises:
    RunDirError: `model_dir` is a file, cannot be written, or is held by
      another training run (named).
  """
  if not chief:
    yield None
    return
  created = check_writable(model_dir)
  lock = RunLock(model_dir, print_fn=print_fn)
  try:
    lock.acquire()
  except BaseException:
    remove_if_empty(created)
    raise
  try:
    yield lock
  finally:
    lock.release()
    remove_if_empty(created)
