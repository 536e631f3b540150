#!/usr/bin/env python
"""Where a compiled forward pass spends its time, by model part: a ``jax.profiler`` trace of the
inference program (``compile_forward``'s, micro-batches of 8 on CPU), each compiled op's time
summed by the ``jax.named_scope`` it was traced under (stem, downsample, norm, fc1, dwconv, gate,
fc2, residual, head; mambaout_jax/models/mambaout.py).

  python benchmarks/profile_forward.py --model mambaout_femto

Op time is summed over the runtime's threads (two ops can run at once on two cores), so the
shares are of op time, not of wall time; the top ops are listed with the scope each was charged to.
Prints one JSON line, then a table.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

PARTS = ("stem", "downsample", "norm", "fc1", "dwconv", "gate", "fc2", "residual", "head")
_RUNTIME_EVENTS = ("Threadpool", "ThunkExecutor", "Slinky", "end: ", "$", "Pjit", "CommonPjRt", "PythonRef")


def part_of(op_name: str) -> str:
    """The model part an op's ``op_name`` metadata names (the innermost one), or 'other'."""
    parts = [p for p in op_name.split("/") if p in PARTS]
    return parts[-1] if parts else "other"


def op_parts(hlo_text: str) -> dict[str, str]:
    """Instruction name -> model part, from the compiled HLO's metadata."""
    parts = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]+)\"", line)
        if m:
            parts[m.group(1)] = part_of(m.group(2))
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mambaout_femto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    import jax
    import numpy as np
    from flax import nnx

    import mambaout_jax
    from mambaout_jax.kernels import cpu as cpu_kernels
    from mambaout_jax.models.inference import in_micro_batches, resolve_micro_batch

    graphdef, state = nnx.split(mambaout_jax.create_model(args.model))
    micro_batch = resolve_micro_batch("auto")
    forward = jax.jit(lambda s, x: in_micro_batches(lambda y: nnx.merge(graphdef, s)(y), x, micro_batch))
    x = jax.device_put(np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3), np.float32))
    parts = op_parts(forward.lower(state, x).compile().as_text())
    forward(state, x).block_until_ready()
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.calls):
                forward(state, x).block_until_ready()
        wall = (time.perf_counter() - start) / args.calls
        (trace,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        events = json.load(gzip.open(trace))["traceEvents"]
    op_time = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in parts and not e["name"].startswith(_RUNTIME_EVENTS):
            op_time[e["name"]] += e["dur"] / 1e3 / args.calls  # ms per call
    by_part = collections.Counter()
    for name, ms in op_time.items():
        by_part[parts[name]] += ms
    total = sum(by_part.values())
    result = {
        "model": args.model, "batch": args.batch, "micro_batch": micro_batch, "backend": jax.default_backend(),
        "cpu_kernels": cpu_kernels.depthwise_available(), "wall_ms_per_call": wall * 1e3, "op_ms_per_call": total,
        "share": {k: round(v / total, 4) for k, v in by_part.most_common()},
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    print(f"\n{'part':<12}{'ms/call':>10}{'share':>8}")
    for part, ms in by_part.most_common():
        print(f"{part:<12}{ms:>10.1f}{ms / total:>8.1%}")
    print(f"\ntop {args.top} ops (ms/call, part):")
    for name, ms in op_time.most_common(args.top):
        print(f"{ms:8.2f}  {parts[name]:<10} {name}")


if __name__ == "__main__":
    main()
