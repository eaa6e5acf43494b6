"""What reading or writing weights raises; every message names the path.

`CheckpointError` and its subclasses `CheckpointMismatchError` and
`CheckpointUnreadableError` are the errors a caller turns into its one-line
message (train.py, the export tools); a missing path is `FileNotFoundError`,
a path that cannot be opened in time `CheckpointTimeoutError` (an
`OSError`).
"""


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not fit the model; names it."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint's variables differ from the model's (names the path)."""


class CheckpointUnreadableError(CheckpointError):
  """A checkpoint's files cannot be read (truncated, overwritten, missing,
  or storage that refuses); names the path and why."""


class CheckpointTimeoutError(OSError):
  """Opening a checkpoint took longer than allowed (no network?)."""


def first_line(error):
  """`Type: first line of the message` of an exception."""
  text = getattr(error, "message", None) or str(error) or type(error).__name__
  lines = [line for line in text.strip().splitlines() if line.strip()]
  return f"{type(error).__name__}: {lines[0] if lines else ''}".strip()
