"""A compiled forward pass for inference, with cache-sized micro-batches on CPU.

On a CPU, MambaOut's layers are memory-bound: each op streams its whole-batch activations through
DRAM (stage 0 of femto at batch 32 writes ~100 MB per fc1). Running the batch through the network a
few images at a time (``lax.map`` over micro-batches, inside one compiled program) keeps each op's
working set in the caches, and is ~1.6x faster for femto at batch 32 (benchmarks/RESULTS.md). The
numbers are the same: images are independent. Accelerators want the whole batch at once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

CPU_MICRO_BATCH = 8


def resolve_micro_batch(micro_batch: int | str | None, backend: str | None = None) -> int | None:
    if micro_batch == "auto":
        return CPU_MICRO_BATCH if (backend or jax.default_backend()) == "cpu" else None
    if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch <= 0):
        raise ValueError(f"micro_batch must be a positive int, 'auto' or None, got {micro_batch!r}")
    return micro_batch


def in_micro_batches(fn: Callable[[jax.Array], jax.Array], x: jax.Array, micro_batch: int | None) -> jax.Array:
    """``fn(x)`` computed ``micro_batch`` images at a time (padding the last chunk); traceable."""
    n = x.shape[0]
    if micro_batch is None or n <= micro_batch:
        return fn(x)
    chunks = -(-n // micro_batch)
    pad = chunks * micro_batch - n
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
    out = jax.lax.map(fn, x.reshape((chunks, micro_batch) + x.shape[1:]))
    return out.reshape((chunks * micro_batch,) + out.shape[2:])[:n]


def compile_forward(model: nnx.Module, *, micro_batch: int | str | None = "auto") -> Callable[[jax.Array], jax.Array]:
    """``forward(images) -> logits``: the model's current parameters under one ``jax.jit``.

    ``micro_batch``: images per chunk ('auto': 8 on CPU, whole batch elsewhere; None: whole batch).
    The model is snapshotted: later changes to it need a new ``compile_forward``.
    """
    mb = resolve_micro_batch(micro_batch)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        m = nnx.merge(graphdef, state)
        return in_micro_batches(lambda x: m(x), images, mb)

    return lambda images: forward(state, images)
