#!/usr/bin/env python
"""Flax MambaOut vs timm, side by side in one process: inference, train step, compile time.

  python benchmarks/bench_model.py inference --models mambaout_femto mambaout_tiny
  python benchmarks/bench_model.py train --models mambaout_femto mambaout_tiny
  python benchmarks/bench_model.py compile --models mambaout_femto mambaout_kobe mambaout_tiny mambaout_small mambaout_base
  python benchmarks/bench_model.py dw-kernel-grad
  python benchmarks/bench_model.py dw-forward

Frameworks take turns round by round (JAX, timm eager, torch.compile, JAX, ...) so that the noise
of a shared machine hits each alike; each figure is the median round. fp32, NHWC for JAX, NCHW for
timm, random weights and inputs (speed does not depend on values). Prints a JSON line per result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time


def _timed_rounds(fns: dict, rounds: int, iters: int, settle: float = 2.0) -> dict:
    """Median seconds per call of each fn, alternating between fns every round.

    ``settle`` seconds of idleness before each measurement: both runtimes keep worker threads
    spinning for a while after a call, which would otherwise steal the cores from the next one.
    """
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(settle)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            times[name].append((time.perf_counter() - start) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def cpu_kernels_off():
    """``MAMBAOUT_JAX_CPU_KERNELS=0`` for what is traced inside (the switch is read at trace time)."""
    saved = os.environ.get("MAMBAOUT_JAX_CPU_KERNELS")
    os.environ["MAMBAOUT_JAX_CPU_KERNELS"] = "0"
    try:
        yield
    finally:
        os.environ.pop("MAMBAOUT_JAX_CPU_KERNELS")
        if saved is not None:
            os.environ["MAMBAOUT_JAX_CPU_KERNELS"] = saved


@contextlib.contextmanager
def erfc_gelu():
    """The models built and traced inside use ``jax.nn.gelu``'s erfc form in float32 too, as the
    library did before ``models.layers.gelu`` took PyTorch's erf formula for float32."""
    import jax

    from mambaout_jax.models import layers, mambaout

    def erfc_form(x):
        return jax.nn.gelu(x, approximate=False)

    saved = layers.gelu, mambaout.gelu
    layers.gelu = mambaout.gelu = erfc_form
    try:
        yield
    finally:
        layers.gelu, mambaout.gelu = saved


def bench_inference(name: str, batch: int, size: int, rounds: int, iters: int, compile_torch: bool) -> dict:
    import jax
    import numpy as np
    import timm
    import torch
    import mambaout_jax

    x = np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32)
    model = mambaout_jax.create_model(name)
    forward = mambaout_jax.compile_forward(model)  # micro-batches of 8 on CPU
    whole = mambaout_jax.compile_forward(model, micro_batch=None)
    xj = jax.device_put(x)
    # The library's path without the hand-written CPU kernels (XLA's depthwise form), traced now.
    xla_only = mambaout_jax.compile_forward(model)
    with cpu_kernels_off():
        xla_only(xj).block_until_ready()
    with erfc_gelu():  # the float32 GELU as jax.nn.gelu's erfc form, before issue 14's change
        erfc = mambaout_jax.compile_forward(mambaout_jax.create_model(name))
        erfc(xj).block_until_ready()

    tm = timm.create_model(name, pretrained=False).eval()
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    fns = {
        "jax": lambda: forward(xj).block_until_ready(),
        "jax_whole_batch": lambda: whole(xj).block_until_ready(),
        "jax_xla_only": lambda: xla_only(xj).block_until_ready(),
        "jax_erfc_gelu": lambda: erfc(xj).block_until_ready(),
    }

    def eager():
        with torch.inference_mode():
            tm(xt)

    fns["timm_eager"] = eager

    def eager_micro():  # the same cache-friendly schedule, given to timm: is the gain ours alone?
        with torch.inference_mode():
            for chunk in xt.split(8):
                tm(chunk)

    fns["timm_eager_micro_batch_8"] = eager_micro
    compile_s = None
    if compile_torch:
        compiled = torch.compile(tm)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(xt)
        compile_s = time.perf_counter() - t0

        def comp():
            with torch.inference_mode():
                compiled(xt)

        fns["torch_compile"] = comp
    for fn in fns.values():
        fn()  # warm up
    sec = _timed_rounds(fns, rounds, iters)
    out = {"bench": "inference", "model": name, "batch": batch, "image_size": size}
    out.update({f"{k}_img_per_s": batch / v for k, v in sec.items()})
    out["jax_vs_timm_eager"] = sec["timm_eager"] / sec["jax"]
    out["jax_vs_timm_eager_micro_batch_8"] = sec["timm_eager_micro_batch_8"] / sec["jax"]
    out["jax_xla_only_vs_timm_eager"] = sec["timm_eager"] / sec["jax_xla_only"]
    out["jax_erfc_gelu_vs_timm_eager"] = sec["timm_eager"] / sec["jax_erfc_gelu"]
    if compile_torch:
        out["jax_vs_torch_compile"] = sec["torch_compile"] / sec["jax"]
        out["torch_compile_seconds"] = compile_s
    return out


