"""Device mesh and sharding: where every array of the training step lives.

Parallelism is ``jax.jit`` over ``NamedSharding``s on a ``Mesh`` (no pmap). The batch is split over
the ``data`` axis; parameters and optimizer state follow *sharding rules*, a list of
``(regex over the parameter path, tactic)`` pairs where the first match wins:

- ``replicate``: a full copy on every device (data parallelism; XLA all-reduces the gradients);
- ``fsdp``: split the largest dimension that divides by the data-axis size over ``data``
  (ZeRO-3 style; XLA all-gathers parameters for the forward/backward and reduce-scatters gradients).

Switching strategy is a config change, not a code change.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
TACTICS = ("replicate", "fsdp")
PRESETS: dict[str, tuple[tuple[str, str], ...]] = {
    "data_parallel": ((".*", "replicate"),),
    # Small tensors (norm scales, biases) gain nothing from sharding and cost a collective each.
    "fsdp": ((r".*/(bias|scale|gamma)$", "replicate"), (".*", "fsdp")),
}


class ShardingConfigError(ValueError):
    pass


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The 1-D ``data`` mesh over ``devices`` (default: every device of every process).

    ``jax.make_mesh`` orders the devices by the physical topology on TPU; the axis is ``Auto``, so
    XLA's SPMD partitioner places whatever the shardings leave open.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), (jax.sharding.AxisType.Auto,), devices=devices)


def resolve_rules(rules: str | Sequence[Sequence[str]]) -> tuple[tuple[str, str], ...]:
    """A preset name or explicit ``(regex, tactic)`` pairs, validated."""
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ShardingConfigError(f"unknown sharding preset {rules!r}; known: {', '.join(PRESETS)}")
        return PRESETS[rules]
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ShardingConfigError(f"a sharding rule is (regex, tactic), got {rule!r}")
        pattern, tactic = rule
        if tactic not in TACTICS:
            raise ShardingConfigError(f"unknown sharding tactic {tactic!r} in rule {rule!r}; known: {TACTICS}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ShardingConfigError(f"bad regex {pattern!r} in sharding rule: {e}") from None
        out.append((pattern, tactic))
    return tuple(out)


def partition_spec(path: str, shape: Sequence[int], rules: Sequence[tuple[str, str]], axis_size: int) -> P:
    """The PartitionSpec the first matching rule gives a parameter (replicated when none matches)."""
    for pattern, tactic in rules:
        if re.fullmatch(pattern, path):
            if tactic == "replicate":
                return P()
            # fsdp: the largest evenly divisible dimension; replicate if none divides.
            for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
                if shape[dim] % axis_size == 0 and shape[dim] >= axis_size:
                    spec = [None] * len(shape)
                    spec[dim] = DATA_AXIS
                    return P(*spec)
            return P()
    return P()


def param_shardings(
    shapes: Mapping[str, Any], mesh: Mesh, rules: str | Sequence[Sequence[str]]
) -> dict[str, NamedSharding]:
    """``NamedSharding`` per contract path (``shapes`` maps path -> anything with ``.shape``/tuple)."""
    rules = resolve_rules(rules)
    axis_size = mesh.shape[DATA_AXIS]
    return {
        path: NamedSharding(mesh, partition_spec(path, tuple(getattr(s, "shape", s)), rules, axis_size))
        for path, s in shapes.items()
    }


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``, other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> int:
    """Validate the batch arithmetic before anything compiles; returns the micro-batch size."""
    devices = mesh.devices.size
    if global_batch_size <= 0:
        raise ShardingConfigError(f"batch_size must be positive, got {global_batch_size}")
    if grad_accum_steps <= 0:
        raise ShardingConfigError(f"grad_accum_steps must be positive, got {grad_accum_steps}")
    if global_batch_size % grad_accum_steps:
        raise ShardingConfigError(
            f"batch_size {global_batch_size} does not divide by grad_accum_steps {grad_accum_steps}"
        )
    micro = global_batch_size // grad_accum_steps
    if micro % devices:
        raise ShardingConfigError(
            f"the global batch ({global_batch_size}"
            + (f" / {grad_accum_steps} accumulation steps = {micro}" if grad_accum_steps > 1 else "")
            + f") must divide by the number of devices ({devices}); e.g. use batch_size="
            f"{max(devices, micro // devices * devices) * grad_accum_steps}"
        )
    if global_batch_size % jax.process_count():
        raise ShardingConfigError(
            f"batch_size {global_batch_size} must divide by the number of processes ({jax.process_count()})"
        )
    return micro


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's slice of the batch into global arrays sharded over ``data``.

    Every process passes its own ``global_batch / process_count`` rows; this is the multi-host path
    (``jax.make_array_from_process_local_data``) and equally correct with a single process.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, local in local_batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
