"""What the sharding rule implies about a train step's collectives, checked against the HLO.

Data parallel (every parameter replicated): the one substantial collective is the gradient
all-reduce, and it must carry every parameter's gradient exactly once -- its elements (summed over
non-scalar arrays) equal the parameter count within ``TOLERANCE``; its bytes lie between
params x the compute dtype's size (XLA reduces a gradient in the dtype it was computed in: bf16 for
weights used in bf16) and params x 4 (float32). Scalar all-reduces (the loss; the predicate of the
mixup Beta sampler's rejection loop) are expected and reported; any other collective larger than
``SMALL_BYTES`` per execution is a finding that fails the check.

Sharded (FSDP-style) rules: the textbook step all-gathers each sharded parameter and
reduce-scatters its gradient, but XLA's SPMD partitioner chooses per layer whether to gather the
weight or to keep it in place and move the activations (all-to-all / collective-permute), by
activation size. So what is checked is what holds either way: the sharded parameters' gradients
are not all-reduced in full (that would be data parallelism), and something is exchanged. The split
XLA chose is reported as a note. The memory side of the rule -- per-chip state divided by the chip
count -- is in the plan's memory figures. On multi-dimensional slices the TPU compiler writes the
reduce-scatters and all-gathers as all-reduces (``collectives`` module docstring); those arrays
count as what they stand for (``Collective.roles``), so "all-reduced in full" means reduced and
kept whole.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

from jax.sharding import NamedSharding

from mambaout_jax.plan.collectives import Collective

TOLERANCE = 0.01  # relative, on gradient elements all-reduced / gathered vs the parameter count
SMALL_BYTES = 1024  # per execution: below this a collective is a scalar/metric, not a tensor


@dataclasses.dataclass(frozen=True)
class CollectiveCheck:
    rule: str  # 'data parallel' or 'sharded (fsdp)'
    ok: bool
    expected: str
    found: str
    findings: tuple[str, ...]  # failures (ok=False) and notes


def _elements(cs: Iterable[Collective], kind: str, *, scalars: bool, role: str | None = None) -> int:
    """Elements per step of ``kind``; ``role``: only the all-reduce arrays with that role."""
    return sum(
        a.elements * c.executions
        for c in cs if c.kind == kind
        for a, r in zip(c.arrays, c.roles or ("",) * len(c.arrays))
        if (len(a.shape) == 0) == scalars and (role is None or r == role)
    )  # fmt: skip


def _bytes(cs: Iterable[Collective], kind: str) -> int:
    return sum(a.bytes * c.executions for c in cs if c.kind == kind for a in c.arrays if a.shape)


def check_collectives(
    collectives: Iterable[Collective],
    param_shapes: Mapping[str, tuple[int, ...]],
    param_shardings: Mapping[str, NamedSharding],
    compute_itemsize: int,
    mix_bytes: int = 0,
) -> CollectiveCheck:
    """``compute_itemsize``: the bytes per reduced gradient element the step must use at least (4:
    the train step reduces float32 whatever the compute dtype). ``mix_bytes``: what Mixup/CutMix's
    partner exchange may move per chip (``batch_transforms.flip_groups``: the chip's uint8 images
    and float32 targets); collective-permutes / all-to-alls up to that are the mixing, not a finding."""
    cs = list(collectives)
    sharded = sum(math.prod(s) for k, s in param_shapes.items() if not param_shardings[k].is_fully_replicated)
    total = sum(math.prod(s) for s in param_shapes.values())
    replicated = total - sharded
    ar = _elements(cs, "all-reduce", scalars=False)
    ar_scalars = _elements(cs, "all-reduce", scalars=True)
    ag = _elements(cs, "all-gather", scalars=False)
    rs = _elements(cs, "reduce-scatter", scalars=False)
    loops = sum(c.in_unknown_loop for c in cs)
    found = (
        f"all-reduce {ar:,} elements ({_bytes(cs, 'all-reduce'):,} B) + {ar_scalars} scalars; "
        f"all-gather {ag:,}; reduce-scatter {rs:,}; "
        f"all-to-all {_elements(cs, 'all-to-all', scalars=False):,}; "
        f"collective-permute {_elements(cs, 'collective-permute', scalars=False):,}"
    )
    findings: list[str] = []
    if loops:
        findings.append(
            f"note: {loops} collective(s) sit in loops of unknown trip count, each run once per iteration "
            "(e.g. jax.random.beta's rejection sampler for mixup, vmapped over per-device groups)"
        )

    if sharded == 0:
        expected = (
            f"one all-reduce of every gradient: {total:,} elements, "
            f"{total * compute_itemsize:,}-{total * 4:,} B; nothing else beyond scalars"
            + (f" and the Mixup/CutMix partner exchange (<= {mix_bytes:,} B)" if mix_bytes else "")
        )
        ok = True
        if abs(ar - total) > TOLERANCE * total:
            ok = False
            findings.append(f"gradient all-reduce carries {ar:,} elements, expected {total:,} (+-{TOLERANCE:.0%})")
        nbytes = _bytes(cs, "all-reduce")
        if not total * compute_itemsize * (1 - TOLERANCE) <= nbytes <= total * 4 * (1 + TOLERANCE):
            ok = False
            findings.append(f"gradient all-reduce is {nbytes:,} B, outside {total * compute_itemsize:,}-{total * 4:,}")
        exchanged = sum(c.bytes * c.executions for c in cs if c.kind in ("collective-permute", "all-to-all"))
        if mix_bytes:
            findings.append(f"note: Mixup/CutMix partners move {exchanged:,} B per chip (at most {mix_bytes:,} expected)")
        for c in cs:
            mixing = c.kind in ("collective-permute", "all-to-all") and exchanged <= mix_bytes * (1 + TOLERANCE)
            if c.kind != "all-reduce" and c.bytes > SMALL_BYTES and not mixing:
                ok = False
                findings.append(f"unexpected {c.kind} {c.name} of {c.bytes:,} B x{c.executions}")
        return CollectiveCheck("data parallel", ok, expected, found, tuple(findings))

    ag_as_ar = _elements(cs, "all-reduce", scalars=False, role="gather")
    rs_as_ar = _elements(cs, "all-reduce", scalars=False, role="scatter")
    reduced = _elements(cs, "all-reduce", scalars=False, role="")  # reduced and kept whole
    if ag_as_ar or rs_as_ar:
        found += (
            f" (of the all-reduce, {rs_as_ar:,} elements are reduce-scatters written as all-reduce + dynamic-slice "
            f"and {ag_as_ar:,} all-gathers written as dynamic-update-slice + all-reduce)"
        )
    ag, rs = ag + ag_as_ar, rs + rs_as_ar
    moved = ag + rs + _elements(cs, "all-to-all", scalars=False) + _elements(cs, "collective-permute", scalars=False)
    expected = (
        f"the {sharded:,} sharded parameter elements are not all-reduced in full (their gradients stay "
        f"sharded); parameters or activations move by all-gather / reduce-scatter / all-to-all / permute; "
        f"the {replicated:,} replicated ones are all-reduced"
    )
    ok = True
    if reduced - replicated >= sharded * (1 - TOLERANCE):
        ok = False
        findings.append(
            f"all-reduces carry {reduced:,} elements kept whole, the replicated parameters' {replicated:,} and as many "
            "again as the sharded ones: replicated gradients"
        )
    if moved == 0:
        ok = False
        findings.append("no all-gather, reduce-scatter, all-to-all or permute: nothing is sharded in the step")
    findings.append(
        f"note: XLA gathers {ag:,} and reduce-scatters {rs:,} elements against {sharded:,} sharded parameter "
        "elements; for the layers it does not gather it keeps the weights in place and moves activations "
        "(all-to-all / collective-permute) instead -- the SPMD partitioner's choice, which depends on the "
        "activation size"
    )
    return CollectiveCheck("sharded (fsdp)", ok, expected, found, tuple(findings))
