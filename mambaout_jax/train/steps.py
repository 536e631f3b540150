"""The pure functions that run on devices: train step and eval step.

They take and return plain pytrees (the flat parameter-contract dict, optax state) so that ``jax.jit``
with shardings, donation, orbax and the TPU planner all see the same thing. The NNX module is only
a graphdef here: ``nnx.merge`` happens at trace time, never per step in Python.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mambaout_jax.data.batch_transforms import BatchAugmentation, augment_train_batch, normalize
from mambaout_jax.models.mambaout import MambaOut
from mambaout_jax.models.params import path_str

Params = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken (int32 scalar)
    params: Params
    opt_state: optax.OptState
    ema_params: Params | None = None


class ModelFn:
    """Applies a MambaOut graph to contract params: ``fn(params, images, key) -> logits``."""

    def __init__(self, model: MambaOut, *, train: bool):
        model.train() if train else model.eval()
        self.graphdef, state = nnx.split(model)
        self.paths = {path_str(path): path for path, _ in nnx.to_flat_state(state)}
        model.eval()

    def __call__(self, params: Params, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        state = nnx.from_flat_state({self.paths[k]: v for k, v in params.items()})
        return nnx.merge(self.graphdef, state)(images, key)


def _microbatches(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (B/k, k, ...): micro-batch j is rows j, j+k, j+2k, ... of the batch.

    Strided (not contiguous) micro-batches keep every device's rows in every micro-batch, so a
    batch sharded over ``data`` stays sharded the same way without any data movement.
    """
    return x.reshape((x.shape[0] // k, k) + x.shape[1:])


def make_train_step(
    model_fn: ModelFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    augmentation: BatchAugmentation,
    num_classes: int,
    mean,
    std,
    mix_groups: int = 1,
    seed: int,
    grad_accum_steps: int = 1,
    compute_dtype=jnp.float32,
    ema_decay: float | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)`` for a batch of uint8 images and int labels.

    Randomness (augmentation, drop path) is ``fold_in(key(seed), step)``: a resumed run draws
    exactly what an uninterrupted run would. A non-finite loss or gradient leaves the state as it
    was and is reported in ``metrics['finite']`` for the host to stop on.
    """
    base_key = jax.random.key(seed)
    k = grad_accum_steps

    def loss_fn(params, images, targets, key):
        logits = model_fn(params, images, key)
        return jnp.mean(optax.softmax_cross_entropy(logits, targets))  # logits and targets float32

    grad_fn = jax.value_and_grad(loss_fn)

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        step_key = jax.random.fold_in(base_key, state.step)
        images = _microbatches(batch["image"], k)
        labels = _microbatches(batch["label"], k)

        def accumulate(carry, j):
            grads_sum, loss_sum = carry
            k_aug, k_model = jax.random.split(jax.random.fold_in(step_key, j))
            x, targets = augment_train_batch(
                k_aug, images[:, j], labels[:, j], augmentation,
                num_classes=num_classes, mean=mean, std=std, dtype=compute_dtype, num_groups=mix_groups,
            )  # fmt: skip
            loss, grads = grad_fn(state.params, x, targets, k_model)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        if k == 1:
            (grads, loss), _ = accumulate((zeros, jnp.zeros((), jnp.float32)), 0)
        else:
            (grads, loss), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), jnp.arange(k))
            grads = jax.tree.map(lambda g: g / k, grads)
            loss = loss / k
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_decay is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        # Keep the last good state on a non-finite step; the host stops the run when it sees it.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(state.params),
            "lr": schedule(state.step),
            "finite": finite,
        }
        return new, metrics

    return step


def make_eval_step(
    model_fn: ModelFn,
    *,
    num_classes: int,
    mean,
    std,
    compute_dtype=jnp.float32,
) -> Callable[[Params, Mapping[str, jax.Array]], dict]:
    """``eval_step(params, batch) -> sums`` over the real (``mask``) examples of a padded batch."""
    topk = min(5, num_classes)

    def eval_step(params: Params, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
        x = normalize(batch["image"], mean, std, dtype=compute_dtype)
        logits = model_fn(params, x).astype(jnp.float32)
        labels = batch["label"]
        mask = batch["mask"].astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        _, top_idx = jax.lax.top_k(logits, topk)
        top5 = jnp.any(top_idx == labels[:, None], axis=-1).astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(loss * mask),
            "top1_sum": jnp.sum(top1 * mask),
            "top5_sum": jnp.sum(top5 * mask),
            "count": jnp.sum(mask),
        }

    return eval_step