def bench_train(name: str, batch: int, size: int, rounds: int, iters: int) -> dict:
    """One optimizer step (forward, backward, AdamW) of the project's train step vs timm eager."""
    import jax
    import numpy as np
    import timm
    import torch

    import mambaout_jax
    from mambaout_jax.train.recipe import recipe_config as get_config
    from mambaout_jax.models import get_params
    from mambaout_jax.train import mesh as mesh_lib
    from mambaout_jax.train.program import build_program

    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    params = get_params(mambaout_jax.create_model(name))
    rng = np.random.default_rng(0)
    batch_np = {
        "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, 1000, (batch,), dtype=np.int32),
    }
    gbatch = mesh_lib.global_batch(batch_np, mesh)

    def jax_stepper(micro_batch):
        c = get_config()
        c.model, c.batch_size, c.compute_dtype, c.drop_path_rate = name, batch, "float32", 0.0
        c.micro_batch = micro_batch
        for k in ("mixup_alpha", "cutmix_alpha", "erase_prob"):
            c.aug[k] = 0.0  # timm's augmentation runs in its data loader, not in the step: like with like
        program = build_program(c, mesh, steps_per_epoch=100)
        holder = {"state": program.init_state(params)}
        t0 = time.perf_counter()
        holder["state"], metrics = program.train_step(holder["state"], gbatch)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - t0

        def step():
            holder["state"], m = program.train_step(holder["state"], gbatch)
            jax.block_until_ready(m)

        return step, first

    # The library's step as train.py builds it: config.micro_batch='auto' computes the gradient
    # 8 images at a time on CPU (cache-sized activations, summed in a scan: train/steps.py).
    jax_step, first_step = jax_stepper("auto")
    jax_step_whole, _ = jax_stepper("none")  # the whole batch in one forward/backward
    # The library's step without the hand-written CPU kernels (mambaout_jax/kernels): XLA's own
    # depthwise forms, as before issue 14 added them.
    with cpu_kernels_off():
        jax_step_xla, _ = jax_stepper("auto")
    with erfc_gelu():
        jax_step_erfc, _ = jax_stepper("auto")

    tm = timm.create_model(name, pretrained=False).train()
    opt = torch.optim.AdamW(tm.parameters(), lr=4e-3, weight_decay=0.05)
    xt = torch.from_numpy(((batch_np["image"] / 255.0 - 0.45) / 0.225).astype(np.float32).transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(batch_np["label"].astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss_fn(tm(xt), yt).backward()
        opt.step()

    torch_step()
    sec = _timed_rounds(
        {"jax": jax_step, "jax_whole_batch": jax_step_whole, "jax_xla_only": jax_step_xla,
         "jax_erfc_gelu": jax_step_erfc, "timm_eager": torch_step},
        rounds,
        iters,
    )
    return {
        "bench": "train_step",
        "model": name,
        "batch": batch,
        "image_size": size,
        "jax_img_per_s": batch / sec["jax"],
        "timm_eager_img_per_s": batch / sec["timm_eager"],
        "jax_whole_batch_img_per_s": batch / sec["jax_whole_batch"],
        "jax_xla_only_img_per_s": batch / sec["jax_xla_only"],
        "jax_vs_timm_eager": sec["timm_eager"] / sec["jax"],
        "jax_whole_batch_vs_timm_eager": sec["timm_eager"] / sec["jax_whole_batch"],
        "jax_xla_only_vs_timm_eager": sec["timm_eager"] / sec["jax_xla_only"],
        "jax_erfc_gelu_img_per_s": batch / sec["jax_erfc_gelu"],
        "jax_erfc_gelu_vs_timm_eager": sec["timm_eager"] / sec["jax_erfc_gelu"],
        "jax_first_step_seconds": first_step,
    }


def bench_compile(name: str, batch: int, size: int) -> dict:
    """Seconds to lower and compile the real (recipe) train step: the wait before step 1."""
    import jax
    import numpy as np

    from mambaout_jax.train.recipe import recipe_config as get_config
    from mambaout_jax.train import mesh as mesh_lib
    from mambaout_jax.train.program import build_program

    c = get_config()
    c.model, c.batch_size = name, batch
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    t0 = time.perf_counter()
    program = build_program(c, mesh, steps_per_epoch=100)
    state = program.abstract_state()
    b = {
        "image": jax.ShapeDtypeStruct((batch, size, size, 3), np.uint8, sharding=program.batch_sharding),
        "label": jax.ShapeDtypeStruct((batch,), np.int32, sharding=program.batch_sharding),
    }
    lowered = program.train_step.lower(state, b)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"bench": "compile_train_step", "model": name, "batch": batch, "compute_dtype": c.compute_dtype,
            "trace_lower_seconds": t1 - t0, "compile_seconds": t2 - t1, "total_seconds": t2 - t0}  # fmt: skip


# (N, H, W, C) of one CPU micro-batch of 8 at each stage of femto (C = 48..288) and tiny's first stage.
DW_KERNEL_GRAD_SHAPES = ((8, 56, 56, 48), (8, 28, 28, 96), (8, 14, 14, 192), (8, 7, 7, 288), (8, 56, 56, 96))


def _check_against(reference, candidates: dict, what: str, rtol: float = 1e-5) -> None:
    """Stop the benchmark if a candidate's result differs from XLA's (max error relative to max)."""
    import numpy as np

    for name, got in candidates.items():
        err = float(np.abs(got - reference).max() / np.abs(reference).max())
        if err > rtol:
            raise SystemExit(f"{name} {what} differs from XLA's by {err:.2e} (relative to max)")


def bench_dw_kernel_grad(shape: tuple[int, int, int, int], rounds: int, iters: int) -> dict:
    """The depthwise 7x7 kernel gradient for one shape: XLA's scan (the fallback), the C++ kernel
    (mambaout_jax/kernels), and PyTorch's depthwise weight gradient, each checked against the first."""
    import jax
    import numpy as np
    import torch

    from mambaout_jax.kernels import cpu as cpu_kernels
    from mambaout_jax.models.layers import _depthwise_kernel_grad_xla, _pad_same

    if not cpu_kernels.depthwise_available():
        raise SystemExit("the C++ kernel is not available (see the warning above)")
    n, h, w, c = shape
    rng = np.random.default_rng(0)
    x, g = (rng.standard_normal((n, h, w, c), dtype=np.float32) for _ in range(2))
    xj, gj = jax.device_put(x), jax.device_put(g)
    xla = jax.jit(lambda x, g: _depthwise_kernel_grad_xla(_pad_same(x, 7), g))
    ffi = jax.jit(lambda x, g: cpu_kernels.depthwise_kernel_grad(_pad_same(x, 7), g))
    xt, gt = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x, g))

    def torch_grad():
        return torch.nn.grad.conv2d_weight(xt, (c, 1, 7, 7), gt, padding=3, groups=c)

    _check_against(
        np.asarray(xla(xj, gj)),
        {"cpp": np.asarray(ffi(xj, gj)), "torch": torch_grad().numpy().reshape(c, 49).T},
        f"kernel gradient at {shape}",
    )
    sec = _timed_rounds(
        {
            "xla_scan": lambda: xla(xj, gj).block_until_ready(),
            "cpp_kernel": lambda: ffi(xj, gj).block_until_ready(),
            "torch": torch_grad,
        },
        rounds,
        iters,
        settle=0.2,
    )
    return {"bench": "dw_kernel_grad", "shape": list(shape), **{f"{k}_ms": v * 1e3 for k, v in sec.items()},
            "cpp_vs_xla": sec["xla_scan"] / sec["cpp_kernel"], "cpp_vs_torch": sec["torch"] / sec["cpp_kernel"],
            "cpp_gflops": 2 * 49 * n * h * w * c / sec["cpp_kernel"] / 1e9}  # fmt: skip


