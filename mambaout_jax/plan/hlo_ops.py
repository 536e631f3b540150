"""The instructions a compiled TPU program executes, with what each costs, read from its HLO text.

``compiled.cost_analysis()`` gives one total for a program; to see where the bytes and FLOPs go,
this module reads the optimized HLO (``compiled.as_text()``) and prices every instruction that
runs on its own -- a fusion, a convolution, a copy, a collective:

- **bytes accessed** (``bytes_accessed``): the operands it reads plus the result it writes, each
  at the size of its TPU layout (tiles padded: a ``bf16[16,56,56,96]`` in ``T(8,128)(2,1)`` tiles
  occupies 128 lanes of its 96 channels), in whatever memory they live. A fusion parameter read
  only through a ``slice`` or ``dynamic-slice`` counts the slice, an in-place
  ``dynamic-update-slice`` result the update, an asynchronous copy its buffer read once and
  written once. ``hbm_bytes`` is the part not in on-chip memory (VMEM, memory space ``S(1)``),
  ``logical_bytes`` the same without tile padding.
- **XLA's count** (``xla_bytes``): the same instruction by the rules of XLA's own cost analysis
  (what ``cost_analysis()["bytes accessed"]`` sums), which count some things more often: the
  async copies 4x, ``ConcatBitcast`` custom calls at their result, a fusion parameter once per
  broadcast using it (the comments above ``_xla_param_read``). ``xla_bytes_accessed(hlo)`` gives
  the program's total by those rules; docs/TPU_PLANNING.md has how close it comes.
- **FLOPs**: 2 per multiply-add of each ``dot``/``convolution`` (from its shapes and dimension
  numbers), 1 per element of each elementwise or reduction op inside a fusion.
- **estimated cycles**: the TPU compiler's own cost-model estimate for the instruction, from its
  ``backend_config`` (present on fusions and convolutions).
- **op name**: the ``op_name`` metadata JAX attached, which carries the ``jax.named_scope`` path of
  the model code the instruction came from (``jit(step)/transpose(jvp(stages_0))/blocks_1/fc1/...``).

Every instruction is counted as often as it executes per run (loop bodies times their trip
count, as in ``collectives``). ``tests/test_breakdown.py`` checks the FLOPs against the compiler's
totals on real compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections import defaultdict

from mambaout_jax.plan.collectives import execution_counts

_DTYPE_BITS = {
    "pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64,
    "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128, "token": 0,
    "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8, "f8e4m3b11fnuz": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "f8e3m4": 8,
}
# An array shape with its optional layout: bf16[16,56,56,96]{3,0,2,1:T(8,128)(2,1)S(1)}
_ARRAY = re.compile(
    r"\b(" + "|".join(sorted(_DTYPE_BITS, key=len, reverse=True)) + r")\[([0-9,]*)\](?:\{([^}]*)\})?"
)
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\((.*)\)\s*->\s*(.*)\{\s*$")
_DEFINITION = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")

# Instructions that move no data of their own: views, tuple plumbing, control.
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id",
    "iota", "while", "conditional", "call", "add-dependency", "opt-barrier", "domain",
}
# The -done half of an async pair: the -start carries the transfer.
_ASYNC_DONE = re.compile(r".*-done$|^async-update$")
_ELEMENTWISE_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "broadcast", "reshape",
                     "transpose", "slice", "dynamic-slice", "concatenate", "pad", "copy", "iota", "reverse",
                     "bitcast-convert", "dynamic-update-slice", "gather"}  # fmt: skip
_TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "logistic", "erf", "sqrt",
                   "rsqrt", "cbrt", "power", "sine", "cosine", "tan", "atan2"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ArrayShape:
    dtype: str
    dims: tuple[int, ...]
    minor_to_major: tuple[int, ...] | None
    tiles: tuple[tuple[int, ...], ...]
    memory_space: int  # 0 = HBM; 1 = VMEM on TPU

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def logical_bytes(self) -> int:
        return self.elements * _DTYPE_BITS[self.dtype] // 8

    @functools.cached_property
    def bytes(self) -> int:
        """Bytes in memory: the dims in layout order padded to the tiles (XLA's tiling rules)."""
        if not self.tiles or not self.dims:
            return self.logical_bytes
        order = self.minor_to_major if self.minor_to_major is not None else tuple(reversed(range(len(self.dims))))
        physical = [self.dims[d] for d in reversed(order)]  # major to minor
        for tile in self.tiles:
            # A tile covers the most minor len(tile) dims; after tiling, those dims are the tile's.
            n = min(len(tile), len(physical))
            for k in range(1, n + 1):
                t = tile[-k]
                if t > 1:
                    physical[-k] = -(-physical[-k] // t) * t
        return math.prod(physical) * _DTYPE_BITS[self.dtype] // 8

    @property
    def hbm_bytes(self) -> int:
        return self.bytes if self.memory_space == 0 else 0


@functools.lru_cache(maxsize=None)
def parse_shapes(text: str) -> tuple[ArrayShape, ...]:
    """Every array in an HLO shape string (tuples flattened), with its layout."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(text):
        minor_to_major, tiles, space = None, (), 0
        if layout:
            order, _, rest = layout.partition(":")
            if order.strip():
                minor_to_major = tuple(int(x) for x in order.split(",") if x.strip())
            tiles = tuple(tuple(int(x) for x in t.split(",") if x.strip() and x.strip() != "*")
                          for t in re.findall(r"T\(([^)]*)\)", rest))  # fmt: skip
            m = re.search(r"S\((\d+)\)", rest)
            space = int(m.group(1)) if m else 0
        out.append(ArrayShape(dtype, tuple(int(x) for x in dims.split(",") if x), minor_to_major, tiles, space))
    return tuple(out)


@dataclasses.dataclass
class Instruction:
    name: str
    shape_text: str
    opcode: str
    operands: list[str]
    args: str  # the text inside the opcode's parentheses (a parameter's index, a constant's value)
    attrs: str
    root: bool

    @property
    def shapes(self) -> list[ArrayShape]:
        return parse_shapes(self.shape_text)

    def attr(self, key: str) -> str | None:
        m = re.search(r"\b" + re.escape(key) + r"=%?([^\s,}]+)", self.attrs)
        return m.group(1) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    @property
    def backend_config(self) -> dict:
        i = self.attrs.find("backend_config=")
        if i < 0:
            return {}
        text = self.attrs[i + len("backend_config=") :]
        try:
            return json.JSONDecoder().raw_decode(text)[0]
        except ValueError:
            return {}


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    params: list[str]  # parameter text, in order
    instructions: dict[str, Instruction]

    @property
    def root(self) -> Instruction | None:
        return next((i for i in self.instructions.values() if i.root), None)


def _split_top(text: str) -> tuple[str, str]:
    """``'(a, (b)), rest'`` -> ``('a, (b)', ', rest')``: the text inside the first balanced parens."""
    depth = 0
    for k, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                return text[1:k], text[k + 1 :]
    return text[1:], ""


def _parse_instruction(line: str) -> Instruction | None:
    m = _DEFINITION.match(line)
    if not m:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # tuple shape
        inner, rest = _split_top(rest)
        shape_text = "(" + inner + ")"
    else:
        shape_text, _, rest = rest.partition(" ")
        rest = " " + rest
    op = _OPCODE.match(rest)
    if not op:
        return None
    args, attrs = _split_top(rest[op.end() - 1 :])
    operands = re.findall(r"%([^\s,()]+)", args)
    return Instruction(m.group(2), shape_text, op.group(1), operands, args, attrs, bool(m.group(1)))


def parse_module(hlo_text: str) -> dict[str, Computation]:
    comps: dict[str, Computation] = {}
    current = None
    for line in hlo_text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h:
                current = Computation(h.group(2), bool(h.group(1)), [], {})
                comps[current.name] = current
            continue
        if line.strip() == "}":
            current = None
            continue
        inst = _parse_instruction(line)
        if inst is not None:
            current.instructions[inst.name] = inst
    return comps


@dataclasses.dataclass(frozen=True)
class OpCost:
    """One instruction that runs on its own, with its cost per execution."""

    name: str
    opcode: str  # 'fusion', 'convolution', 'copy-start', 'all-reduce', ...
    kind: str  # fusion kind (kLoop, kOutput, ...) or the opcode
    computation: str
    executions: int  # per run of the program
    bytes_accessed: int  # bytes read and written per execution, every memory space (XLA's measure)
    bytes_read: int
    bytes_written: int
    hbm_bytes: int  # the part of bytes_accessed in HBM (operands and results not placed in VMEM)
    logical_bytes: int  # bytes_accessed without tile padding
    xla_bytes: int  # bytes accessed as XLA's cost analysis counts this instruction (``_xla_bytes``)
    flops: float  # per execution
    transcendentals: float
    estimated_cycles: int | None  # the TPU compiler's estimate, per execution
    op_name: str  # op_name of the instruction that dominates it (its dot/convolution, else its root)
    op_name_inherited: bool  # the compiler added it without one: op_name is its consumer's (or producer's)
    op_names: tuple[str, ...]  # every distinct op_name fused into it
    result: str  # the result's shape text, without layouts

    @property
    def total_bytes(self) -> int:
        return self.bytes_accessed * self.executions

    @property
    def total_hbm_bytes(self) -> int:
        return self.hbm_bytes * self.executions

    @property
    def total_logical_bytes(self) -> int:
        return self.logical_bytes * self.executions

    @property
    def total_xla_bytes(self) -> int:
        return self.xla_bytes * self.executions

    @property
    def total_flops(self) -> float:
        return self.flops * self.executions


def _dot_flops(inst: Instruction, shapes: dict[str, list[ArrayShape]]) -> float:
    out = inst.shapes
    if not out or not inst.operands:
        return 0.0
    lhs = shapes.get(inst.operands[0])
    if not lhs:
        return 0.0
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attrs)
    contract = [int(x) for x in m.group(1).split(",") if x] if m else []
    k = math.prod(lhs[0].dims[d] for d in contract) if contract else 1
    return 2.0 * out[0].elements * k


def _window(attrs: str) -> dict[str, list[int]]:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    out: dict[str, list[int]] = {}
    for key, value in re.findall(r"(\w+)=([0-9_x]+)", m.group(1) if m else ""):
        if key == "pad":
            out["pad_low"] = [int(p.split("_")[0]) for p in value.split("x")]
        else:
            out[key] = [int(v) for v in value.split("x")]
    return out


def _valid_positions(inp: int, out: int, kernel: int, stride: int, pad_low: int, base: int, dilation: int) -> int:
    """(output, kernel) position pairs of one spatial dim whose input index exists (not padding, not a hole)."""
    count = 0
    for k in range(kernel):
        for o in range(out):
            undilated = o * stride - pad_low + k * dilation
            if undilated % base == 0 and 0 <= undilated // base < inp:
                count += 1
    return count


def _conv_flops(inst: Instruction, shapes: dict[str, tuple[ArrayShape, ...]]) -> float:
    """XLA's count: 2 x FMAs, where padding taps and dilation holes do no work (HloCostAnalysis)."""
    out = inst.shapes
    if len(inst.operands) < 2 or not out:
        return 0.0
    lhs, rhs = shapes.get(inst.operands[0]), shapes.get(inst.operands[1])
    labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", inst.attrs)
    if not lhs or not rhs or not labels:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    lhs_d, rhs_d, out_d = lhs[0].dims, rhs[0].dims, out[0].dims
    window = _window(inst.attrs)
    spatial = sorted(c for c in lhs_l if c.isdigit())
    positions = 1
    for k, c in enumerate(spatial):
        get = lambda key, default: window.get(key, [default] * len(spatial))[k]  # noqa: E731
        positions *= _valid_positions(
            lhs_d[lhs_l.index(c)], out_d[out_l.index(c)], rhs_d[rhs_l.index(c)], get("stride", 1), get("pad_low", 0),
            get("lhs_dilate", 1), get("rhs_dilate", 1),
        )  # fmt: skip
    groups = re.search(r"feature_group_count=(\d+)", inst.attrs)
    batch_groups = re.search(r"batch_group_count=(\d+)", inst.attrs)
    fmas = (
        (lhs_d[lhs_l.index("f")] // (int(groups.group(1)) if groups else 1))
        * out_d[out_l.index("f")]
        * (lhs_d[lhs_l.index("b")] // (int(batch_groups.group(1)) if batch_groups else 1))
        * positions
    )
    return 2.0 * fmas


def _inner_costs(comp: Computation, comps: dict[str, Computation]) -> tuple[float, float, list[Instruction]]:
    """FLOPs and transcendentals of a fused computation, and its dot/convolution instructions."""
    shapes = {n: i.shapes for n, i in comp.instructions.items()}
    flops = trans = 0.0
    heavy = []
    for inst in comp.instructions.values():
        if inst.opcode == "dot":
            flops += _dot_flops(inst, shapes)
            heavy.append(inst)
        elif inst.opcode == "convolution":
            flops += _conv_flops(inst, shapes)
            heavy.append(inst)
        elif inst.opcode in ("reduce", "reduce-window"):
            operand = shapes.get(inst.operands[0]) if inst.operands else None
            flops += operand[0].elements if operand else 0
        elif inst.opcode == "fusion":
            callee = comps.get(inst.attr("calls") or "")
            if callee is not None:
                f, t, h = _inner_costs(callee, comps)
                flops, trans, heavy = flops + f, trans + t, heavy + h
        elif inst.opcode not in _ELEMENTWISE_FREE and inst.shapes:
            n = sum(s.elements for s in inst.shapes)
            if inst.opcode in _TRANSCENDENTAL:
                trans += n
            else:
                flops += n
    return flops, trans, heavy


# How an array is measured: as laid out (tiles padded) in any memory, as laid out in HBM only,
# or at its logical size (no padding).
MEASURES = ("bytes", "hbm", "logical")


def _size(shapes, measure: str) -> int:
    if measure == "logical":
        return sum(x.logical_bytes for x in shapes)
    return sum(x.hbm_bytes if measure == "hbm" else x.bytes for x in shapes)


def _fused_read(fused: Computation, operand_shapes: list[tuple[ArrayShape, ...]], measure: str) -> int:
    """Bytes a fusion reads: each operand in full, unless its parameter is only sliced or updated in place."""
    params = {i.name: int(i.args) for i in fused.instructions.values() if i.opcode == "parameter" and i.args.strip().isdigit()}
    users = defaultdict(list)
    for inst in fused.instructions.values():
        for o in inst.operands:
            users[o].append(inst)
    total = 0
    for name, index in params.items():
        if index >= len(operand_shapes):
            continue
        full = _size(operand_shapes[index], measure)
        us = users.get(name, [])
        if full and us and all(u.opcode in ("slice", "dynamic-slice") and u.operands[0] == name for u in us):
            full = min(full, sum(_size(u.shapes, "logical" if measure == "logical" else "bytes") for u in us))
        elif us and all(u.opcode == "dynamic-update-slice" and u.operands[0] == name for u in us):
            full = 0  # updated in place: the untouched part is neither read nor written
        total += full
    return total


def _read(inst: Instruction, fused: Computation | None, operand_shapes, measure: str) -> int:
    if fused is not None:
        return _fused_read(fused, operand_shapes, measure)
    if inst.opcode in ("slice", "slice-start") and operand_shapes and operand_shapes[0]:
        # Reads the slice only, from where its operand lives.
        result = inst.shapes[1] if inst.opcode == "slice-start" else inst.shapes[0]
        source = operand_shapes[0][0]
        if measure == "hbm" and source.memory_space != 0:
            return 0
        return result.logical_bytes if measure == "logical" else result.bytes
    if inst.opcode == "custom-call" and 'custom_call_target="ConcatBitcast"' in inst.attrs:
        return 0  # a concatenation of adjacent buffers by reinterpretation: no data moves
    return sum(_size(ss, measure) for ss in operand_shapes)


def _written(inst: Instruction, fused: Computation | None, measure: str) -> int:
    if inst.opcode in ("copy-start", "slice-start"):  # (destination / (source), result, context)
        results = inst.shapes
        return _size(results[:1] if inst.opcode == "copy-start" else results[1:2], measure)
    if inst.opcode.endswith("-start"):  # async collectives: (operands, results, ...)
        results = inst.shapes
        return _size(results[len(results) // 2 : len(results) // 2 + 1], measure)
    if inst.opcode == "custom-call" and 'custom_call_target="ConcatBitcast"' in inst.attrs:
        return 0
    out = _size(inst.shapes, measure)
    root = fused.root if fused is not None else None
    if out and root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
        update = fused.instructions.get(root.operands[1])
        if update is not None:
            return _size(update.shapes, "logical" if measure == "logical" else "bytes")
    return out


# XLA's own count. ``compiled.cost_analysis()["bytes accessed"]`` is XLA's HloCostAnalysis
# (xla/service/hlo_cost_analysis.cc) over the TPU's shape sizes; the functions below apply its
# rules to the same instructions, so that the instruction sum and XLA's figure can be compared
# part by part. Where they differ from the measure above (``_read`` / ``_written``):
# - a fusion reads a parameter once per ``broadcast`` or ``reshape`` that uses it, plus once for
#   its other users together; through a nested fusion, what that fusion's own slices read (and
#   nothing through a nested fusion that is the root);
# - an asynchronous copy (``copy-start`` / ``copy-done``) counts 4x its buffer, a ``slice-start``
#   2x its slice, and a ``ConcatBitcast`` custom call its result (``_read`` / ``_written``: the
#   copy once each way, the custom call nothing). These three are the TPU's own, not in the open
#   source analysis: read off compiled programs, whose ``cost_analysis()`` these rules then
#   reproduce (to 0.01-0.4%, data-parallel train steps included; an fsdp step they overshoot by
#   3.5%, not traced: docs/TPU_PLANNING.md);
# - a loop body counts once, whatever its trip count (``xla_bytes_accessed``).


def _xla_param_read(param: Instruction, fused: Computation, comps: dict[str, Computation], users) -> int:
    """Bytes a fusion reads through one of its parameters, as XLA counts them (FusionParameterReadBytes)."""
    full = _size(param.shapes, "bytes")
    total, shared = 0, False
    for user in users.get(param.name, []):
        op = user.opcode
        if op == "fusion":
            total += _xla_nested_read(param.name, user, comps, users)
        elif op == "slice" or (op == "dynamic-slice" and user.operands[0] == param.name):
            total += _size(user.shapes, "bytes")
        elif op == "dynamic-update-slice" and user.operands[0] == param.name:
            pass  # aliased to the result: not read
        elif op in ("broadcast", "reshape"):
            total += full
        elif not shared:  # every other user shares one read
            shared, total = True, total + full
    return total


def _xla_nested_read(name: str, nested: Instruction, comps, users) -> int:
    """What a fusion reads of its parameter ``name`` through the nested fusion ``nested`` that uses it."""
    callee = comps.get(nested.attr("calls") or "")
    if callee is None:
        return 0
    params = _parameters(callee)
    root = callee.root
    total = 0
    for index, operand in enumerate(nested.operands):
        inner = params.get(index)
        if operand != name or inner is None:
            continue
        # "simple": the parameter is the nested fusion's root or feeds it directly.
        simple = root is None or not root.operands or root.operands[0] == inner.name
        shared = False
        for consumer in users.get(nested.name, []):
            op = consumer.opcode
            sliced = consumer.operands[0] == nested.name
            if simple and (op == "slice" or (op == "dynamic-slice" and sliced)):
                total += _size(consumer.shapes, "bytes")  # what the consumer's slice takes
            elif simple and op in ("dynamic-slice", "dynamic-update-slice"):
                if not (op == "dynamic-update-slice" and sliced) and not shared:  # else updated in place
                    shared, total = True, total + _size(nested.shapes, "bytes")
            elif not shared:
                shared, total = True, total + _xla_param_read(inner, callee, comps, _users(callee))
    return total


def _parameters(comp: Computation) -> dict[int, Instruction]:
    return {int(i.args): i for i in comp.instructions.values() if i.opcode == "parameter" and i.args.strip().isdigit()}


def _xla_fusion_bytes(inst: Instruction, fused: Computation, comps) -> int:
    root = fused.root
    tupled = root is not None and root.opcode == "tuple"
    outputs = [fused.instructions.get(o) for o in root.operands] if tupled else [root]
    written = 0
    for out in outputs:
        if out is not None and out.opcode == "dynamic-update-slice" and len(out.operands) > 1:
            written += _size(fused.instructions[out.operands[1]].shapes, "bytes")  # written in place
        elif out is not None:
            written += _size(out.shapes, "bytes")
    users = _users(fused)
    read = sum(_xla_param_read(p, fused, comps, users) for p in _parameters(fused).values())
    constants = sum(_size(i.shapes, "bytes") for i in fused.instructions.values()
                    if i.opcode == "constant" and i.shapes and i.shapes[0].elements > 1)  # fmt: skip
    return written + read + constants


def _xla_bytes(inst: Instruction, fused: Computation | None, comps, operand_shapes) -> int:
    """Bytes accessed by one instruction as XLA's cost analysis counts them (see above)."""
    op = inst.opcode
    if op in _FREE or _ASYNC_DONE.match(op):
        return 0
    if op == "fusion" and fused is not None:
        return _xla_fusion_bytes(inst, fused, comps)
    if op == "slice":
        return 2 * _size(inst.shapes, "bytes")
    if op == "dynamic-slice":
        return 2 * _size(inst.shapes, "bytes") + sum(_size(s, "bytes") for s in operand_shapes[1:])
    if op == "dynamic-update-slice":
        return 2 * _size(operand_shapes[1], "bytes") + sum(_size(s, "bytes") for s in operand_shapes[2:])
    if op == "copy-start":
        return 4 * _size(operand_shapes[0], "bytes")
    if op == "slice-start":  # (source), slice, context
        return 2 * _size(inst.shapes[1:2], "bytes")
    if op == "custom-call" and 'custom_call_target="ConcatBitcast"' in inst.attrs:
        return _size(inst.shapes, "bytes")
    return _size(inst.shapes, "bytes") + sum(_size(s, "bytes") for s in operand_shapes)


def xla_bytes_accessed(hlo_text: str) -> int:
    """The program's bytes accessed by XLA's rules, loop bodies once: what ``cost_analysis()`` reports."""
    comps = parse_module(hlo_text)
    entry = next((c for c in comps.values() if c.entry), None)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return _xla_computation_bytes(entry, comps)


def _xla_computation_bytes(comp: Computation, comps: dict[str, Computation]) -> int:
    shapes = {n: i.shapes for n, i in comp.instructions.items()}
    total = 0
    for inst in comp.instructions.values():
        called = [comps[c] for c in _called(inst) if c in comps]
        if inst.opcode == "while" or inst.opcode == "call":
            total += sum(_xla_computation_bytes(c, comps) for c in called)  # body and condition once
        elif inst.opcode == "conditional":
            total += max((_xla_computation_bytes(c, comps) for c in called), default=0)
        else:
            fused = comps.get(inst.attr("calls") or "") if inst.opcode == "fusion" else None
            total += _xla_bytes(inst, fused, comps, [shapes.get(o, ()) for o in inst.operands])
    return total


def _called(inst: Instruction) -> list[str]:
    if inst.opcode == "while":
        return [inst.attr("body") or "", inst.attr("condition") or ""]
    if inst.opcode == "call":
        return [inst.attr("to_apply") or ""]
    if inst.opcode == "conditional":
        m = re.search(r"branch_computations=\{([^}]*)\}", inst.attrs)
        if m:
            return [b.strip().lstrip("%") for b in m.group(1).split(",")]
        return [inst.attr("true_computation") or "", inst.attr("false_computation") or ""]
    return []


def _users(comp: Computation) -> dict[str, list[Instruction]]:
    users = defaultdict(list)
    for inst in comp.instructions.values():
        for o in inst.operands:
            users[o].append(inst)
    return users


def _inherited_op_name(inst: Instruction, comp: Computation, users, comps, depth: int = 0) -> str:
    """The op_name of the nearest consumer (then producer) of an instruction the compiler added
    without one (memory-space copies and prefetches, their -done halves, bitcasts)."""
    if depth > 8:
        return ""
    for user in users.get(inst.name, []):
        name = _main_op_name(user, comps) or _inherited_op_name(user, comp, users, comps, depth + 1)
        if name:
            return name
    for operand in inst.operands:
        producer = comp.instructions.get(operand)
        if producer is not None and producer.opcode != "parameter":
            name = _main_op_name(producer, comps)
            if name:
                return name
    return ""


def _main_op_name(inst: Instruction, comps: dict[str, Computation]) -> str:
    """The op_name that says what an instruction computes: its dot/convolution's, else its own."""
    fused = comps.get(inst.attr("calls") or "") if inst.opcode == "fusion" else None
    if fused is not None:
        heavy = [i for i in fused.instructions.values() if i.opcode in ("dot", "convolution") and i.op_name]
        if heavy:
            return heavy[0].op_name
        if not inst.op_name:
            return next((i.op_name for i in fused.instructions.values() if i.op_name), "")
    return inst.op_name


def op_costs(hlo_text: str) -> list[OpCost]:
    """Every instruction of the program that runs on its own, with its cost (module docstring)."""
    comps = parse_module(hlo_text)
    # Fused and reducer computations are priced inside their caller; what runs on its own are the
    # instructions of the entry and of the computations it calls as loop bodies, branches or calls.
    runs, _ = execution_counts(hlo_text)
    nested = set()
    for comp in comps.values():
        for inst in comp.instructions.values():
            callee = inst.attr("calls")
            if callee and (inst.opcode == "fusion" or inst.opcode.endswith("-start")):
                nested.add(callee)
            callee = inst.attr("to_apply")
            if callee and inst.opcode != "call":
                nested.add(callee)
    out = []
    for comp in comps.values():
        executions = runs.get(comp.name, 0)
        if not executions or comp.name in nested:
            continue
        shapes = {n: i.shapes for n, i in comp.instructions.items()}
        users = _users(comp)
        for inst in comp.instructions.values():
            if inst.opcode in _FREE or _ASYNC_DONE.match(inst.opcode):
                continue
            fused = comps.get(inst.attr("calls") or "") if inst.opcode in ("fusion", "async-start") else None
            operand_shapes = [shapes.get(o, ()) for o in inst.operands]
            read = {m: _read(inst, fused, operand_shapes, m) for m in MEASURES}
            written = {m: _written(inst, fused, m) for m in MEASURES}
            if fused is not None:
                flops, trans, _ = _inner_costs(fused, comps)
            elif inst.opcode == "convolution":
                flops, trans = _conv_flops(inst, shapes), 0.0
            elif inst.opcode == "dot":
                flops, trans = _dot_flops(inst, shapes), 0.0
            elif inst.opcode in _ELEMENTWISE_FREE or not inst.shapes or inst.opcode.endswith("-start"):
                flops, trans = 0.0, 0.0
            else:
                n = float(sum(x.elements for x in inst.shapes))
                flops, trans = (0.0, n) if inst.opcode in _TRANSCENDENTAL else (n, 0.0)
            names = [inst.op_name] + ([i.op_name for i in fused.instructions.values()] if fused is not None else [])
            cycles = (inst.backend_config.get("window_config") or {}).get("estimated_cycles")
            main = _main_op_name(inst, comps)
            inherited = not main
            if inherited:
                main = _inherited_op_name(inst, comp, users, comps)
            kind = re.search(r"kind=(k[A-Za-z]+)", inst.attrs)
            out.append(OpCost(
                name=inst.name,
                opcode=inst.opcode,
                kind=kind.group(1) if kind else inst.opcode,
                computation=comp.name,
                executions=executions,
                bytes_accessed=read["bytes"] + written["bytes"],
                bytes_read=read["bytes"],
                bytes_written=written["bytes"],
                hbm_bytes=read["hbm"] + written["hbm"],
                logical_bytes=read["logical"] + written["logical"],
                xla_bytes=_xla_bytes(inst, fused if inst.opcode == "fusion" else None, comps, operand_shapes),
                flops=flops,
                transcendentals=trans,
                estimated_cycles=int(cycles) if cycles is not None else None,
                op_name=main,
                op_name_inherited=inherited,
                op_names=tuple(sorted({n for n in names if n})),
                result=re.sub(r"\{[^}]*\}", "", inst.shape_text),
            ))  # fmt: skip
    return out
