#!/usr/bin/env python
"""The planning table of docs/TPU_PLANNING.md: the five paper models on four TPU slices.

  python benchmarks/plan_table.py --out benchmarks/plan_table        # compiles, then prints the table
  python benchmarks/plan_table.py --out benchmarks/plan_table --table-only

Each cell is ``python -m mambaout_jax.plan`` (the authors' recipe: global batch 4096, 224px, bf16
compute, data parallel; train step only) run in its own process, two at a time, its JSON kept in
--out; a cell whose JSON exists is not compiled again, so an interrupted run continues (use a new --out
when changing the planner's flags); a cell whose planner fails keeps its stderr in
``<model>_<slice>.err``, the others go on, and the run exits 1 naming it. On the
project's 2-core machine a 224px train-step compile takes ~2-28 minutes (longer for deeper models;
a step that does not fit is refused within seconds).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("femto", "kobe", "tiny", "small", "base")
SLICES = ("v4-32", "v5e-256", "v5p-128", "v6e-256")
RUN_EPOCHS = 310  # the recipe: 300 epochs + 10 cooldown


def plan_cell(model: str, slice_name: str, out: Path, extra: list[str]) -> tuple[str, str, float, str]:
    """Plans one cell; returns (model, slice, seconds, error). A failed cell keeps its whole stderr
    in ``<model>_<slice>.err`` and does not stop the other cells."""
    path = out / f"{model}_{slice_name}.json"
    if path.exists():
        return model, slice_name, 0.0, ""
    t0 = time.time()
    cmd = [sys.executable, "-m", "mambaout_jax.plan", "--config", f"configs/mambaout_{model}.py",
           "--topology", slice_name, "--noeval", "--json", str(path), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    err = out / f"{model}_{slice_name}.err"
    if proc.returncode not in (0, 1) or not path.exists():  # 1 = does not fit, still a plan
        err.write_text(proc.stderr)
        return model, slice_name, time.time() - t0, f"rc={proc.returncode}, stderr in {err}"
    (out / f"{model}_{slice_name}.txt").write_text(proc.stdout)
    err.unlink(missing_ok=True)  # an earlier attempt's
    return model, slice_name, time.time() - t0, ""


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def table(out: Path, models=MODELS, slices=SLICES) -> str:
    rows = [
        "| model | slice (chips) | per chip | fits | peak HBM per chip | step | img/s (slice) | epoch "
        f"| {RUN_EPOCHS} epochs | MFU | bound by | compile |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for model in models:
        for slice_name in slices:
            path = out / f"{model}_{slice_name}.json"
            if not path.exists():
                rows.append(f"| {model} | {slice_name} | | (not planned) | | | | | | | | |")
                continue
            p = json.loads(path.read_text())
            t, c = p["topology"], p["train"]["compiled"]
            head = f"| {model} | {slice_name} ({t['chips']}) | {p['train']['per_chip_batch']} |"
            if not c["fits"]:
                need = c["required_bytes"] / 2**30 if c["required_bytes"] else float("nan")
                rows.append(
                    f"{head} **no** | needs {need:.1f} of {p['hbm_limit'] / 2**30:.2f} GiB | | | | | | "
                    f"| {c['compile_seconds']:.0f} s |"
                )
                continue
            r = p["roofline"]
            mem = c["memory"]["peak"]
            rows.append(
                f"{head} yes | {mem / 2**30:.2f} GiB ({mem / p['hbm_limit']:.0%}) | {r['step_seconds'] * 1e3:.1f} ms"
                f" | {r['images_per_second']:,.0f} | {_duration(r['epoch_seconds'])}"
                f" | {_duration(r['epoch_seconds'] * RUN_EPOCHS)} | {r['mfu']:.0%} | {r['bound_by']}"
                f" | {c['compile_seconds']:.0f} s |"
            )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "plan_table")
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--slices", nargs="+", default=SLICES)
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--table-only", action="store_true")
    args, extra = parser.parse_known_args()  # anything else goes to the planner (--config.x=...)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.table_only:
        cells = [(m, s) for m in args.models for s in args.slices]
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            for model, slice_name, seconds, error in pool.map(lambda c: plan_cell(*c, args.out, extra), cells):
                if seconds:
                    print(f"{model} on {slice_name}: {seconds:.0f} s", error, file=sys.stderr, flush=True)
                if error:
                    failed.append(f"{model} on {slice_name}")
    print(table(args.out, args.models, args.slices))
    if failed:  # their rows read "(not planned)"
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
