"""Run train.py, sending this process a real SIGTERM while evaluation draws its Nth batch.

    python tests/sigterm_at_eval_batch.py N train.py ARGS...

A test's SIGTERM sent from outside, after evaluation's first log line, races the evaluation:
on a loaded machine a short evaluation can finish before the signal lands. Raised from inside
the evaluation's iterator, the signal is certain to arrive between two eval batches, and the
rest is the real thing: the trainer's own handler, its checks and its save. The time it was sent
is written to stderr as ``sigterm sent at <unix time>``.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import time

from mambaout_jax import data as data_lib


class _SignallingIterator:
    def __init__(self, it, at_batch: int):
        self._it, self._at, self._drawn = it, at_batch, 0

    def __next__(self):
        batch = next(self._it)
        self._drawn += 1
        if self._drawn == self._at:
            print(f"sigterm sent at {time.time():.3f}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    def __getattr__(self, name):
        return getattr(self._it, name)


def main() -> None:
    at_batch, script, *args = sys.argv[1:]
    real = data_lib.make_eval_iterator

    def make_eval_iterator(*a, **kw):
        return _SignallingIterator(real(*a, **kw), int(at_batch))

    data_lib.make_eval_iterator = make_eval_iterator  # evaluation.py looks it up on the module per call
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
