"""SIGTERM and SIGINT stop a training run after the current step, saved.

A cloud preemption sends SIGTERM (Ctrl-C sends SIGINT). While a training
mode runs, `SignalStop` turns the first such signal into a stop request of
the controller: each engine ends its round after the step that is running,
the controller saves that step as a checkpoint, waits for the save, prints
the one line of `StopRequested` (signal, step, checkpoint, how to resume)
and raises it, and `train.py` exits with `exit_status(signal)` = 128 + the
signal number (143 for SIGTERM, 130 for SIGINT), the status a shell gives a
process that a signal ended, distinct from 1 (errors) and 0. The same
command then resumes from that step.

How the request reaches a running step. Python runs signal handlers on the
main thread between bytecodes only, and the TensorFlow engine's main thread
sits in one `tf.function` call for a whole round. So the handler itself
does nothing: `signal.set_wakeup_fd` makes the interpreter's C-level
handler write the signal number to a socket at once, and a watcher thread
reads it and calls `on_signal` (the controller's `request_stop`), which sets
the TensorFlow loop's stop variable (read after every step inside the
graph) or the JAX engine's flag (read between steps). Training stays on the
main thread. Where several processes train together, the controller agrees
on stopping at the end of each round (`Engine.any_process`), so that every
process saves the same step; there a round runs to its end (up to
`steps_per_loop` steps after the signal).

A second signal while stopping (the checkpoint being written) is ignored,
saying so; the save finishes. SIGKILL cannot be caught: then the run
resumes from its last checkpoint, as before.

Handlers are installed only from the main thread (elsewhere `SignalStop`
does nothing) and are put back when the run ends.
"""

import signal
import socket
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum):
  """The exit status of a run stopped by signal `signum` (128 + signum)."""
  return 128 + int(signum)


def signal_name(signum):
  return signal.Signals(signum).name


class StopRequested(Exception):
  """A training run stopped on a signal after saving (its one line).

  Attributes:
    signum: the signal, or None in a process of a multi-process run that
      stopped because another one received it.
    step: the step the run stopped after.
    checkpoint: the checkpoint that holds it (None: nothing trained yet).
    exit_status: what `train.py` exits with (`exit_status`; SIGTERM's for
      a process that received none).
  """

  def __init__(self, signum, step, checkpoint):
    self.signum = signum
    self.step = step
    self.checkpoint = checkpoint
    self.exit_status = exit_status(signum or signal.SIGTERM)
    cause = (f"Stopped by {signal_name(signum)}" if signum else
             "Stopped with the other processes (one received a signal)")
    if checkpoint:
      message = (f"{cause} after step {step}: saved in {checkpoint}; the "
                 "same command resumes from that step")
    else:
      message = (f"{cause} at step {step}, before any step was trained: "
                 "nothing to save; the same command starts the run")
    super().__init__(message)


class SignalStop:
  """Context manager: SIGTERM / SIGINT call `on_signal(signum)` once.

  Args:
    on_signal: called (on a watcher thread) with the first signal's number.
    print_fn: says what a signal does (None: silent).
  """

  def __init__(self, on_signal, print_fn=print):
    self.on_signal = on_signal
    self.print_fn = print_fn or (lambda *a, **k: None)
    self.signum = None
    self.active = False
    self._lock = threading.Lock()
    self._old_handlers = {}
    self._old_fd = -1
    self._sockets = None
    self._thread = None

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    self._sockets = (reader, writer)
    for signum in SIGNALS:
      self._old_handlers[signum] = signal.signal(signum, _no_op)
    self._old_fd = signal.set_wakeup_fd(writer.fileno(),
                                        warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._watch, name="signal-stop",
                                    daemon=True)
    self._thread.start()
    self.active = True
    return self

  def __exit__(self, *exc):
    if not self.active:
      return False
    signal.set_wakeup_fd(self._old_fd)
    for signum, handler in self._old_handlers.items():
      signal.signal(signum, handler)
    reader, writer = self._sockets
    writer.close()  # The watcher reads the end of the stream and returns.
    self._thread.join(timeout=5)
    reader.close()
    self.active = False
    return False

  def _watch(self):
    reader = self._sockets[0]
    while True:
      try:
        data = reader.recv(64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum in SIGNALS:
          self.received(signum)

  def received(self, signum):
    """Handles one signal (the watcher calls this)."""
    with self._lock:
      first = self.signum is None
      if first:
        self.signum = signum
    name = signal_name(signum)
    if first:
      self.print_fn(f"Received {name}: finishing the current step, then "
                    "saving a checkpoint and exiting", flush=True)
      self.on_signal(signum)
    else:
      self.print_fn(f"Received {name} while stopping: ignored (the current "
                    "step finishes and its checkpoint is being written)",
                    flush=True)


def _no_op(signum, frame):
  """The Python-level handler: the watcher thread acts (module docstring)."""
  del signum, frame
