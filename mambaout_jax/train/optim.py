"""AdamW with the authors' recipe and timm's per-epoch warmup + cosine + cooldown schedule."""

from __future__ import annotations

import math
from typing import Mapping

import jax.numpy as jnp
import numpy as np
import optax


def timm_cosine_lr(epoch: float, *, base_lr: float, epochs: int, warmup_epochs: int, warmup_lr: float, min_lr: float) -> float:
    """timm's ``CosineLRScheduler`` (t_in_epochs, warmup_prefix=False, one cycle) at an integer epoch.

    Warmup is linear from ``warmup_lr`` over ``warmup_epochs``; afterwards the cosine runs over
    ``epochs`` counted *from epoch 0* (the warmup is part of it, so epoch 20 is not the peak), and
    from ``epochs`` on (the cooldown epochs) the rate stays at ``min_lr``.
    """
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (base_lr - warmup_lr) / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def lr_schedule(
    *,
    base_lr: float,
    epochs: int,
    warmup_epochs: int,
    warmup_lr: float,
    min_lr: float,
    cooldown_epochs: int,
    steps_per_epoch: int,
) -> optax.Schedule:
    """Optimizer step -> learning rate, constant within an epoch as in timm's per-epoch stepping.

    The table holds one rate per epoch (``epochs + cooldown_epochs`` of them); steps past the end
    keep the last.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    table = np.asarray(
        [
            timm_cosine_lr(e, base_lr=base_lr, epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, min_lr=min_lr)
            for e in range(epochs + cooldown_epochs)
        ],
        np.float32,
    )
    table_j = jnp.asarray(table)

    def schedule(step):
        epoch = jnp.minimum(step // steps_per_epoch, len(table) - 1)
        return table_j[epoch]

    return schedule


def decay_mask(params_or_shapes: Mapping[str, object]) -> dict[str, bool]:
    """Weight decay on matrices and conv kernels only: timm's ``param_groups_weight_decay`` skips
    every parameter with ndim <= 1 (LayerNorm scales and biases, all biases, layer scale).

    Takes arrays (anything with ``.shape``) or plain shape tuples.
    """
    return {path: len(getattr(p, "shape", p)) > 1 for path, p in params_or_shapes.items()}


def make_optimizer(
    schedule: optax.Schedule,
    params_shapes: Mapping[str, object],
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.05,
    grad_clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """AdamW as ``torch.optim.AdamW``: decoupled decay ``p -= lr * wd * p`` on the masked params."""
    chain = []
    if grad_clip_norm:
        chain.append(optax.clip_by_global_norm(grad_clip_norm))
    chain.append(
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask(params_shapes))
    )
    return optax.chain(*chain)
