"""Every cross-device collective of a compiled XLA program, read from its optimized HLO text.

Why parse text: the compiled executable exposes its HLO only as text (``compiled.as_text()``), and
that text is the program the TPU runs after SPMD partitioning, combining and scheduling, so what is
counted here is what would cross the interconnect. Each collective is counted as often as it
executes: an instruction inside a ``while`` loop counts as many times as the loop runs -- XLA's
``known_trip_count`` when it is annotated, else ``N`` when the loop condition is ``i < N`` on a
loop-carried counter (JAX's scan and fori_loop count from 0; gradient accumulation is such a scan,
and the TPU compiler does not annotate it). One inside a loop whose trip count is data-dependent (a
rejection sampler) is flagged and counted once per loop iteration.

Forms handled: ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``collective-permute``,
``all-to-all``, ``collective-broadcast``, ``ragged-all-to-all``, their ``-start``/``-done`` async
pairs (the ``-start`` is counted, ``-done`` is not), generic ``async-start`` wrappers (the
collective inside the wrapped computation is counted), and tuple-shaped (combined) collectives.

Decomposed collectives: on multi-dimensional TPU slices (v5e from 4x4 up, in libtpu 0.0.42) the
compiler writes a reduce-scatter over the data axis as an all-reduce whose result each chip only
dynamic-slices (its shard), and an all-gather as an all-reduce of the chip's shard written by a
dynamic-update-slice into zeros; even tile-aligned shards of a plain ``psum_scatter`` get this
form. Such an all-reduce stays an all-reduce here (it moves what an all-reduce moves), and
``Collective.roles`` says per array which of the two it stands for.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Iterable

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all", "collective-broadcast")
# Opcodes as they appear in HLO text -> the collective kind they belong to.
_OPCODES = {
    **{k: k for k in KINDS},
    "ragged-all-to-all": "all-to-all",
    "all-reduce-start": "all-reduce",
    "all-gather-start": "all-gather",
    "collective-permute-start": "collective-permute",
}

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e3m4": 1,
}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_COMPUTATION_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLEE = re.compile(r"\b(calls|body|condition|true_computation|false_computation)=%?([^\s,}]+)")
_TO_APPLY = re.compile(r"\bto_apply=%?([^\s,}]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return int(self.elements * _DTYPE_BYTES[self.dtype])


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction and how often one step executes it.

    ``arrays`` is the data the collective is about at full size: the reduced arrays of an
    all-reduce, the gathered result of an all-gather, the scattered *input* of a reduce-scatter
    (its result times the group size), the moved arrays of a permute or all-to-all.
    """

    kind: str
    name: str
    computation: str
    arrays: tuple[Array, ...]
    group_size: int | None  # devices per replica group; None when the text does not say
    executions: int  # per step (loop trip counts multiplied in)
    in_unknown_loop: bool  # inside a loop with a data-dependent trip count (counted once per iteration)
    # Per array of an all-reduce: "scatter" when every use of the result is a dynamic-slice (a
    # reduce-scatter written as all-reduce + slice), "gather" when the operand is a
    # dynamic-update-slice into zeros (an all-gather written as one), else "" (a reduction).
    roles: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        """Bytes per execution, per device (full logical size, see the class docstring)."""
        return sum(a.bytes for a in self.arrays)

    @property
    def elements(self) -> int:
        return sum(a.elements for a in self.arrays)

    def wire_bytes(self, num_devices: int) -> float:
        """Bytes each device sends per execution with bandwidth-optimal ring algorithms.

        all-reduce = reduce-scatter + all-gather: 2(n-1)/n of the data; all-gather, reduce-scatter
        and all-to-all: (n-1)/n; a permute sends its whole buffer once.
        """
        n = self.group_size or num_devices
        if n <= 1:
            return 0.0
        share = (n - 1) / n
        factor = {"all-reduce": 2 * share, "collective-permute": 1.0, "collective-broadcast": 1.0}.get(self.kind, share)
        return factor * self.bytes


