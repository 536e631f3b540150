"""Where a compiled train step's bytes and FLOPs go, by model part.

The model code names its parts with ``jax.named_scope`` (``stem``, ``stages_s/blocks_b/fc1``, ...;
``mambaout_jax/models/mambaout.py``) and the train step names ``augment``, ``loss`` and
``optimizer`` (``mambaout_jax/train/steps.py``). JAX writes the scope path into every HLO
instruction's ``op_name`` -- the backward pass as ``transpose(jvp(stages_0))/blocks_1/fc1/...`` --
and the TPU compiler keeps it through fusion, so each instruction of the optimized program
(``hlo_ops.op_costs``) is attributed to the innermost part its dominant operation came from.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Iterable

from mambaout_jax.plan.hlo_ops import OpCost, op_costs
from mambaout_jax.plan.planner import abstract_train_batch, build_topology_program
from mambaout_jax.plan.topology import load_topology

# Scope name -> the part it is reported as, innermost scope first when several are on the path.
PART_OF_SCOPE = {
    "stem": "stem",
    "downsample": "downsample",
    "norm": "LayerNorm",
    "fc1": "fc1",
    "gate": "gate",
    "dwconv": "depthwise conv",
    "concat": "concat",
    "fc2": "fc2",
    "residual": "residual",
    "head": "head",
    "loss": "loss",
    "augment": "augment",
    "optimizer": "optimizer update",
}
PARTS = tuple(dict.fromkeys(PART_OF_SCOPE.values())) + ("gradient all-reduce", "other")
_COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)")
_STAGE = re.compile(r"\bstages_(\d+)\b")


def model_part(op: OpCost) -> str:
    """The part of the model or step an instruction belongs to (see ``PART_OF_SCOPE``)."""
    if _COLLECTIVE.match(op.opcode):
        # The gradient's reduction: under autodiff's transpose, or train/steps.py's shard_map
        # reduce_grads (psum / psum_scatter after local accumulation).
        if "transpose(" in op.op_name or "reduce_grads" in op.op_name or not op.op_name:
            return "gradient all-reduce"
        return _scoped_part(op.op_name)
    return _scoped_part(op.op_name)


def _scoped_part(op_name: str) -> str:
    part = "other"
    for component in re.split(r"[/()]", op_name):
        if component in PART_OF_SCOPE:
            part = PART_OF_SCOPE[component]
    return part


def direction(op: OpCost) -> str:
    """'backward' for the transposed (gradient) computation, else 'forward'."""
    return "backward" if "transpose(" in op.op_name else "forward"


def stage(op: OpCost) -> int | None:
    m = _STAGE.search(op.op_name)
    return int(m.group(1)) if m else None


@dataclasses.dataclass(frozen=True)
class PartCost:
    part: str
    bytes_accessed: float  # per run of the program, all executions
    hbm_bytes: float
    xla_bytes: float  # the same instructions by XLA's cost-analysis rules (``hlo_ops._xla_bytes``)
    flops: float
    estimated_cycles: float  # the TPU compiler's estimate, summed over the part's instructions
    instructions: int
    forward_bytes: float
    backward_bytes: float


def by_part(ops: Iterable[OpCost]) -> list[PartCost]:
    """Totals per part, in ``PARTS`` order (parts with no instruction left out)."""
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for op in ops:
        a = acc[model_part(op)]
        a["bytes"] += op.total_bytes
        a["hbm"] += op.total_hbm_bytes
        a["xla"] += op.total_xla_bytes
        a["flops"] += op.total_flops
        a["cycles"] += (op.estimated_cycles or 0) * op.executions
        a["n"] += 1
        a[direction(op)] += op.total_bytes
    return [
        PartCost(p, a["bytes"], a["hbm"], a["xla"], a["flops"], a["cycles"], int(a["n"]), a["forward"], a["backward"])
        for p in PARTS
        if (a := acc.get(p))
    ]


def largest(ops: Iterable[OpCost], n: int, key: str = "bytes") -> list[OpCost]:
    """The ``n`` instructions with the most bytes accessed (``key='bytes'``) or FLOPs (``'flops'``)."""
    measure = {"bytes": lambda o: o.total_bytes, "flops": lambda o: o.total_flops}[key]
    return sorted(ops, key=measure, reverse=True)[:n]


def short_op_name(op_name: str) -> str:
    """``jit(step)/transpose(jvp(stages_0))/blocks_1/fc1/dot_general`` -> ``bwd stages_0/blocks_1/fc1/dot_general``."""
    backward = "transpose(" in op_name
    name = re.sub(r"^jit\([^)]*\)/", "", op_name)
    name = re.sub(r"(transpose\()?jvp\(([^)]*)\)\)?", r"\2", name)
    name = re.sub(r"/+", "/", name).strip("/")
    return ("bwd " if backward else "fwd ") + name


@dataclasses.dataclass(frozen=True)
class Breakdown:
    """One compiled train step, instruction by instruction (all figures per chip, per step)."""

    model: str
    topology: str
    per_chip_batch: int  # images per chip per step (all accumulation micro-steps together)
    ops: tuple[OpCost, ...]
    xla_bytes_accessed: float  # ``compiled.cost_analysis()``, loop bodies once (as the planner reads it)
    xla_flops: float

    @property
    def bytes_accessed(self) -> float:
        return sum(op.total_bytes for op in self.ops)

    @property
    def flops(self) -> float:
        return sum(op.total_flops for op in self.ops)

    @property
    def xla_rule_bytes(self) -> float:
        """The same instructions priced by XLA's cost-analysis rules (``hlo_ops._xla_bytes``), every
        execution counted: where it and ``xla_bytes_accessed`` still differ, see docs/TPU_PLANNING.md."""
        return sum(op.total_xla_bytes for op in self.ops)

    def bytes_per_image(self) -> float:
        return self.bytes_accessed / self.per_chip_batch


def train_step_breakdown(config, topology) -> Breakdown:
    """Compile ``train.py``'s train step for ``topology`` (as ``plan_training`` does) and price
    every instruction of the optimized program (``hlo_ops.op_costs``)."""
    if isinstance(topology, str):
        topology = load_topology(topology)
    program = build_topology_program(config, topology)
    batch = abstract_train_batch(program, config.batch_size, config.data.image_size)
    compiled = program.train_step.lower(program.abstract_state(), batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return Breakdown(
        model=config.model,
        topology=topology.name,
        per_chip_batch=config.batch_size // topology.num_chips,
        ops=tuple(op_costs(compiled.as_text())),
        xla_bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        xla_flops=float(cost.get("flops", 0.0)),
    )


def format_breakdown(b: Breakdown, top: int = 15) -> str:
    """Markdown: the totals per part, then the ``top`` largest instructions by bytes and by FLOPs."""
    n = b.per_chip_batch
    total_bytes, total_flops = b.bytes_accessed or 1.0, b.flops or 1.0
    lines = [
        f"{b.model} train step on {b.topology}, {n} images per chip: "
        f"{b.bytes_accessed / n / 1e6:.1f} MB accessed and {b.flops / n / 1e9:.2f} GFLOP per image "
        f"({len(b.ops)} instructions; XLA's cost analysis: {b.xla_bytes_accessed / n / 1e6:.1f} MB, "
        f"{b.xla_flops / n / 1e9:.2f} GFLOP; its rules applied to these instructions: "
        f"{b.xla_rule_bytes / n / 1e6:.1f} MB)",
        "",
        "| part | MB/image | % bytes | fwd MB | bwd MB | XLA-rule MB | GFLOP/image | % FLOPs | FLOP/byte | instructions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in by_part(b.ops):
        lines.append(
            f"| {p.part} | {p.bytes_accessed / n / 1e6:.1f} | {100 * p.bytes_accessed / total_bytes:.1f} "
            f"| {p.forward_bytes / n / 1e6:.1f} | {p.backward_bytes / n / 1e6:.1f} | {p.xla_bytes / n / 1e6:.1f} "
            f"| {p.flops / n / 1e9:.3f} | {100 * p.flops / total_flops:.1f} "
            f"| {p.flops / max(p.bytes_accessed, 1):.1f} | {p.instructions} |"
        )
    for key, title in (("bytes", "bytes accessed"), ("flops", "FLOPs")):
        lines += [
            "",
            f"Largest {top} instructions by {title}:",
            "",
            "| MB/image | GFLOP/image | part | kind | result | op_name |",
            "|---:|---:|---|---|---|---|",
        ]
        for op in largest(b.ops, top, key):
            lines.append(
                f"| {op.total_bytes / n / 1e6:.2f} | {op.total_flops / n / 1e9:.3f} | {model_part(op)} "
                f"| {op.kind} | `{op.result[:60]}` | `{short_op_name(op.op_name)[:90]}` |"
            )
    return "\n".join(lines)


def breakdown_to_dict(b: Breakdown) -> dict:
    n = b.per_chip_batch
    return {
        "model": b.model,
        "topology": b.topology,
        "per_chip_batch": n,
        "bytes_accessed_per_image": b.bytes_accessed / n,
        "flops_per_image": b.flops / n,
        "xla_bytes_accessed_per_image": b.xla_bytes_accessed / n,
        "xla_rule_bytes_per_image": b.xla_rule_bytes / n,
        "xla_flops_per_image": b.xla_flops / n,
        "parts": [dataclasses.asdict(p) for p in by_part(b.ops)],
    }
