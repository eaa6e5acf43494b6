"""Silences the late echoes of a failed Orbax/TensorStore read.

When one array of an Orbax checkpoint cannot be read, Orbax's restore
raises at once and closes its asyncio loop, while TensorStore still has the
other arrays' reads in flight. As each finishes (milliseconds to seconds
later, on TensorStore's threads) it tries to wake the closed loop and
Python prints a `RuntimeError: Event loop is closed` traceback, and asyncio
logs `Task exception was never retrieved` with the whole TensorStore spec:
forty lines after the one line that names the damaged checkpoint. Both
arrive through `sys.stderr` (not through `sys.excepthook` or
`sys.unraisablehook`), and when they arrive depends on thread timing.

`install()` is called before Orbax reads a checkpoint (a failure's echoes
can come before its exception reaches the caller) and stays in place for
the process: it wraps `sys.stderr` in `TracebackFilter`, which drops exactly
the tracebacks whose exception lines are all `Event loop is closed`, and
filters the asyncio logger's never-retrieved TensorStore errors. Any other
output, tracebacks included, passes unchanged.
"""

import logging
import sys
import threading

_HEADER = "Traceback (most recent call last):"
_KNOWN_ENDINGS = ("RuntimeError: Event loop is closed",)


class _Line:
  """What one thread has written since its last forwarded line."""

  def __init__(self):
    self.partial = ""  # The start of a line not yet complete.
    self.passing = False  # That start was forwarded already.
    self.block = []  # The lines of a traceback being collected.


class TracebackFilter:
  """A text stream that drops known tracebacks and forwards the rest.

  Python prints a traceback in many writes (a line can take four), and
  tracebacks printed by two threads at once interleave write by write, so
  each thread's text is assembled on its own. Whole lines are examined; a
  partial line waits for its end only when it may belong to a traceback
  (other output, such as a progress line redrawn with a carriage return, is
  forwarded as it comes). A traceback starts at its header line and ends
  at its exception line (the first line that is not indented); it is
  dropped when that line is a known one, and forwarded whole otherwise.

  Args:
    stream: the stream to forward to (`sys.stderr`).
  """

  def __init__(self, stream):
    self.stream = stream
    self._lock = threading.Lock()
    self._lines = {}  # Thread id -> _Line.

  def write(self, text):
    with self._lock:
      state = self._lines.setdefault(threading.get_ident(), _Line())
      out = []
      for piece in text.splitlines(keepends=True):
        out.extend(_piece(state, piece))
      if out:
        self.stream.write("".join(out))
    return len(text)

  def flush(self):
    # Text held for a traceback still being printed stays held: Python
    # flushes after each traceback, while another thread may be half-way
    # through its own.
    self.stream.flush()

  def __getattr__(self, name):  # fileno, isatty, encoding, ...
    return getattr(self.stream, name)


def _piece(state, piece):
  """The text to forward now, given a thread's next piece of one line."""
  complete = piece.endswith("\n")
  if state.passing:  # The start of this line was forwarded already.
    state.passing = not complete
    return [piece]
  line = state.partial + piece
  state.partial = ""
  if complete:
    return _line(state, line)
  if state.block or _HEADER.startswith(line):
    state.partial = line  # Wait for the end of the line.
    return []
  state.passing = True
  return [line]


def _line(state, line):
  """The lines to forward now, given a thread's next complete line."""
  stripped = line.rstrip("\n")
  if stripped == _HEADER and not state.block:
    state.block = [line]
    return []
  if not state.block:
    return [line]
  state.block.append(line)
  if stripped[:1] in (" ", "\t"):
    return []
  block, state.block = state.block, []
  return [] if stripped in _KNOWN_ENDINGS else block


class _NeverRetrievedReads(logging.Filter):
  """Drops asyncio's report of an abandoned TensorStore read."""

  def filter(self, record):
    error = record.exc_info[1] if record.exc_info else None
    return not ("exception was never retrieved" in str(record.msg) and
                error is not None and "tensorstore_spec" in str(error))


_installed = threading.Lock()


def install():
  """Filters the late tracebacks of failed reads for the rest of the run."""
  with _installed:
    if not isinstance(sys.stderr, TracebackFilter):
      sys.stderr = TracebackFilter(sys.stderr)
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _NeverRetrievedReads) for f in logger.filters):
      logger.addFilter(_NeverRetrievedReads())
