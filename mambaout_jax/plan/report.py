"""A ``Plan`` as a readable table and as JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from mambaout_jax.plan.chips import GiB
from mambaout_jax.plan.collectives import KINDS
from mambaout_jax.plan.planner import IMAGENET_TRAIN_IMAGES, Plan, StepPlan


def _gib(n: float | None) -> str:
    """Bytes in binary units, as XLA prints them."""
    if n is None:
        return "?"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


def _si(x: float, unit: str = "") -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Everything in the plan, JSON-ready: devices become counts, collectives stay one per instruction."""
    t = plan.topology
    out = dataclasses.asdict(dataclasses.replace(plan, topology=None))
    out["topology"] = {
        "name": t.name,
        "accelerator_type": t.accelerator_type,
        "chips": t.num_chips,
        "processes": t.num_processes,
        "chip": dataclasses.asdict(t.chip),
    }
    for step in ("train", "eval"):
        source = getattr(plan, step)
        if source is None:
            continue
        compiled = out[step]["compiled"]
        for c, obj in zip(compiled["collectives"], source.compiled.collectives):
            c.update(bytes=obj.bytes, elements=obj.elements)
    out["imagenet_train_images"] = IMAGENET_TRAIN_IMAGES
    return out


def _memory_lines(step: StepPlan, hbm_limit: int) -> list[str]:
    c = step.compiled
    if not c.fits:
        needed = f"needs {_gib(c.required_bytes)}" if c.required_bytes else "the compiler ran out of HBM"
        return [
            f"  DOES NOT FIT: {needed}; {_gib(c.available_bytes or hbm_limit)} available per chip",
            f"  compiler: {c.compiler_message.splitlines()[0][:300]}",
        ]
    m = c.memory
    return [
        f"  peak            {_gib(m.peak):>12}   {m.peak / hbm_limit:.0%} of {_gib(hbm_limit)} -> fits"
        "   (the compiler's figure, held against its limit)",
        f"    arguments     {_gib(m.arguments):>12}   train state and batch shards",
        f"    temporaries   {_gib(m.temporaries):>12}   temporary allocation (0 when the step has loops)",
        f"    outputs       {_gib(m.outputs - m.aliased):>12}   (+{_gib(m.aliased)} in place of donated arguments)",
        f"  generated code  {_gib(m.generated_code):>12}",
    ]


def format_plan(plan: Plan) -> str:
    t, chip = plan.topology, plan.topology.chip
    train = plan.train
    per_chip_step = plan.global_batch // t.num_chips
    lines = [
        f"{plan.model} ({plan.params:,} params) on {t.name} = {t.accelerator_type}: {t.num_chips} chips "
        f"({chip.device_kind}), {t.num_processes} host process(es)",
        f"batch   global {plan.global_batch:,} = {train.per_chip_batch} per chip x {t.num_chips} chips x "
        f"{plan.grad_accum_steps} accumulation step(s); {plan.global_batch // t.num_processes:,} per host; "
        f"{train.image_size}px",
        f"dtypes  compute {plan.compute_dtype}, parameters and optimizer state float32; sharding {plan.sharding}",
        "",
        f"memory per chip, train step   (usable HBM per the compiler {_gib(plan.hbm_limit)}; published "
        f"{_gib(chip.hbm_bytes)})",
        *_memory_lines(train, plan.hbm_limit),
        f"  train state as sharded: {_gib(plan.state_bytes_per_chip)} per chip (before TPU layout padding)",
    ]
    if plan.eval is not None:
        e = plan.eval
        verdict = f"peak {_gib(e.compiled.memory.peak)} -> fits" if e.compiled.fits else "DOES NOT FIT"
        lines.append(f"eval step ({e.global_batch:,} global, {e.image_size}px): {verdict}")
        if not e.compiled.fits:
            lines += _memory_lines(e, plan.hbm_limit)
    if train.compiled.fits:
        ratio = plan.xla_train_flops_per_chip / plan.analytic_train_flops_per_chip
        lines += [
            "",
            f"FLOPs per step per chip   XLA {plan.xla_train_flops_per_chip:.3e}"
            f"   analytic {plan.analytic_train_flops_per_chip:.3e}"
            f" (3 x 2 x conv+linear MACs x {per_chip_step} images)   XLA/analytic {ratio:.2f}",
        ]
        if plan.grad_accum_steps > 1:
            lines.append(
                f"  (XLA's count of one accumulation step x {plan.grad_accum_steps}:"
                " its cost analysis counts a loop body once)"
            )
        lines += [
            "",
            "collectives per step (per chip)",
            "  kind                 executions     elements         bytes   sent per chip (ring)",
        ]
        for kind in KINDS:
            s = plan.collective_summary.get(kind)
            if s:
                wire = _si(s.wire_bytes, "B")
                lines.append(f"  {kind:<20} {s.count:>10} {s.elements:>12,} {s.bytes:>13,}   {wire:>10}")
        if not plan.collective_summary:
            lines.append("  none")
        check = plan.collective_check
        lines += [
            f"  check ({check.rule}): {'OK' if check.ok else 'FAILED'}",
            f"    expected: {check.expected}",
            f"    found:    {check.found}",
            *(f"    {f}" for f in check.findings),
        ]
        r = plan.roofline
        lines += [
            "",
            "roofline (peak chip figures, XLA's counts, perfect overlap: optimistic, real steps are slower)",
            f"  compute {_duration(r.compute_seconds)}   HBM {_duration(r.hbm_seconds)}"
            f"   ICI {_duration(r.ici_seconds)}"
            f"   -> step {_duration(r.step_seconds)} ({r.bound_by}-bound)",
            f"  images/s {r.images_per_second_per_chip:,.0f} per chip, {r.images_per_second:,.0f} per slice;"
            f"   MFU {r.mfu:.1%};   ImageNet epoch ({IMAGENET_TRAIN_IMAGES:,} images) {_duration(r.epoch_seconds)}",
            f"  chip: {_si(chip.bf16_flops, 'FLOP/s')} bf16, {_si(chip.hbm_bandwidth, 'B/s')} HBM, "
            f"{_si(chip.ici_bandwidth, 'B/s')} ICI (bidirectional)   [{chip.source}]",
        ]
    if plan.batch_search is not None:
        s = plan.batch_search
        tried = ", ".join(f"{b} {'fits' if ok else 'no'} ({_gib(used)})" for b, ok, used in s.tried)
        if s.largest_fitting is None:
            best = "none (not even 1 per chip)"
        else:
            best = f"{s.largest_fitting} per chip (global {s.largest_fitting * t.num_chips * plan.grad_accum_steps:,})"
            if s.smallest_not_fitting is None:
                best += ", the search's upper limit (--max-batch): larger may fit"
        lines += ["", f"largest per-chip batch that fits: {best}", f"  compiled: {tried}"]
    times = [f"train {train.compiled.compile_seconds:.0f} s"]
    if plan.eval is not None:
        times.append(f"eval {plan.eval.compiled.compile_seconds:.0f} s")
    lines += ["", "compile time on this machine: " + ", ".join(times)]
    return "\n".join(lines)
