"""How much precision a bf16 gradient all-reduce loses against a float32 one, by device count.

``python -m mambaout_jax.train.reduction_error`` (docs/NUMERICS.md has its table). Each of D
simulated devices computes the gradient of its 2 rows under bf16 compute, exactly as the train step
does (``steps.make_train_step``: bf16 dot outputs, cast back to float32 by the parameter cast's
cotangent). The D partial gradients are then summed two ways: in float32 (what the train step's
``psum`` does) and in bf16 with a rounding after every addition (a ring all-reduce's reduce-scatter
phase in bf16, what XLA's partitioner emits for bf16 dots, jax-ml/jax#27496). Reported, as relative
L2 errors over all parameters: bf16 compute (float32 reduction) against the float32-compute
gradient, and the bf16 reduction against the float32 reduction of the very same partials, i.e. the
error the reduction alone adds.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mambaout_jax.models.factory import build_model
from mambaout_jax.models.params import get_params
from mambaout_jax.train.steps import ModelFn


def partial_gradients(model_name: str, device_counts, rows: int, dtype, seed: int = 0):
    """Per device count: (stacked per-device float32 gradients of the mean loss, the float32
    one-device gradient). One compiled per-device gradient serves every device and count."""
    model = build_model(model_name, num_classes=10, seed=seed, dtype=dtype)
    params = get_params(model)
    fn = ModelFn(model, train=False)
    ref_fn = ModelFn(build_model(model_name, num_classes=10, seed=seed), train=False)

    def loss(f, p, x, y, n):
        return jnp.sum(optax.softmax_cross_entropy(f(p, x.astype(dtype)), y)) / n

    grad = jax.jit(jax.grad(lambda p, x, y, n: loss(fn, p, x, y, n)))
    ref_grad = jax.jit(jax.grad(lambda p, x, y, n: loss(ref_fn, p, x, y, n)))
    rng = np.random.default_rng(seed)
    for devices in device_counts:
        n = devices * rows
        x = jnp.asarray(rng.normal(size=(n, 32, 32, 3)), jnp.float32)
        y = jax.nn.one_hot(rng.integers(0, 10, n), 10)
        per_device = [grad(params, x[d * rows : (d + 1) * rows], y[d * rows : (d + 1) * rows], n) for d in range(devices)]
        parts = jax.tree.map(lambda *g: jnp.stack(g), *per_device)
        ref = jax.tree.map(lambda *g: sum(g), *[
            ref_grad(params, x[d * rows : (d + 1) * rows], y[d * rows : (d + 1) * rows], n) for d in range(devices)
        ])  # fmt: skip
        yield devices, parts, ref


def reduce_bf16(parts: jax.Array) -> jax.Array:
    def add(acc, p):
        return (acc + p.astype(jnp.bfloat16)).astype(jnp.bfloat16), None

    return jax.lax.scan(add, parts[0].astype(jnp.bfloat16), parts[1:])[0].astype(jnp.float32)


def relative_error(a: dict, ref: dict) -> float:
    num = sum(float(jnp.sum((a[k] - ref[k]) ** 2)) for k in ref)
    return (num / sum(float(jnp.sum(ref[k] ** 2)) for k in ref)) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="test_mambaout")
    ap.add_argument("--devices", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--rows", type=int, default=2, help="rows per device")
    args = ap.parse_args()
    print("| devices | bf16 compute, float32 reduction, vs float32 compute | bf16 reduction vs float32 reduction |")
    print("|---:|---:|---:|")
    for d, parts, ref in partial_gradients(args.model, args.devices, args.rows, jnp.bfloat16):
        f32 = {k: jnp.sum(v, 0) for k, v in parts.items()}
        bf16 = {k: reduce_bf16(v) for k, v in parts.items()}
        print(f"| {d} | {relative_error(f32, ref):.2e} | {relative_error(bf16, f32):.2e} |", flush=True)


if __name__ == "__main__":
    main()
