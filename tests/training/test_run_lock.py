"""One training run per model directory (`training/run_lock.py`).

The lock is tested between real processes: a holder subprocess takes it and
waits; this process (or a `train.py`) must be refused, naming the holder,
and must take the lock over once the holder is killed. Two `train.py`
started half a second apart on one directory: one trains, the other stops
in one line naming it. A directory that cannot be written, or a
`--model_dir` that is a file, is one line before any training.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from official_shapemask.training import run_lock

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
HOST = socket.gethostname()
_HOLDER = textwrap.dedent("""
    import sys
    from official_shapemask.training import run_lock
    lock = run_lock.RunLock(sys.argv[1], print_fn=None).acquire()
    print(lock.info["pid"], lock.info["started"], flush=True)
    sys.stdin.read()  # Holds the lock until stdin closes (or a kill).
    lock.release()
""")


class Holder:
  """A process that holds `model_dir`'s lock until `stop` or `kill`."""

  def __init__(self, model_dir):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    self.proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(model_dir)], cwd=REPO_ROOT,
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    line = self.proc.stdout.readline()
    assert line, self.proc.stderr.read()
    pid, self.started = line.rstrip("\n").split(" ", 1)
    assert int(pid) == self.proc.pid
    self.pid = self.proc.pid

  def describe(self):
    return f"host {HOST}, pid {self.pid}, started {self.started}"

  def stop(self):
    self.proc.stdin.close()
    assert self.proc.wait(timeout=60) == 0, self.proc.stderr.read()

  def kill(self):
    self.proc.send_signal(signal.SIGKILL)
    self.proc.wait(timeout=60)
    self.proc.stdin.close()


def _in_use(model_dir, holder):
  lock = os.path.join(model_dir, run_lock.LOCK_FILE)
  return (f"--model_dir {model_dir} is in use by another training run "
          f"({holder}; lock file {lock}): wait for it to end or stop it "
          "(--mode=eval may read the directory meanwhile)")


def test_a_live_holder_refuses_and_a_dead_one_is_taken_over(tmp_path):
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  holder = Holder(model_dir)
  try:
    with pytest.raises(run_lock.RunDirError) as err:
      run_lock.RunLock(str(model_dir), print_fn=None).acquire()
    assert str(err.value) == _in_use(model_dir, holder.describe())
  finally:
    holder.kill()  # Dies holding it: the file stays, the flock goes.
  lock_file = model_dir / run_lock.LOCK_FILE
  assert json.loads(lock_file.read_text())["pid"] == holder.pid
  printed = []
  lock = run_lock.RunLock(str(model_dir), print_fn=printed.append).acquire()
  assert printed == [
      f"Took over {lock_file} from a training run that is no longer running "
      f"({holder.describe()})"]
  assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  lock.release()
  assert not lock_file.exists()


def test_a_released_lock_is_free_again_without_a_word(tmp_path):
  holder = Holder(tmp_path)
  holder.stop()
  assert not (tmp_path / run_lock.LOCK_FILE).exists()
  printed = []
  with run_lock.hold(str(tmp_path), print_fn=printed.append) as lock:
    assert lock.info["pid"] == os.getpid()
  assert printed == [] and os.listdir(tmp_path) == []


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
  lock_file = tmp_path / run_lock.LOCK_FILE
  text = json.dumps({"host": "tpu-vm-7", "pid": 4242,
                     "started": "2026-12-01 10:00:00 UTC"})
  lock_file.write_text(text)
  with pytest.raises(run_lock.RunDirError) as err:
    run_lock.RunLock(str(tmp_path), print_fn=None).acquire()
  assert str(err.value) == (
      f"--model_dir {tmp_path} is in use by another training run (host "
      "tpu-vm-7, pid 4242, started 2026-12-01 10:00:00 UTC; lock file "
      f"{lock_file}); its process cannot be checked from this host: if that "
      "run is over, delete the lock file and start again (--mode=eval may "
      "read the directory meanwhile)")
  assert lock_file.read_text() == text