# (N, H, W, passthrough, C): the Gated CNN block's [i | c] for one CPU micro-batch of 8 at each
# stage of femto, then tiny's first stage.
DW_FORWARD_SHAPES = ((8, 56, 56, 80, 48), (8, 28, 28, 160, 96), (8, 14, 14, 320, 192), (8, 7, 7, 480, 288),
                     (8, 56, 56, 128, 64))  # fmt: skip


def bench_dw_forward(shape: tuple[int, int, int, int, int], rounds: int, iters: int) -> dict:
    """``[i, conv(c) + bias]`` for one shape: XLA's form (pad, 49-tap loop, concatenate: the
    fallback), the C++ kernel (mambaout_jax/kernels), and what timm's GatedConvBlock runs (permute
    c to NCHW, PyTorch's depthwise convolution, permute back, concatenate), each checked against
    the first."""
    import jax
    import numpy as np
    import torch

    from mambaout_jax.kernels import cpu as cpu_kernels
    from mambaout_jax.models.layers import _shift_forward_xla

    if not cpu_kernels.depthwise_available():
        raise SystemExit("the C++ kernel is not available (see the warning above)")
    n, h, w, p, c = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w, p + c), dtype=np.float32)
    kernel = rng.standard_normal((7, 7, 1, c), dtype=np.float32) / 7
    bias = rng.standard_normal((c,), dtype=np.float32)
    xj, kj, bj = (jax.device_put(a) for a in (x, kernel, bias))
    xla = jax.jit(lambda x, k, b: _shift_forward_xla(x, k, b, p))
    ffi = jax.jit(lambda x, k, b: cpu_kernels.depthwise_forward(x, k, b, p))
    conv = torch.nn.Conv2d(c, c, 7, padding=3, groups=c).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        conv.bias.copy_(torch.from_numpy(bias))
    xt = torch.from_numpy(x)

    @torch.no_grad()
    def timm_form():
        i, cc = torch.split(xt, [p, c], dim=-1)
        return torch.cat((i, conv(cc.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)), dim=-1)

    _check_against(
        np.asarray(xla(xj, kj, bj)),
        {"cpp": np.asarray(ffi(xj, kj, bj)), "torch": timm_form().numpy()},
        f"depthwise forward at {shape}",
    )
    sec = _timed_rounds(
        {
            "xla": lambda: xla(xj, kj, bj).block_until_ready(),
            "cpp_kernel": lambda: ffi(xj, kj, bj).block_until_ready(),
            "timm_ops": timm_form,
        },
        rounds,
        iters,
        settle=0.2,
    )
    return {"bench": "dw_forward", "shape": list(shape), **{f"{k}_ms": v * 1e3 for k, v in sec.items()},
            "cpp_vs_xla": sec["xla"] / sec["cpp_kernel"], "cpp_vs_timm_ops": sec["timm_ops"] / sec["cpp_kernel"],
            "cpp_gflops": 2 * 49 * n * h * w * c / sec["cpp_kernel"] / 1e9}  # fmt: skip


