"""The parameter contract: a flat ``{"stem/conv1/kernel": array, ...}`` view of a model.

A path is the timm ``state_dict`` key with '.' -> '/' and the leaf renamed after Flax
(``weight`` -> ``kernel`` for convs/linears, ``scale`` for LayerNorm). The converter, the project's
checkpoints and the export back to PyTorch all speak this form; loading it is strict.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ParamMismatchError(ValueError):
    """Raised when a parameter dict does not fit a model; the message lists every difference."""


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def get_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Flat contract view of ``model``'s parameters (arrays are shared, not copied)."""
    state = nnx.state(model, nnx.Param)
    return {path_str(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in get_params(model).items()}


def describe_mismatch(
    expected: Mapping[str, tuple[int, ...]], given: Mapping[str, tuple[int, ...]], *, what: str = "checkpoint"
) -> str | None:
    """A readable list of missing, unexpected and mis-shaped keys, or None when they match."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(given) if tuple(expected[k]) != tuple(given[k]))
    if not (missing or unexpected or misshaped):
        return None
    lines = []
    if missing:
        lines.append(f"missing from the {what} ({len(missing)}): " + ", ".join(_ellipsize(missing)))
    if unexpected:
        lines.append(f"unexpected in the {what} ({len(unexpected)}): " + ", ".join(_ellipsize(unexpected)))
    if misshaped:
        items = [f"{k}: {what} {tuple(given[k])} vs model {tuple(expected[k])}" for k in misshaped]
        lines.append(f"shape mismatch ({len(misshaped)}): " + "; ".join(_ellipsize(items)))
    return "\n".join(lines)


def _ellipsize(items: list[str], limit: int = 40) -> list[str]:
    return items if len(items) <= limit else items[:limit] + [f"... and {len(items) - limit} more"]


def set_params(model: nnx.Module, params: Mapping[str, np.ndarray | jax.Array], *, what: str = "checkpoint") -> None:
    """Load a flat contract dict into ``model`` in place. Strict: any difference raises, naming it."""
    state = nnx.state(model, nnx.Param)
    flat = {path_str(path): (path, var) for path, var in nnx.to_flat_state(state)}
    problem = describe_mismatch(
        {k: tuple(var.get_value().shape) for k, (_, var) in flat.items()},
        {k: tuple(np.shape(v)) for k, v in params.items()},
        what=what,
    )
    if problem:
        raise ParamMismatchError(f"parameters do not fit the model:\n{problem}")
    for key, (_, var) in flat.items():
        var.set_value(jnp.asarray(params[key], dtype=var.get_value().dtype))


def count_params(model: nnx.Module) -> int:
    return int(sum(np.prod(s) for s in param_shapes(model).values()))
