"""The stderr filter for the late echoes of a failed checkpoint read."""

import io
import logging
import threading

from official_shapemask.weights import late_read_errors

HEADER = "Traceback (most recent call last):\n"
CLOSED = [HEADER, '  File "base_events.py", line 806, in call_soon\n',
          "    ", "self._check_closed()", "\n",
          "RuntimeError", ": ", "Event loop is closed", "\n"]
OTHER = [HEADER, '  File "train.py", line 3, in <module>\n',
         "    ", "main()", "\n", "ValueError", ": ", "bad setting", "\n"]


def _run_threads(scripts):
  """Writes each script's pieces from its own thread, in lockstep.

  `scripts` is a list of piece lists; piece i of every thread is written
  before piece i + 1 of any, so the threads' writes interleave.
  """
  out = io.StringIO()
  stream = late_read_errors.TracebackFilter(out)
  rounds = max(len(s) for s in scripts)
  barrier = threading.Barrier(len(scripts))
  order = [threading.Lock() for _ in scripts]

  def work(index, pieces):
    for i in range(rounds):
      barrier.wait()
      with order[index]:
        if i < len(pieces):
          stream.write(pieces[i])
          stream.flush()  # Python flushes; nothing held may leak.
      barrier.wait()

  threads = [threading.Thread(target=work, args=(i, s))
             for i, s in enumerate(scripts)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return out.getvalue()


def test_known_tracebacks_are_dropped_even_when_interleaved():
  assert _run_threads([CLOSED, CLOSED, CLOSED]) == ""


def test_other_tracebacks_pass_whole_beside_dropped_ones():
  assert _run_threads([CLOSED, OTHER, CLOSED]) == "".join(OTHER)


def test_ordinary_output_passes_unchanged_and_at_once():
  out = io.StringIO()
  stream = late_read_errors.TracebackFilter(out)
  stream.write("step 10/100")  # A progress line without its end yet.
  assert out.getvalue() == "step 10/100"
  stream.write("\rstep 20/100\nloss 1.5\n")
  stream.write("Trace")  # Could be a traceback: waits for its line.
  assert out.getvalue() == "step 10/100\rstep 20/100\nloss 1.5\n"
  stream.write("s of a run\n")
  assert out.getvalue().endswith("loss 1.5\nTraces of a run\n")
  for piece in CLOSED + ["done\n"]:
    stream.write(piece)
  assert out.getvalue().endswith("Traces of a run\ndone\n")


def test_asyncio_reports_of_abandoned_reads_are_dropped():
  records = []

  class Keep(logging.Handler):

    def emit(self, record):
      records.append(record.getMessage())

  logger = logging.getLogger("asyncio")
  handler = Keep()
  logger.addHandler(handler)
  try:
    late_read_errors.install()
    assert isinstance(__import__("sys").stderr,
                      late_read_errors.TracebackFilter)
    spec_error = ValueError("OUT_OF_RANGE: ... [tensorstore_spec='{}']")
    for message, error in (
        ("Task exception was never retrieved", spec_error),
        ("Future exception was never retrieved", spec_error),
        ("Task exception was never retrieved", ValueError("yours")),
        ("Unclosed client session", None)):
      logger.error(message, exc_info=(type(error), error, None)
                   if error else None)
  finally:
    logger.removeHandler(handler)
  assert records == ["Task exception was never retrieved",
                     "Unclosed client session"]
