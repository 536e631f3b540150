"""Where a run reports: ``metrics.jsonl``, TensorBoard event files, and a console line for a person.

Only process 0 writes. ``metrics.jsonl`` is appended to, so a resumed run continues the same file;
train records carry ``step`` and ``loss``, eval records ``step``, ``top1``, ``top5`` and ``loss``.
TensorBoard files are written by tensorboardX (no TensorFlow needed).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, *, total_steps: int, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.total_steps = total_steps
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.active:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            if tensorboard:
                try:
                    from tensorboardX import SummaryWriter

                    self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
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
        if self.active:
            if self._interactive:
                sys.stderr.write("\n")
            self._file.close()
            if self._tb is not None:
                self._tb.close()


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