def cpu_model_name() -> str:
    """``lscpu``'s "Model name" (figures from different CPU kinds are not comparable)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["inference", "train", "compile", "dw-kernel-grad", "dw-forward"])
    p.add_argument("--models", nargs="+", default=["mambaout_femto"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--no-torch-compile", action="store_true")
    args = p.parse_args()
    import jax
    import torch

    from mambaout_jax.kernels import cpu as cpu_kernels

    env = {"jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "backend": jax.default_backend(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
           "cpu_model": cpu_model_name(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "torch_mkldnn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
           "xla_cpu_onednn": "--xla_cpu_use_onednn=true" in os.environ.get("XLA_FLAGS", ""),
           "cpu_kernels": cpu_kernels.depthwise_available()}  # fmt: skip
    print(json.dumps({"environment": env}), flush=True)
    if args.what == "dw-kernel-grad":
        for shape in DW_KERNEL_GRAD_SHAPES:
            print(json.dumps(bench_dw_kernel_grad(shape, args.rounds, max(args.iters, 5))), flush=True)
        return
    if args.what == "dw-forward":
        for shape in DW_FORWARD_SHAPES:
            print(json.dumps(bench_dw_forward(shape, args.rounds, max(args.iters, 5))), flush=True)
        return
    for name in args.models:
        if args.what == "inference":
            r = bench_inference(name, args.batch, args.size, args.rounds, args.iters, not args.no_torch_compile)
        elif args.what == "train":
            r = bench_train(name, args.batch, args.size, args.rounds, args.iters)
        else:
            r = bench_compile(name, args.batch, args.size)
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
