"""The pure functions that run on devices: train step and eval step.

They take and return plain pytrees (the flat parameter-contract dict, optax state) so that ``jax.jit``
with shardings, donation, orbax and the TPU planner all see the same thing. The NNX module is only
a graphdef here: ``nnx.merge`` happens at trace time, never per step in Python.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from mambaout_jax.data.batch_transforms import BatchAugmentation, augment_train_batch, normalize
from mambaout_jax.models.mambaout import MambaOut
from mambaout_jax.models.params import path_str
from mambaout_jax.train.mesh import DATA_AXIS

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


def chunks_per_device(rows_per_device: int, micro_batch: int | None) -> int:
    """How many chunks to cut each device's rows into so that none holds more than ``micro_batch``
    (the fewest that divide the rows evenly); 1 for ``micro_batch=None``."""
    if micro_batch is None or rows_per_device <= micro_batch:
        return 1
    return next(c for c in range(-(-rows_per_device // micro_batch), rows_per_device + 1) if rows_per_device % c == 0)


def _sharded_dim(spec: P) -> int | None:
    """The dimension a parameter's PartitionSpec splits over ``data`` (None: replicated)."""
    dims = [d for d, axis in enumerate(spec) if axis is not None]
    if len(dims) > 1:
        raise ValueError(f"a parameter is split over one dimension at most, got {spec}")
    return dims[0] if dims else None


def rng_streams(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(init_key, train_key)``: the seed split once into the parameter init's stream and the train
    steps' stream (augmentation, drop path), so the two never draw the same keys."""
    init_key, train_key = jax.random.split(jax.random.key(seed))
    return init_key, train_key


def make_train_step(
    model_fn: ModelFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    mesh: Mesh,
    param_specs: Mapping[str, P],
    augmentation: BatchAugmentation,
    num_classes: int,
    mean,
    std,
    seed: int,
    grad_accum_steps: int = 1,
    micro_batch: int | None = None,
    compute_dtype=jnp.float32,
    ema_decay: float | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)`` for a batch of uint8 images and int labels.

    1. The whole batch is augmented at once, as XLA lays it out (``augment_train_batch``: groups
       of ``augmentation.mix_group_size`` strided rows, which XLA moves between devices when a
       group spans several). Every row's draws depend only on the seed, the step and its row.
    2. Under ``shard_map``, each device computes the float32 gradient of its own rows, in
       ``grad_accum_steps`` x ``chunks`` strided pieces (``micro_batch`` rows each at most; on CPU
       that keeps every layer's activations in cache, ``build_program`` sets 8 there), summed
       locally in a ``lax.scan``. FSDP-sharded parameters are all-gathered (float32) first.
    3. One float32 reduction per optimizer step: ``psum`` of replicated parameters' gradients
       (all-reduce), ``psum_scatter`` of sharded ones (reduce-scatter). Under bf16/fp16 compute the
       gradient of each parameter's cast back to float32 happens on the device, before any
       collective, as PyTorch AMP + DDP reduces its float32 ``.grad`` buckets; XLA's own
       partitioning would all-reduce the bf16 dot outputs instead (jax-ml/jax#27496).

    The loss is the mean over the whole batch (each piece sums its rows and divides by the batch
    size), so accumulation and chunking change only the order of float32 additions.

    Randomness: ``rng_streams(seed)``'s train key, folded with the step, split into augmentation
    and model keys; drop path draws from one key per example, folded from its row in the global
    batch, so neither accumulation nor chunking nor the device count changes which paths are
    dropped. A resumed run draws exactly what an uninterrupted run would. A non-finite loss or
    gradient leaves the state as it was and is reported in ``metrics['finite']`` for the host.
    """
    _, train_key = rng_streams(seed)
    k = grad_accum_steps
    devices = mesh.shape[DATA_AXIS]
    dims = {name: _sharded_dim(spec) for name, spec in param_specs.items()}

    def loss_fn(params, images, targets, keys, batch_size):
        logits = model_fn(params, images, keys)
        with jax.named_scope("loss"):  # logits and targets float32; the mean over the whole batch
            return jnp.sum(optax.softmax_cross_entropy(logits, targets)) / batch_size

    grad_fn = jax.value_and_grad(loss_fn)

    def local_grads(params, x, targets, keys, batch_size):
        """This device's rows: loss sum / batch_size and its float32 gradient, then reduced once."""
        with jax.named_scope("gather_params"):
            params = {
                name: p if dims[name] is None else jax.lax.all_gather(p, DATA_AXIS, axis=dims[name], tiled=True)
                for name, p in params.items()
            }
        pieces = k * chunks_per_device(x.shape[0] // k, micro_batch)
        if pieces == 1:
            loss, grads = grad_fn(params, x, targets, keys, batch_size)
        else:
            split = [_microbatches(a, pieces) for a in (x, targets, keys)]

            def one(carry, c):
                loss, grads = grad_fn(params, *(a[:, c] for a in split), batch_size)
                return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
            loss, grads = jax.lax.scan(one, zeros, jnp.arange(pieces))[0]
        with jax.named_scope("reduce_grads"):
            grads = {
                name: jax.lax.psum(g.astype(jnp.float32), DATA_AXIS) if dims[name] is None
                else jax.lax.psum_scatter(g.astype(jnp.float32), DATA_AXIS, scatter_dimension=dims[name], tiled=True)
                for name, g in grads.items()
            }  # fmt: skip
            return jax.lax.psum(loss, DATA_AXIS), grads

    def sharded_grads(params, x, targets, keys):
        rows = P(DATA_AXIS)
        return jax.shard_map(
            functools.partial(local_grads, batch_size=x.shape[0]), mesh=mesh,
            in_specs=(dict(param_specs), rows, rows, rows), out_specs=(P(), dict(param_specs)), check_vma=False,
        )(params, x, targets, keys)  # fmt: skip

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
        aug_key, model_key = jax.random.split(jax.random.fold_in(train_key, state.step))
        n = batch["image"].shape[0]
        if n % (devices * k):
            raise ValueError(f"a batch of {n} does not split over {devices} devices x {k} accumulation steps")
        with jax.named_scope("augment"):
            x, targets = augment_train_batch(
                aug_key, batch["image"], batch["label"], augmentation,
                num_classes=num_classes, mean=mean, std=std, dtype=compute_dtype,
            )  # fmt: skip
            sample_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(model_key, jnp.arange(n))
        loss, grads = sharded_grads(state.params, x, targets, sample_keys)
        with jax.named_scope("optimizer"):
            return update(state, grads, loss)

    def update(state: TrainState, grads, loss) -> tuple[TrainState, dict]:
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_decay is not None:
            ema = ema_update(ema, params, ema_decay)
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


def ema_update(ema: Params, params: Params, decay: float) -> Params:
    """timm 0.6.11 ``ModelEmaV2.update``: ``ema = decay * ema + (1 - decay) * params``, once per
    optimizer step, on the weights after the step (the authors' train.py calls it after
    ``optimizer.step()``). Float32, as the model's float32 master weights."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


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
