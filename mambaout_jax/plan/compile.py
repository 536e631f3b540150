"""Compile a jitted step for a TPU topology and read what the compiler knows about it.

Nothing here runs a program: ``jitted.lower(abstract args).compile()`` produces the TPU executable
exactly as a TPU VM would (same libtpu), and its memory analysis, cost analysis and optimized HLO
are what the planner reports. A program that does not fit in HBM is a compiler error
(RESOURCE_EXHAUSTED), turned here into a ``StepCompile`` with ``fits=False`` and the compiler's
own numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mambaout_jax.plan.collectives import Collective, parse_collectives

_UNITS = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}
_SIZE = r"([0-9.]+)\s*([KMGTP]i?B?|B)"
# "... required for HLO temporaries (50.24G) exceeds available HBM (15.75G)." and the older
# "Used 20.50G of 15.75G hbm. Exceeded hbm capacity by 4.75G."
_OOM_FORMS = (
    re.compile(r"\(" + _SIZE + r"\)\s*exceeds available HBM\s*\(" + _SIZE + r"\)"),
    re.compile(r"Used\s+" + _SIZE + r"\s+of\s+" + _SIZE + r"\s+hbm", re.IGNORECASE),
)


def parse_size(number: str, unit: str) -> int:
    """XLA's human-readable sizes ("15.75G") are binary: G = GiB."""
    return int(float(number) * _UNITS[unit[0].upper()])


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Per-chip HBM of one executable, from ``compiled.memory_analysis()``.

    ``peak`` is the figure the TPU compiler holds against its HBM limit: a program compiles when its
    peak fits and is refused ("required ... exceeds available HBM") when it does not -- measured by
    compiling programs of known argument and temporary sizes on both sides of the 15.75 GiB v5e
    limit. It is arguments + live temporaries at the worst moment; ``temporaries`` is the size of the
    temporary allocation (reported as 0 for programs with while loops, e.g. gradient accumulation),
    so the sum of the parts is not the peak.
    """

    peak: int  # what must fit: the compiler's limit applies to this
    arguments: int  # inputs: train state shard + batch shard
    outputs: int
    aliased: int  # outputs written in place of donated arguments (the train state)
    temporaries: int  # activations, gradients, workspace
    generated_code: int  # the program itself

    @classmethod
    def from_compiled(cls, compiled) -> MemoryUse:
        m = compiled.memory_analysis()
        return cls(
            peak=int(m.peak_memory_in_bytes),
            arguments=int(m.argument_size_in_bytes),
            outputs=int(m.output_size_in_bytes),
            aliased=int(m.alias_size_in_bytes),
            temporaries=int(m.temp_size_in_bytes),
            generated_code=int(m.generated_code_size_in_bytes),
        )


@dataclasses.dataclass(frozen=True)
class StepCompile:
    """One step compiled (or refused) for a topology; all figures per chip."""

    fits: bool
    compile_seconds: float
    memory: MemoryUse | None = None  # when it fits
    required_bytes: int | None = None  # when it does not: the compiler's figures (peak, as above)
    available_bytes: int | None = None
    compiler_message: str = ""
    flops: float | None = None  # XLA's count; loop bodies counted once (see ``loop_trip_counts``)
    bytes_accessed: float | None = None  # HBM traffic XLA's cost model expects
    collectives: tuple[Collective, ...] = ()
    loop_trip_counts: tuple[int, ...] = ()  # known trip counts of the entry's while loops


def compile_step(jitted, *abstract_args) -> StepCompile:
    """Lower and compile ``jitted`` for the devices its shardings name (compile-only)."""
    t0 = time.perf_counter()
    try:
        compiled = jitted.lower(*abstract_args).compile()
    except jax.errors.JaxRuntimeError as e:
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        required, available = _oom_sizes(message)
        return StepCompile(
            fits=False,
            compile_seconds=time.perf_counter() - t0,
            required_bytes=required,
            available_bytes=available,
            compiler_message=message.strip(),
        )
    seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    return StepCompile(
        fits=True,
        compile_seconds=seconds,
        memory=MemoryUse.from_compiled(compiled),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        collectives=tuple(parse_collectives(hlo)),
        loop_trip_counts=tuple(int(n) for n in re.findall(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', hlo)),
    )


def _oom_sizes(message: str) -> tuple[int | None, int | None]:
    for form in _OOM_FORMS:
        m = form.search(message)
        if m:
            return parse_size(m.group(1), m.group(2)), parse_size(m.group(3), m.group(4))
    return None, None


@functools.cache
def _probe(device_kind: str, devices: tuple) -> int:
    mesh = Mesh(np.asarray(devices[:1]), ("d",))
    too_big = jax.jit(lambda: jnp.zeros((2**38,), jnp.float32), out_shardings=NamedSharding(mesh, P()))
    result = compile_step(too_big)
    if result.fits or result.available_bytes is None:
        raise RuntimeError(f"no HBM limit of {device_kind} in the compiler's refusal: {result.compiler_message}")
    return result.available_bytes


def probe_hbm_limit(devices: Sequence[Any]) -> int:
    """The HBM per chip the TPU compiler lets a program use (a little under the chip's HBM).

    Read from the compiler itself by compiling a 1 TiB allocation and parsing its refusal
    ("... exceeds available HBM (15.75G)"): a fraction of a second, and it is the very limit the
    training step is checked against.
    """
    return _probe(devices[0].device_kind, tuple(devices))
