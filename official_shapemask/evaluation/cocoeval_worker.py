"""A COCOeval worker process for `fast_cocoeval.WorkerPool`.

  python -m official_shapemask.evaluation.cocoeval_worker

Reads tasks from stdin and answers each on stdout, until stdin closes. A
message is an 8-byte big-endian length followed by that many bytes of
pickle. A task is the dict `fast_cocoeval.evaluate_group` takes; the answer
is `("ok", result)` or `("error", traceback text)`
(`fast_cocoeval.write_message` / `read_message`).

The pool starts this module as a plain subprocess rather than through
`multiprocessing`: a spawned multiprocessing child imports the caller's
`__main__` again, which re-runs a user's script that has no
`if __name__ == "__main__":` guard. Anything printed here goes to stderr;
stdout carries the answers only.
"""

import os
import sys
import traceback

from official_shapemask.evaluation import fast_cocoeval


def main():
  answers = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)  # Stray prints (Python or C) go to stderr, not the answers.
  sys.stdout = sys.stderr
  tasks = os.fdopen(os.dup(0), "rb")
  while True:
    task = fast_cocoeval.read_message(tasks)
    if task is None:
      return 0
    try:
      answer = ("ok", fast_cocoeval.evaluate_group(task))
    except Exception:  # pylint: disable=broad-except
      answer = ("error", traceback.format_exc())
    fast_cocoeval.write_message(answers, answer)


if __name__ == "__main__":
  sys.exit(main())