def parse_arrays(shape_text: str) -> list[Array]:
    """All array shapes in an HLO shape string (tuples flattened, layouts ignored)."""
    return [Array(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(shape_text)]


def _group_size(attrs: str) -> int | None:
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)  # explicit: {{0,1,2,3},{4,5,6,7}}
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)  # iota: [groups,size]<=[...]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)  # mesh['x'=4,'y'=2] {'x'}
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))}
        axes = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(sizes[a] for a in axes) if axes and all(a in sizes for a in axes) else None
    return None


def _payload(kind: str, opcode: str, arrays: list[Array], group: int | None, attrs: str) -> tuple[Array, ...]:
    """The full-size data of a collective from its result shape (see ``Collective``)."""
    if opcode == "all-gather-start":  # (operands..., results...): the gathered halves
        arrays = arrays[len(arrays) // 2 :]
    elif opcode == "collective-permute-start":  # (operand, result, u32 contexts...)
        arrays = arrays[1:2]
    if kind == "reduce-scatter" and group:  # the result is one shard of the scattered dimension
        m = re.search(r"dimensions=\{(\d+)\}", attrs)
        dim = int(m.group(1)) if m else 0
        arrays = [
            Array(a.dtype, a.shape[:dim] + (a.shape[dim] * group,) + a.shape[dim + 1 :]) if len(a.shape) > dim else a
            for a in arrays
        ]
    return tuple(arrays)


@dataclasses.dataclass(frozen=True)
class _Instruction:
    opcode: str
    operands: tuple[str, ...]
    calls: str | None  # a fusion's fused computation
    index: int | None  # a get-tuple-element's


@dataclasses.dataclass
class _Computation:
    name: str
    entry: bool
    # (callee, trip count, while condition): trip count None = unknown so far
    calls: list[tuple[str, int | None, str | None]] = dataclasses.field(default_factory=list)
    collectives: list[tuple[str, str, tuple[Array, ...], int | None]] = dataclasses.field(default_factory=list)
    int_constants: dict[str, int] = dataclasses.field(default_factory=dict)
    tuple_elements: set[str] = dataclasses.field(default_factory=set)  # get-tuple-element results
    instructions: dict[str, _Instruction] = dataclasses.field(default_factory=dict)
    users: dict[str, list[str]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    parameters: dict[int, str] = dataclasses.field(default_factory=dict)  # index -> name
    root: str | None = None
    zeros: set[str] = dataclasses.field(default_factory=set)  # constants whose value is 0
    # N when this computation is a loop condition `i < N` on a loop-carried counter: JAX's scan and
    # fori_loop count i from 0, so such a loop runs N times.
    counted_limit: int | None = None


def _parse_computations(hlo_text: str) -> dict[str, _Computation]:
    comps: dict[str, _Computation] = {}
    current: _Computation | None = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION_HEADER.match(line)
        if header:
            current = comps.setdefault(header.group(2), _Computation(header.group(2), bool(header.group(1))))
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        inst = _INSTRUCTION.match(line)
        if not inst:
            continue
        name, shape_text, opcode, rest = inst.groups()
        operands = tuple(re.findall(r"%([^\s,)]+)", rest.split(")", 1)[0]))
        callee = re.search(r"\bcalls=%?([^\s,}]+)", rest) if opcode == "fusion" else None
        index = re.search(r"\bindex=(\d+)", rest) if opcode == "get-tuple-element" else None
        current.instructions[name] = _Instruction(
            opcode, operands, callee.group(1) if callee else None, int(index.group(1)) if index else None
        )
        for o in operands:
            current.users[o].append(name)
        if line.lstrip().startswith("ROOT"):
            current.root = name
        if opcode == "parameter" and re.match(r"\d+\)", rest):
            current.parameters[int(rest.split(")", 1)[0])] = name
        if opcode == "constant":
            if re.match(r"\s*-?0(\.0*)?\)|\s*false\)", rest):
                current.zeros.add(name)
            m = re.match(r"(-?\d+)\)", rest)
            if m and re.match(r"\s*[su]\d+\[\]", shape_text):
                current.int_constants[name] = int(m.group(1))
        elif opcode == "get-tuple-element":
            current.tuple_elements.add(name)
        elif opcode == "compare" and line.lstrip().startswith("ROOT") and "direction=LT" in rest:
            operands = re.findall(r"%([^\s,)]+)", rest.split(")", 1)[0])
            if len(operands) == 2 and operands[0] in current.tuple_elements and operands[1] in current.int_constants:
                current.counted_limit = current.int_constants[operands[1]]
        if opcode.endswith("-done") or opcode == "async-update":
            continue  # the matching -start is counted; following -done's calls= would count twice
        if opcode == "while":
            m = _TRIP_COUNT.search(rest)
            trips = int(m.group(1)) if m else None
            condition = re.search(r"\bcondition=%?([^\s,}]+)", rest)
            for _, callee in _CALLEE.findall(rest):
                current.calls.append((callee, trips, condition.group(1) if condition else None))
        else:
            for _, callee in _CALLEE.findall(rest):
                current.calls.append((callee, 1, None))
        if opcode == "call":  # a call's callee is its to_apply (elsewhere to_apply is a reducer)
            current.calls.extend((callee, 1, None) for callee in _TO_APPLY.findall(rest))
        for branches in _BRANCHES.findall(rest):
            current.calls.extend((b.strip().lstrip("%"), 1, None) for b in branches.split(",") if b.strip())
        if opcode in _OPCODES:
            kind = _OPCODES[opcode]
            group = _group_size(rest)
            arrays = _payload(kind, opcode, parse_arrays(shape_text), group, rest)
            current.collectives.append((kind, name, arrays, group))
    return comps


def parse_collectives(hlo_text: str) -> list[Collective]:
    """Every collective of an optimized HLO module with its executions per run of the entry."""
    comps = _parse_computations(hlo_text)
    runs, unknown = _execution_counts(comps)
    out = []
    for comp in comps.values():
        if not runs[comp.name]:
            continue  # not reachable from the entry (e.g. a reducer's to_apply)
        for kind, name, arrays, group in comp.collectives:
            roles = _all_reduce_roles(comp, name, len(arrays), comps) if kind == "all-reduce" else ()
            out.append(Collective(kind, name, comp.name, arrays, group, runs[comp.name], unknown[comp.name], roles))
    return out


# What moves or reinterprets a buffer without changing it: followed when tracing a collective's
# operand back to its producer and its result forward to its uses.
_PASS_THROUGH = {"bitcast", "copy", "copy-start", "copy-done", "all-reduce-done"}


def _all_reduce_roles(comp: _Computation, name: str, n: int, comps: dict[str, _Computation]) -> tuple[str, ...]:
    """Per array of the all-reduce ``name``: "scatter", "gather" or "" (see ``Collective.roles``)."""
    inst = comp.instructions[name]
    roles = []
    for k in range(n):
        results = [name] if n == 1 else _tuple_element_uses(comp, name, k)
        operand = inst.operands[k] if k < len(inst.operands) else None
        if results and all(_only_dynamic_sliced(comp, r, comps) for r in results):
            roles.append("scatter")
        elif operand is not None and _written_into_zeros(comp, operand, comps):
            roles.append("gather")
        else:
            roles.append("")
    return tuple(roles)


def _tuple_element_uses(comp: _Computation, name: str, k: int, depth: int = 0) -> list[str]:
    """The get-tuple-element instructions that take element ``k`` of ``name``'s (async) tuple."""
    out = []
    for u in comp.users.get(name, []):
        user = comp.instructions[u]
        if user.opcode == "get-tuple-element" and user.index == k:
            out.append(u)
        elif user.opcode in _PASS_THROUGH and depth < 4:
            out.extend(_tuple_element_uses(comp, u, k, depth + 1))
    return out


def _only_dynamic_sliced(comp: _Computation, name: str, comps: dict[str, _Computation], depth: int = 0) -> bool:
    """Every use of ``name`` is a dynamic-slice of it (directly, or inside the fusions it feeds)."""
    users = comp.users.get(name, [])
    if not users or depth > 6:
        return False
    for u in users:
        user = comp.instructions[u]
        if user.opcode in _PASS_THROUGH:
            ok = _only_dynamic_sliced(comp, u, comps, depth + 1)
        elif user.opcode == "dynamic-slice":
            ok = user.operands[0] == name
        elif user.opcode == "fusion" and user.calls in comps:
            fused = comps[user.calls]
            ok = all(
                i in fused.parameters and _only_dynamic_sliced(fused, fused.parameters[i], comps, depth + 1)
                for i, o in enumerate(user.operands) if o == name
            )  # fmt: skip
        else:
            ok = False
        if not ok:
            return False
    return True


def _written_into_zeros(comp: _Computation, name: str, comps: dict[str, _Computation], depth: int = 0) -> bool:
    """``name`` is a dynamic-update-slice into zeros (directly or as a fusion's root)."""
    inst = comp.instructions.get(name)
    if inst is None or depth > 6:
        return False
    if inst.opcode in _PASS_THROUGH and inst.operands:
        return _written_into_zeros(comp, inst.operands[0], comps, depth + 1)
    if inst.opcode == "fusion" and inst.calls in comps and comps[inst.calls].root:
        fused = comps[inst.calls]
        return _written_into_zeros(fused, fused.root, comps, depth + 1)
    return inst.opcode == "dynamic-update-slice" and bool(inst.operands) and _is_zero(comp, inst.operands[0])


def _is_zero(comp: _Computation, name: str) -> bool:
    inst = comp.instructions.get(name)
    while inst is not None and inst.opcode in _PASS_THROUGH | {"broadcast"} and inst.operands:
        name, inst = inst.operands[0], comp.instructions.get(inst.operands[0])
    return name in comp.zeros


def execution_counts(hlo_text: str) -> tuple[dict[str, int], dict[str, bool]]:
    """Per computation: how often one run of the entry executes it, and whether a loop of unknown
    trip count is on the way (then counted once per iteration)."""
    return _execution_counts(_parse_computations(hlo_text))


def _execution_counts(comps: dict[str, _Computation]) -> tuple[dict[str, int], dict[str, bool]]:
    entries = [c for c in comps.values() if c.entry]
    if not entries:
        raise ValueError("no ENTRY computation in the HLO text")
    # Executions of each computation per run of the entry, callers before callees (Kahn's order).
    callers = defaultdict(int)
    for comp in comps.values():
        for callee, _, _ in comp.calls:
            if callee in comps:
                callers[callee] += 1
    runs: dict[str, int] = defaultdict(int)
    unknown: dict[str, bool] = defaultdict(bool)
    ready = [c.name for c in entries]
    for c in ready:
        runs[c] = 1
    while ready:
        name = ready.pop()
        for callee, trips, condition in comps[name].calls:
            if callee not in comps:
                continue
            if trips is None and condition in comps:
                trips = comps[condition].counted_limit
            runs[callee] += runs[name] * (trips or 1)
            unknown[callee] |= unknown[name] or trips is None
            callers[callee] -= 1
            if callers[callee] == 0:
                ready.append(callee)
    return runs, unknown


@dataclasses.dataclass(frozen=True)
class KindSummary:
    kind: str
    count: int  # executions per step
    instructions: int
    elements: int  # per step, all executions
    bytes: int  # per step, all executions
    wire_bytes: float  # sent per device per step (ring algorithms)
    dtypes: dict[str, int]  # elements per dtype
    in_unknown_loop: int  # instructions inside loops of unknown trip count


def summarize(collectives: Iterable[Collective], num_devices: int) -> dict[str, KindSummary]:
    """Per kind: executions, elements and bytes per step, and the bytes each device sends."""
    groups: dict[str, list[Collective]] = defaultdict(list)
    for c in collectives:
        groups[c.kind].append(c)
    out = {}
    for kind in KINDS:
        cs = groups.get(kind, [])
        if not cs:
            continue
        dtypes: dict[str, int] = defaultdict(int)
        for c in cs:
            for a in c.arrays:
                dtypes[a.dtype] += a.elements * c.executions
        out[kind] = KindSummary(
            kind=kind,
            count=sum(c.executions for c in cs),
            instructions=len(cs),
            elements=sum(c.elements * c.executions for c in cs),
            bytes=sum(c.bytes * c.executions for c in cs),
            wire_bytes=sum(c.wire_bytes(num_devices) * c.executions for c in cs),
            dtypes=dict(dtypes),
            in_unknown_loop=sum(c.in_unknown_loop for c in cs),
        )
    return out
