#!/usr/bin/env python
"""Flax MambaOut vs timm on one GPU: bf16 inference and train-step images/s, then the CUDA parity tests.

  python benchmarks/bench_gpu.py                       # femto and tiny, batch 128 at 224 px
  python benchmarks/bench_gpu.py --out /tmp/gpu        # writes gpu.json and gpu.md there
  python benchmarks/bench_gpu.py --smoke               # test_mambaout, 2 x 32 px, any device

For each model, every JAX form -- depthwise ``grouped`` (XLA's grouped convolution) and ``shift``
(49 shifted multiply-adds with a hand-written VJP), times dense ``xla`` and ``im2col`` (stem and
downsample convolutions) -- against timm with AMP (``torch.autocast(bfloat16)``) on channels_last
tensors, eager and ``torch.compile``. Compute is bf16 on both sides, parameters float32. The train
step is one forward, softmax cross-entropy, backward and AdamW update, the same on both sides
(no augmentation, no drop path): JAX's under one ``jax.jit`` with the parameters and optimizer
state donated, timm's as its usual eager loop. Each figure is the median of ``--rounds`` rounds
of ``--iters`` calls, the contenders taking turns every round.

Then it runs the CUDA-reference parity tests (``tests/test_model_parity.py``: timm on CUDA against
JAX on the GPU, fp32, when both see one; ``conftest.reference_device``) and records their outcome.

Writes ``<out>/gpu.json`` (environment, every figure, the fastest JAX form per model and step, the
parity result) and ``<out>/gpu.md`` (the table for ``benchmarks/RESULTS.md``). The full run is
sized for under 5 minutes on one current GPU (about 8 JAX compiles per model, ~20 s each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DW_IMPLS = ("grouped", "shift")
CONV_IMPLS = ("xla", "im2col")


def _timed_rounds(fns: dict, rounds: int, iters: int, sync: dict) -> dict:
    """Median seconds per call of each fn, the fns taking turns every round."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync[name]()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync[name]()
            times[name].append((time.perf_counter() - start) / iters)
    return {k: statistics.median(v) for k, v in times.items()}