def test_hold_removes_the_directories_it_created_when_left_empty(tmp_path):
  model_dir = tmp_path / "new" / "run"
  with pytest.raises(RuntimeError):
    with run_lock.hold(str(model_dir), print_fn=None):
      assert (model_dir / run_lock.LOCK_FILE).exists()
      raise RuntimeError("the data pattern matches nothing")
  assert os.listdir(tmp_path) == []
  with run_lock.hold(str(model_dir), print_fn=None):
    (model_dir / "ckpt-1.index").write_text("written")
  assert os.listdir(model_dir) == ["ckpt-1.index"]


def test_a_model_dir_that_is_a_file_or_under_a_file(tmp_path):
  afile = tmp_path / "notes.txt"
  afile.write_text("keep")
  with pytest.raises(run_lock.RunDirError,
                     match=f"^--model_dir {afile} is a file, not a "
                     "directory$"):
    run_lock.check_writable(str(afile))
  with pytest.raises(run_lock.RunDirError,
                     match=re.escape(
                         f"--model_dir {afile}/run cannot be written ({afile} "
                         "is not a directory); training would fail at its "
                         "first checkpoint save")):
    run_lock.check_writable(str(afile / "run"))
  assert afile.read_text() == "keep"


class _Remote:
  """`RunLock(remote=True)`: the object-store protocol on a local folder."""

  @staticmethod
  def lock(model_dir, printed=None):
    return run_lock.RunLock(
        str(model_dir), print_fn=None if printed is None else printed.append,
        remote=True, settle_seconds=0.01)


def test_remote_protocol(tmp_path, monkeypatch):
  lock_file = tmp_path / run_lock.LOCK_FILE
  lock = _Remote.lock(tmp_path).acquire()
  assert json.loads(lock_file.read_text())["token"] == lock.info["token"]
  # Held by a live process of this host (this one): refused.
  with pytest.raises(run_lock.RunDirError) as err:
    _Remote.lock(tmp_path).acquire()
  assert f"pid {os.getpid()}" in str(err.value)
  lock.release()
  assert not lock_file.exists()
  # Left by a process of this host that ended: taken over, saying so.
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  dead = {"host": HOST, "pid": int(gone.stdout), "started": "earlier"}
  lock_file.write_text(json.dumps(dead))
  printed = []
  lock = _Remote.lock(tmp_path, printed).acquire()
  assert printed == [
      f"Took over {lock_file} from a training run that is no longer running "
      f"(host {HOST}, pid {dead['pid']}, started earlier)"]
  lock.release()
  # Another host: refused, whatever its pid.
  lock_file.write_text(json.dumps(dict(dead, host="worker-3")))
  with pytest.raises(run_lock.RunDirError, match="cannot be checked from "
                     "this host: if that run is over, delete the lock file"):
    _Remote.lock(tmp_path).acquire()
  lock_file.unlink()
  # Another run writes its lock within the settle time: the later writer
  # holds it, this one stops naming it and leaves its lock alone.
  rival = {"host": "worker-3", "pid": 77, "started": "just now",
           "token": "rival"}

  def rival_writes(seconds):
    del seconds
    lock_file.write_text(json.dumps(rival))

  monkeypatch.setattr(run_lock.time, "sleep", rival_writes)
  with pytest.raises(run_lock.RunDirError,
                     match=re.escape("(host worker-3, pid 77, started just "
                                     "now;")):
    _Remote.lock(tmp_path).acquire()
  assert json.loads(lock_file.read_text()) == rival


