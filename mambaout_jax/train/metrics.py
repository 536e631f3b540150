"""Where a run reports: ``metrics.jsonl``, TensorBoard event files, and a console line for a person.

Only process 0 writes. Train records carry ``step`` and ``loss``, eval records ``step``, ``top1``,
``top5`` and ``loss``. TensorBoard files are written by tensorboardX (no TensorFlow needed).

The files are written in a ``storage.Mirror`` of the workdir: for a local workdir that is the
workdir itself and ``metrics.jsonl`` is appended to, line by line, as it always was. Objects in a
bucket cannot be appended to, so for a ``gs://`` workdir the files grow in a local spool and
``flush`` uploads each changed file as one whole object; the trainer flushes at every log
interval, every checkpoint, every evaluation and at the end (also after SIGTERM), so after a
SIGKILL at most one log interval is missing from the bucket. A resumed run first fetches the
bucket's ``metrics.jsonl`` and continues it; TensorBoard starts a new event file in the same
folder, which TensorBoard reads together with the earlier ones.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax

from mambaout_jax.storage import Mirror

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self._tb = None
        self._mirror = None
        if self.active:
            self._mirror = Mirror(workdir)
            self._mirror.pull(METRICS)
            self.path = self._mirror.local / METRICS
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    # Event files are named by the second and the host; in a bucket a restart within
                    # the same second would replace the earlier file instead of adding one.
                    suffix = f".{os.getpid()}-{time.time_ns() % 10**9}" if self._mirror.is_remote else ""
                    self._tb = SummaryWriter(str(self._mirror.local / TENSORBOARD), filename_suffix=suffix)
                except ImportError:  # optional: the jsonl file is the record of the run
                    self._tb = None
        self._interactive = sys.stderr.isatty()

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.active:
            return
        record = {"kind": kind, "step": int(step), **{k: _plain(v) for k, v in values.items()}, "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(record[k], (int, float)) and not isinstance(record[k], bool):
                    self._tb.add_scalar(f"{kind}/{k}", record[k], int(step))

    def flush(self) -> None:
        """Make everything written so far durable in the workdir (an upload for a bucket)."""
        if not self.active or self._mirror is None:
            return
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        try:
            self._mirror.push()
        except Exception as e:  # noqa: BLE001 - a metrics upload that fails must not end the run; the next flush retries
            self.message(f"warning: could not upload metrics to {self._mirror.remote}: {type(e).__name__}: {e}")

    def progress(self, text: str) -> None:
        """A status line: redrawn in place on a terminal, a plain line in a log file."""
        if not self.active:
            return
        if self._interactive:
            sys.stderr.write("\r\033[K" + text)
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def message(self, text: str) -> None:
        if self.active:
            if self._interactive:
                sys.stderr.write("\r\033[K")
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.active:
            return
        if self._interactive:
            sys.stderr.write("\n")
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        try:
            self._mirror.close()
        except Exception as e:  # noqa: BLE001 - as in flush: report, do not mask the run's own outcome
            self.message(f"warning: could not upload metrics to {self._mirror.remote}: {type(e).__name__}: {e}")


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return float(v)
    return v


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