def _jax_contenders(
    name: str, batch: int, size: int, steps: tuple[str, ...], dw_impls=DW_IMPLS, conv_impls=CONV_IMPLS
) -> tuple[dict, dict, dict]:
    """{(step, dw, conv): fn} for the JAX model in every form, with their sync and compile seconds."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import mambaout_jax

    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((batch, size, size, 3), dtype=np.float32).astype(jnp.bfloat16))
    labels = jax.device_put(rng.integers(0, 1000, (batch,), dtype=np.int32))
    tx = optax.adamw(4e-3, weight_decay=0.05)
    fns, syncs, compile_s = {}, {}, {}
    holders = {}
    for dw in dw_impls:
        for conv in conv_impls:
            model = mambaout_jax.create_model(name, dtype=jnp.bfloat16, dw_conv_impl=dw, conv_impl=conv)
            graphdef, params = nnx.split(model)
            if "inference" in steps:

                @jax.jit
                def forward(params, images, graphdef=graphdef):
                    return nnx.merge(graphdef, params)(images)

                key = ("inference", dw, conv)
                t0 = time.perf_counter()
                forward(params, x).block_until_ready()
                compile_s[key] = time.perf_counter() - t0
                fns[key] = lambda forward=forward, params=params: forward(params, x)
            if "train" in steps:

                def loss_fn(params, images, labels, graphdef=graphdef):
                    logits = nnx.merge(graphdef, params)(images)
                    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

                def update(params, opt_state, images, labels, loss_fn=loss_fn):
                    loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
                    updates, opt_state = tx.update(grads, opt_state, params)
                    return optax.apply_updates(params, updates), opt_state, loss

                train_step = jax.jit(update, donate_argnums=(0, 1))
                key = ("train", dw, conv)
                holder = holders[key] = {"params": jax.tree.map(jnp.copy, params)}
                holder["opt_state"] = tx.init(holder["params"])
                t0 = time.perf_counter()
                holder["params"], holder["opt_state"], loss = train_step(holder["params"], holder["opt_state"], x, labels)
                loss.block_until_ready()
                compile_s[key] = time.perf_counter() - t0

                def step(train_step=train_step, holder=holder):
                    holder["params"], holder["opt_state"], holder["loss"] = train_step(
                        holder["params"], holder["opt_state"], x, labels
                    )

                fns[key] = step
                syncs[key] = lambda holder=holder: jax.block_until_ready(holder.get("loss"))
    for key in fns:
        if key not in syncs:
            out = {}
            fns[key] = (lambda f, out: lambda: out.__setitem__("y", f()))(fns[key], out)
            syncs[key] = lambda out=out: jax.block_until_ready(out.get("y"))
    return fns, syncs, compile_s


def _timm_contenders(name: str, batch: int, size: int, steps: tuple[str, ...], compile_torch: bool):
    import numpy as np
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 3, size, size), dtype=np.float32)).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(rng.integers(0, 1000, (batch,)).astype(np.int64)).to(device)
    fns, syncs, compile_s = {}, {}, {}
    modes = [("timm_eager", False)] + ([("torch_compile", True)] if compile_torch else [])
    for label, compiled in modes:
        tm = timm.create_model(name, pretrained=False).to(device).to(memory_format=torch.channels_last)
        net = torch.compile(tm) if compiled else tm
        if "inference" in steps:

            def infer(net=net, tm=tm):
                tm.eval()
                with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
                    net(x)

            t0 = time.perf_counter()
            infer()
            sync()
            compile_s[("inference", label)] = time.perf_counter() - t0
            fns[("inference", label)], syncs[("inference", label)] = infer, sync
        if "train" in steps:
            opt = torch.optim.AdamW(tm.parameters(), lr=4e-3, weight_decay=0.05)
            loss_fn = torch.nn.CrossEntropyLoss()

            def train(net=net, tm=tm, opt=opt):
                tm.train()
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = loss_fn(net(x), y)
                loss.backward()
                opt.step()

            t0 = time.perf_counter()
            train()
            sync()
            compile_s[("train", label)] = time.perf_counter() - t0
            fns[("train", label)], syncs[("train", label)] = train, sync
    return fns, syncs, compile_s, device


def bench_model(
    name: str, batch: int, size: int, rounds: int, iters: int, compile_torch: bool, dw_impls=DW_IMPLS, conv_impls=CONV_IMPLS
) -> list[dict]:
    rows = []
    for step in ("inference", "train"):
        jfns, jsync, jcompile = _jax_contenders(name, batch, size, (step,), dw_impls, conv_impls)
        tfns, tsync, tcompile, _ = _timm_contenders(name, batch, size, (step,), compile_torch)
        fns = {**{f"jax {k[1]} {k[2]}": v for k, v in jfns.items()}, **{k[1]: v for k, v in tfns.items()}}
        syncs = {**{f"jax {k[1]} {k[2]}": v for k, v in jsync.items()}, **{k[1]: v for k, v in tsync.items()}}
        compile_s = {**{f"jax {k[1]} {k[2]}": v for k, v in jcompile.items()}, **{k[1]: v for k, v in tcompile.items()}}
        for fn in fns.values():
            fn()  # warm
        sec = _timed_rounds(fns, rounds, iters, syncs)
        eager = sec["timm_eager"]
        for contender, s in sec.items():
            framework, dw, conv = (contender.split() + ["", ""])[:3] if contender.startswith("jax") else (contender, "", "")
            rows.append({
                "model": name, "step": step, "contender": contender, "framework": framework,
                "dw_conv_impl": dw or None, "conv_impl": conv or None, "batch": batch, "image_size": size,
                "img_per_s": batch / s, "vs_timm_eager": eager / s, "first_call_seconds": compile_s[contender],
            })  # fmt: skip
        del jfns, tfns, fns
    return rows


def fastest_forms(rows: list[dict]) -> dict:
    """Per model and step: the JAX (dw_conv_impl, conv_impl) with the most images/s."""
    best: dict = {}
    for r in rows:
        if r["framework"] != "jax":
            continue
        k = f"{r['model']} {r['step']}"
        if k not in best or r["img_per_s"] > best[k]["img_per_s"]:
            best[k] = {"dw_conv_impl": r["dw_conv_impl"], "conv_impl": r["conv_impl"], "img_per_s": r["img_per_s"]}
    return best


def run_parity(pytest_args: list[str]) -> dict:
    """tests/test_model_parity.py in a subprocess (its reference device is CUDA when both see a GPU)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_model_parity.py", *pytest_args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    header = next((line for line in lines if line.startswith("PyTorch reference device:")), "")
    return {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        "passed": proc.returncode == 0,
        "reference_device": header.split(":", 1)[1].strip() if header else None,
        "summary": lines[-1] if lines else proc.stderr.strip()[-500:],
        "seconds": time.perf_counter() - t0,
    }