@pytest.mark.parametrize("strategy,backend,environ,chief", [
    ("one_device", "tensorflow", {}, True),
    ("multi_worker", "tensorflow", {"TF_CONFIG": json.dumps(
        {"cluster": {"worker": ["a:1", "b:1"]},
         "task": {"type": "worker", "index": 0}})}, True),
    ("multi_worker", "tensorflow", {"TF_CONFIG": json.dumps(
        {"cluster": {"worker": ["a:1", "b:1"]},
         "task": {"type": "worker", "index": 1}})}, False),
    ("multi_worker", "tensorflow", {"TF_CONFIG": json.dumps(
        {"cluster": {"chief": ["c:1"], "worker": ["a:1"]},
         "task": {"type": "worker", "index": 0}})}, False),
    ("multi_worker", "tensorflow", {"TF_CONFIG": json.dumps(
        {"cluster": {"chief": ["c:1"], "worker": ["a:1"]},
         "task": {"type": "chief", "index": 0}})}, True),
    ("multi_worker", "tensorflow", {"TF_CONFIG": json.dumps(
        {"cluster": {"worker": ["a:1"], "evaluator": ["e:1"]},
         "task": {"type": "evaluator", "index": 0}})}, False),
    ("one_device", "jax", {}, True),
    ("one_device", "jax", {"KERAS_DISTRIBUTION_PROCESS_ID": "0"}, True),
    ("one_device", "jax", {"KERAS_DISTRIBUTION_PROCESS_ID": "3"}, False),
])
def test_only_the_chief_holds_the_lock(strategy, backend, environ, chief):
  assert run_lock.chief_process(strategy, backend, environ) is chief


def test_jax_process_index_decides_once_the_processes_joined():
  # A TPU pod sets only the process count; JAX finds each index.
  pod = {"KERAS_DISTRIBUTION_NUM_PROCESSES": "4"}
  assert run_lock.chief_process("one_device", "jax", pod, process_index=0)
  assert not run_lock.chief_process("one_device", "jax", pod,
                                    process_index=2)


def test_non_chief_processes_hold_nothing(tmp_path):
  # Held by the chief on another host: a worker that tried to take it
  # would stop.
  lock_file = tmp_path / run_lock.LOCK_FILE
  text = json.dumps({"host": "chief-host", "pid": 1, "started": "now"})
  lock_file.write_text(text)
  with run_lock.hold(str(tmp_path), chief=False) as lock:
    assert lock is None
  assert lock_file.read_text() == text


# ------------------------------------------------------------ train.py CLI
def _train_cmd(model_dir, records, *bindings, mode="train"):
  return [sys.executable, str(REPO_ROOT / "train.py"),
          "--gin_file=tiny_cpu.gin",
          f"--gin_bindings=TRAIN_FILE_PATTERN='{records}'",
          *[f"--gin_bindings={b}" for b in bindings],
          f"--model_dir={model_dir}", f"--mode={mode}"]


def _env(**extra):
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
              CUDA_VISIBLE_DEVICES="", **extra)


@pytest.mark.slow
def test_two_train_py_half_a_second_apart(tiny_train_records, tmp_path):
  model_dir = tmp_path / "run"
  cmd = _train_cmd(model_dir, tiny_train_records, "TOTAL_STEPS=4",
                   "STEPS_PER_LOOP=2", "CHECKPOINT_EVERY=2")
  logs = [tmp_path / "a.log", tmp_path / "b.log"]
  procs = []
  try:
    for log in logs:
      with open(log, "w") as f:
        procs.append(subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(),
                                      stdout=f, stderr=subprocess.PIPE,
                                      text=True))
      time.sleep(0.5)
    errors = [p.communicate(timeout=900)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  codes = [p.returncode for p in procs]
  assert sorted(codes) == [0, 1], (codes, errors, [l.read_text()[-2000:]
                                                   for l in logs])
  winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
  # The loser's whole stderr is one line naming the winner.
  message = errors[loser].strip()
  assert "\n" not in message, message
  assert re.fullmatch(
      re.escape(f"train.py: error: --model_dir {model_dir} is in use by "
                f"another training run (host {HOST}, pid {procs[winner].pid}"
                ", started ") + r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC" +
      re.escape(f"; lock file {model_dir / run_lock.LOCK_FILE}): wait for "
                "it to end or stop it (--mode=eval may read the directory "
                "meanwhile)"), message), message
  assert "step" not in logs[loser].read_text()  # It trained nothing.
  # One run's checkpoints and logs; the lock is gone with its holder.
  out = logs[winner].read_text()
  assert re.findall(r"^step (\d+)/4 ", out, re.M) == ["2", "4"]
  names = sorted(os.listdir(model_dir))
  assert run_lock.LOCK_FILE not in names
  assert {"checkpoint", "ckpt-2.index", "ckpt-4.index", "config.gin"} <= (
      set(names))
  assert len(list((model_dir / "train").glob("events.out.tfevents.*"))) == 1


def _drop_root_write(cmd):
  """Runs `cmd` without the root's override of file permissions."""
  if os.geteuid() != 0:
    return cmd
  setpriv = shutil.which("setpriv")
  if setpriv is None:
    pytest.skip("running as root without setpriv: permissions not enforced")
  caps = "-dac_override,-dac_read_search"
  return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--",
          *cmd]


def test_unwritable_model_dir_is_named_before_training(tiny_train_records,
                                                       tmp_path):
  model_dir = tmp_path / "readonly"
  model_dir.mkdir()
  model_dir.chmod(0o555)
  try:
    result = subprocess.run(
        # One step: a run that missed the check fails at its first save.
        _drop_root_write(_train_cmd(model_dir, tiny_train_records,
                                    "TOTAL_STEPS=1")),
        cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
        timeout=600, check=False)
  finally:
    model_dir.chmod(0o755)
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
  assert result.stderr.strip() == (
      f"train.py: error: --model_dir {model_dir} cannot be written "
      "(Permission denied); training would fail at its first checkpoint "
      "save: give a directory this user can write to")
  assert "Training" not in result.stdout and os.listdir(model_dir) == []


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_dir_that_is_a_file_is_one_line(tiny_train_records, tmp_path,
                                              mode):
  afile = tmp_path / "run.txt"
  afile.write_text("keep")
  result = subprocess.run(
      _train_cmd(afile, tiny_train_records, mode=mode), cwd=REPO_ROOT,
      env=_env(), capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.strip() == (
      f"train.py: error: --model_dir {afile} is a file, not a directory")
  assert afile.read_text() == "keep"


def test_jax_engine_respects_the_lock(tiny_train_records, tmp_path):
  """The JAX engine: refused by a live holder; eval is not; a dead holder
  is taken over (the run then stops at its misspelt data pattern)."""
  pytest.importorskip("jax")
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  env = _env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
  # A data pattern matching nothing: the lock is checked before the data,
  # so a run that ignored it would stop at once on the pattern instead.
  missing = tmp_path / "nothing-*"
  holder = Holder(model_dir)
  try:
    train = subprocess.run(
        _train_cmd(model_dir, missing), cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=600, check=False)
    evaluate = subprocess.run(
        _train_cmd(model_dir, tiny_train_records, mode="eval"),
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
        check=False)
  finally:
    holder.kill()
  assert train.returncode == 1, train.stdout[-2000:] + train.stderr[-3000:]
  assert train.stderr.strip() == "train.py: error: " + _in_use(
      model_dir, holder.describe())
  # --mode=eval is not blocked: it goes on to look for a checkpoint.
  assert evaluate.returncode == 1
  assert evaluate.stderr.strip().startswith(
      f"train.py: error: --mode=eval: no checkpoint in {model_dir}"), (
          evaluate.stderr[-3000:])
  again = subprocess.run(
      _train_cmd(model_dir, missing), cwd=REPO_ROOT, env=env,
      capture_output=True, text=True, timeout=600, check=False)
  assert again.returncode == 1
  lock_file = model_dir / run_lock.LOCK_FILE
  assert (f"Took over {lock_file} from a training run that is no longer "
          f"running ({holder.describe()})") in again.stdout, again.stdout
  assert "train_file_pattern" in again.stderr
  assert os.listdir(model_dir) == []  # The lock went with the run.