def environment() -> dict:
    import jax
    import torch

    devices = jax.devices()
    return {
        "jax": jax.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "jax_backend": jax.default_backend(), "jax_device": devices[0].device_kind,
        "torch_cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }  # fmt: skip


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        f"JAX {env['jax']} on {env['jax_device']} ({env['jax_backend']}), torch {env['torch']} on "
        f"{env['torch_cuda'] or 'CPU'}; bf16 compute, batch {result['batch']} at {result['image_size']} px; "
        f"images/s (x timm eager AMP channels_last); `{result['command']}`",
        "",
        "| model | step | contender | depthwise | dense conv | img/s | x timm eager | first call s |",
        "|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['step']} | {r['framework']} | {r['dw_conv_impl'] or ''} | {r['conv_impl'] or ''} "
            f"| {r['img_per_s']:.1f} | {r['vs_timm_eager']:.2f} | {r['first_call_seconds']:.1f} |"
        )
    lines += ["", "Fastest JAX form: " + "; ".join(
        f"{k}: {v['dw_conv_impl']} + {v['conv_impl']}" for k, v in result["fastest"].items()
    )]  # fmt: skip
    p = result.get("parity")
    if p:
        lines += ["", f"Parity (`{p['command']}`, reference {p['reference_device']}): {p['summary']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mambaout_femto", "mambaout_tiny"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/gpu"), help="folder for gpu.json and gpu.md")
    p.add_argument("--dw-conv-impls", nargs="+", choices=DW_IMPLS, default=list(DW_IMPLS))
    p.add_argument("--conv-impls", nargs="+", choices=CONV_IMPLS, default=list(CONV_IMPLS))
    p.add_argument("--no-torch-compile", action="store_true")
    p.add_argument("--no-parity", action="store_true", help="skip the CUDA-reference parity tests")
    p.add_argument("--smoke", action="store_true", help="test_mambaout, batch 2 at 32 px, 1 round: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.size, args.rounds, args.iters = ["test_mambaout"], 2, 32, 1, 1
    for field in ("batch", "size", "rounds", "iters"):
        if getattr(args, field) < 1:
            p.error(f"--{field} must be at least 1, got {getattr(args, field)}")
    try:
        import jax  # noqa: F401
        import torch  # noqa: F401

        import mambaout_jax

        unknown = [m for m in args.models if m not in mambaout_jax.list_models()]
    except ImportError as e:
        print(f"error: {e} (bench_gpu needs jax, torch and timm)", file=sys.stderr)
        return 2
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(mambaout_jax.list_models())}",
              file=sys.stderr)  # fmt: skip
        return 2
    t0 = time.perf_counter()
    result = {
        "command": "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(),
        "batch": args.batch,
        "image_size": args.size,
        "rows": [],
    }
    for name in args.models:
        rows = bench_model(
            name, args.batch, args.size, args.rounds, args.iters, not args.no_torch_compile,
            tuple(args.dw_conv_impls), tuple(args.conv_impls),
        )  # fmt: skip
        for r in rows:
            print(json.dumps(r), flush=True)
        result["rows"] += rows
    result["fastest"] = fastest_forms(result["rows"])
    if not args.no_parity:
        result["parity"] = run_parity(["-k", "odd_input"] if args.smoke else [])
    result["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result.get("parity", {"passed": True})["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
