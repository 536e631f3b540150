"""Parity report: this project's JAX model against timm's PyTorch model, end to end, on real photos.

  python -m mambaout_jax.parity --pretrained mambaout_tiny.in1k                 # published weights, skimage photos
  python -m mambaout_jax.parity --weights mambaout_tiny.pth --images photos/    # your checkpoint, your images
  python -m mambaout_jax.parity --weights tiny.safetensors --reference mambaout_tiny.pth   # a converted file vs its source
  python -m mambaout_jax.parity --random-weights mambaout_femto --json femto.json           # every parameter random
  python -m mambaout_jax.parity --pretrained mambaout_tiny.in1k --dtype bfloat16

Each side preprocesses the photos itself: timm's eval transform for the weights' pretrained config
(``timm.data.create_transform(**resolve_data_config(model=...))``) on the PyTorch side, this
project's (``data.resolve_eval_preprocessing``) on the JAX side. The PyTorch side loads the
checkpoint through timm's own key mapping (``checkpoint_filter_fn``, ``load_state_dict(strict=True)``),
the JAX side through this project's converter, so the report checks the conversion too. Reported:
pixel equality of the preprocessed inputs; logits max abs / relative error; top-1 and top-5
agreement; per-stage feature errors; the input gradient and every parameter gradient of the
cross-entropy against the reference's top-1 classes; the parameters after one AdamW step
(``train.optim.make_optimizer`` vs ``torch.optim.AdamW`` with timm's weight-decay groups). The
PyTorch side is float32 (the reference) on CUDA when PyTorch and JAX both see a GPU, else on CPU;
``--dtype`` is the JAX side's compute dtype. A table on stdout, ``--json PATH`` for the numbers;
exit 0 when every check is within the tolerances of ``TOLERANCES`` (docs/PARITY.md says why those),
1 when one is not, 2 for bad input or a missing dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

try:  # the PyTorch side; the report stops with an install hint without it (main)
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config
    from timm.models.mambaout import checkpoint_filter_fn
    from timm.optim import param_groups_weight_decay

    _TORCH_MISSING = None
except ImportError as e:  # pragma: no cover - exercised by the install-hint check in tests/test_parity.py
    _TORCH_MISSING = e

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mambaout_jax.convert.cli import add_weight_set_flags
from mambaout_jax.convert.convert import convert_state_dict
from mambaout_jax.convert.mapping import flax_to_torch
from mambaout_jax.convert.torch_io import CheckpointError, read_weights
from mambaout_jax.convert.verify import randomize_, reference_device
from mambaout_jax.convert.weights import LoadedWeights, load_pretrained, load_weights
from mambaout_jax.data.preprocessing import resolve_eval_preprocessing
from mambaout_jax.data.sources import IMAGE_EXTENSIONS
from mambaout_jax.data.transforms import ImageDecodeError
from mambaout_jax.models.factory import model_from_params
from mambaout_jax.models.registry import get_model_spec
from mambaout_jax.train.optim import make_optimizer
from mambaout_jax.train.steps import ModelFn

DEFAULT_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "motorcycle_left.png")
ADAMW = dict(lr=4e-3, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8)  # the authors' recipe

# Per check and compute dtype: the largest error accepted. Relative errors are max |diff| / max |reference|
# over the tensor (the worst tensor for parameter gradients). docs/PARITY.md gives the reasons.
TOLERANCES = {
    "float32": {"pixels_differing": 0, "logits_rel": 2e-5, "features_rel": 2e-5, "input_grad_rel": 1e-4,
                "param_grad_rel": 1e-4, "adamw_clear_over_bound": 1.0, "adamw_outside_fraction": 1e-3,
                "adamw_max_over_lr": 2.001},
    "bfloat16": {"pixels_differing": 0, "logits_rel": 1e-1, "features_rel": 1e-1, "input_grad_rel": 2.5e-1,
                 "param_grad_rel": 5e-1, "adamw_clear_over_bound": None, "adamw_outside_fraction": None,
                 "adamw_max_over_lr": 2.001},
}  # fmt: skip


class ParityError(ValueError):
    """Bad input to the report (no images, unreadable weights); exit status 2."""


def rel_err(reference: np.ndarray, candidate: np.ndarray) -> float:
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    scale = float(np.abs(reference).max()) or 1.0
    return float(np.abs(reference - candidate).max() / scale)


def find_images(folder: str | None) -> list[str]:
    if folder is None:
        try:
            import skimage.data
        except ImportError:
            raise ParityError("no --images given and scikit-image (the default photos) is not installed: "
                              "pip install scikit-image, or pass --images DIR") from None  # fmt: skip
        root = Path(skimage.data.__file__).parent
        return [str(root / n) for n in DEFAULT_PHOTOS if (root / n).exists()]
    if not os.path.isdir(folder):
        raise ParityError(f"--images {folder}: not a folder")
    paths = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise ParityError(f"--images {folder}: holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


@dataclasses.dataclass
class Sides:
    """The two models and what each side was given."""

    name: str  # variant or tag (its eval settings)
    loaded: LoadedWeights  # the JAX side's weights
    reference_sd: dict  # the PyTorch side's timm-layout state_dict (torch tensors)
    reference_source: str


def _reference_state_dict(path: str, ema: bool | None) -> dict:
    """A PyTorch checkpoint as timm itself maps it: ``checkpoint_filter_fn`` (authors' -> timm keys)."""
    kind, tensors, _ = read_weights(path, ema=ema)  # safe reading only (weights_only + argparse.Namespace)
    if kind == "flax":  # this project's file: its only PyTorch form is the mapping back
        tensors = flax_to_torch(tensors)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in checkpoint_filter_fn(dict(tensors), None).items()}


def build_sides(args) -> Sides:
    if args.random_weights:
        name = args.random_weights
        spec = get_model_spec(name)
        tm = timm.create_model(spec.name, pretrained=False)
        randomize_(tm, args.seed)
        sd = {k: v.detach().clone() for k, v in tm.state_dict().items()}
        model, classes, params = convert_state_dict({k: v.numpy() for k, v in sd.items()}, model=spec.name)
        return Sides(name, LoadedWeights(model, classes, params, f"random ({args.seed})"), sd, f"random ({args.seed})")
    if args.pretrained:
        loaded = load_pretrained(args.pretrained, source=args.pretrained_source, ema=args.ema)
        name = loaded.tag
    else:
        loaded = load_weights(args.weights, model=args.model, ema=args.ema)
        name = args.model or loaded.model
    reference = args.reference or loaded.source
    if Path(reference).is_dir():
        raise ParityError(f"{reference}: a train.py run has no PyTorch form; pass --reference CHECKPOINT")
    return Sides(name, loaded, _reference_state_dict(reference, args.ema), reference)


def _jax_functions(model):
    """Jitted logits, per-stage features and loss gradients of a Flax model as functions of its params."""
    fn = ModelFn(model, train=False)

    def features(params, x):
        state = nnx.from_flat_state({fn.paths[k]: v for k, v in params.items()})
        return nnx.merge(fn.graphdef, state).forward_intermediates(x)[1]

    def loss(params, x, labels):
        logits = fn(params, x).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))

    grads = jax.grad(loss, argnums=(0, 1))
    return jax.jit(fn), jax.jit(features), jax.jit(grads)


def run_report(args) -> dict:
    sides = build_sides(args)
    loaded = sides.loaded
    device = args.device if args.device != "auto" else reference_device()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    # The PyTorch side: timm's model for the name (with the tag, its pretrained cfg), loaded strictly.
    tm = timm.create_model(sides.name, pretrained=False, num_classes=loaded.num_classes)
    tm.load_state_dict(sides.reference_sd, strict=True)
    tm = tm.eval().to(device)
    transform = create_transform(**resolve_data_config(model=tm), is_training=False)
    *to_pixels, normalize = transform.transforms
    ours = resolve_eval_preprocessing(sides.name)

    from PIL import Image

    paths = find_images(args.images)[: args.max_images]
    torch_pixels, jax_pixels, torch_inputs, used = [], [], [], []
    for path in paths:
        try:
            jax_pixels.append(ours.transform(path))
            with Image.open(path) as im:
                rgb = im.convert("RGB")
        except (ImageDecodeError, OSError) as e:
            raise ParityError(f"{path}: cannot read the image: {e}") from None
        tensor = rgb
        for t in to_pixels:
            tensor = t(tensor)
        torch_pixels.append(np.rint(tensor.numpy().transpose(1, 2, 0) * 255.0).astype(np.uint8))
        torch_inputs.append(normalize(tensor))
        used.append(path)
    if not used:
        raise ParityError("no images to compare")
    jax_u8, torch_u8 = np.stack(jax_pixels), np.stack(torch_pixels)
    if jax_u8.shape != torch_u8.shape:
        raise ParityError(f"the two preprocessings give different shapes: JAX {jax_u8.shape}, timm {torch_u8.shape}")
    mean, std = np.asarray(ours.mean, np.float32), np.asarray(ours.std, np.float32)
    x_jax = ((jax_u8.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    x_torch = torch.stack(torch_inputs).to(device)

    # PyTorch: logits, features, gradients (float32).
    xt = x_torch.clone().requires_grad_(True)
    logits_t = tm(xt)
    labels = logits_t.argmax(-1).detach()
    torch.nn.functional.cross_entropy(logits_t, labels).backward()
    ref_logits = logits_t.detach().float().cpu().numpy()
    ref_input_grad = xt.grad.float().cpu().numpy().transpose(0, 2, 3, 1)
    ref_grads = {k: p.grad.float().cpu().numpy() for k, p in tm.named_parameters()}
    with torch.no_grad():
        ref_features = [f.float().cpu().numpy() for f in tm.forward_intermediates(x_torch, output_fmt="NHWC", intermediates_only=True)]

    # JAX: the same on its own input.
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model = model_from_params(loaded.model, loaded.params, num_classes=loaded.num_classes, dtype=dtype)
    logits_fn, features_fn, grads_fn = _jax_functions(model)
    params = {k: jnp.asarray(v) for k, v in loaded.params.items()}
    with jax.default_matmul_precision("highest"):
        logits_j = np.asarray(logits_fn(params, x_jax), np.float32)
        features_j = [np.asarray(f, np.float32) for f in features_fn(params, x_jax)]
        param_grads_j, input_grad_j = grads_fn(params, x_jax, jnp.asarray(labels.cpu().numpy(), jnp.int32))
    param_grads_j = {k: np.asarray(v, np.float32) for k, v in param_grads_j.items()}
    grads_j = flax_to_torch(param_grads_j)
    input_grad_j = np.asarray(input_grad_j, np.float32)

    report = {
        "model": sides.name, "variant": loaded.model, "num_classes": loaded.num_classes,
        "weights": loaded.describe(), "reference": sides.reference_source, "images": used,
        "image_size": ours.image_size, "dtype": args.dtype, "torch_device": device, "jax_backend": jax.default_backend(),
    }  # fmt: skip
    report["pixels"] = {
        "differing": int(np.sum(jax_u8 != torch_u8)),
        "max_abs": int(np.abs(jax_u8.astype(np.int16) - torch_u8.astype(np.int16)).max()),
        "total": int(jax_u8.size),
    }
    report["logits"] = {"max_abs": float(np.abs(ref_logits - logits_j).max()), "rel": rel_err(ref_logits, logits_j)}
    report["agreement"] = _agreement(ref_logits, logits_j, report["logits"]["max_abs"])
    report["features"] = [{"stage": i, "shape": list(r.shape), "rel": rel_err(r, j)} for i, (r, j) in enumerate(zip(ref_features, features_j))]
    report["input_grad"] = {"rel": rel_err(ref_input_grad, input_grad_j)}
    worst = max(ref_grads, key=lambda k: rel_err(ref_grads[k], grads_j[k]))
    report["param_grad"] = {"rel": rel_err(ref_grads[worst], grads_j[worst]), "worst": worst, "tensors": len(ref_grads)}
    report["adamw"] = _adamw_step(tm, loaded, param_grads_j, ref_grads)
    report["checks"] = _checks(report, TOLERANCES[args.dtype])
    report["ok"] = all(c["ok"] for c in report["checks"])
    return report


def _agreement(ref: np.ndarray, ours: np.ndarray, max_abs: float) -> dict:
    """Top-1 / top-5 agreement; a disagreement counts as explained when the reference's own margin at
    that rank (top-1 vs top-2, top-5 vs top-6) is within twice the logits' max abs error."""
    out = {}
    for k in (1, 5):
        k = min(k, ref.shape[1] - 1)
        order_r, order_o = np.argsort(-ref, 1), np.argsort(-ours, 1)
        same = np.array([set(order_r[i, :k]) == set(order_o[i, :k]) for i in range(len(ref))])
        margin = np.take_along_axis(ref, order_r[:, k - 1 : k], 1)[:, 0] - np.take_along_axis(ref, order_r[:, k : k + 1], 1)[:, 0]
        out[f"top{k}"] = float(same.mean())
        out[f"top{k}_unexplained"] = int(np.sum(~same & (margin > 2 * max_abs)))
    return out


def _adamw_step(tm, loaded: LoadedWeights, grads: Mapping[str, np.ndarray], ref_grads: Mapping[str, np.ndarray]) -> dict:
    """One AdamW step from the same weights and each side's own gradients; parameters compared after it.

    The first Adam step moves each weight by lr * g / (|g| + eps) (plus decay): where |g| is clear of
    rounding noise (above 1e-3 of its tensor's largest |g|, or exactly 0) the two sides must agree to
    1e-7 + 2.4e-7 |w| (float32); elsewhere the direction can be decided by noise, bounded by 2 lr.
    """
    lr = ADAMW["lr"]
    opt = torch.optim.AdamW(param_groups_weight_decay(tm, ADAMW["weight_decay"]), lr=lr,
                            betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"])  # fmt: skip
    opt.step()  # the gradients of run_report's backward are still on the parameters
    torch_after = {k: p.detach().float().cpu().numpy() for k, p in tm.named_parameters()}
    params = {k: jnp.asarray(v) for k, v in loaded.params.items()}
    tx = make_optimizer(optax.constant_schedule(lr), params, b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                        weight_decay=ADAMW["weight_decay"])  # fmt: skip
    updates, _ = tx.update({k: jnp.asarray(v) for k, v in grads.items()}, tx.init(params), params)
    ours_after = flax_to_torch({k: np.asarray(v, np.float32) for k, v in optax.apply_updates(params, updates).items()})
    outside = total = 0
    clear_over = max_over_lr = 0.0
    for k, g in ref_grads.items():
        diff = np.abs(torch_after[k] - ours_after[k])
        clear = (np.abs(g) > 1e-3 * np.abs(g).max()) | (g == 0)
        bound = 1e-7 + 2.4e-7 * np.abs(torch_after[k])
        if clear.any():
            clear_over = max(clear_over, float((diff[clear] / bound[clear]).max()))
        max_over_lr = max(max_over_lr, float(diff.max()) / lr)
        outside += int((diff > bound).sum())
        total += g.size
    return {"lr": lr, "clear_over_bound": clear_over, "outside_fraction": outside / total, "max_over_lr": max_over_lr}


def _checks(report: dict, tol: Mapping[str, float | None]) -> list[dict]:
    values = {
        "pixels_differing": report["pixels"]["differing"],
        "logits_rel": report["logits"]["rel"],
        "features_rel": max(f["rel"] for f in report["features"]),
        "input_grad_rel": report["input_grad"]["rel"],
        "param_grad_rel": report["param_grad"]["rel"],
        "adamw_clear_over_bound": report["adamw"]["clear_over_bound"],
        "adamw_outside_fraction": report["adamw"]["outside_fraction"],
        "adamw_max_over_lr": report["adamw"]["max_over_lr"],
    }
    checks = [{"check": k, "value": v, "tolerance": tol[k], "ok": tol[k] is None or v <= tol[k]} for k, v in values.items()]
    for k in (1, 5):
        n = report["agreement"][f"top{k}_unexplained"]
        checks.append({"check": f"top{k}_unexplained_disagreements", "value": n, "tolerance": 0, "ok": n == 0})
    return checks


def format_table(report: dict) -> str:
    lines = [
        f"parity: {report['model']} ({report['num_classes']} classes), JAX {report['dtype']} on {report['jax_backend']} "
        f"vs timm float32 on {report['torch_device']}",
        f"weights: {report['weights']}; reference: {report['reference']}",
        f"images: {len(report['images'])} at {report['image_size']} px; pixels differing "
        f"{report['pixels']['differing']} of {report['pixels']['total']} (max {report['pixels']['max_abs']} levels)",
        f"logits: max abs {report['logits']['max_abs']:.3g}, rel {report['logits']['rel']:.3g}; top-1 agreement "
        f"{report['agreement']['top1']:.0%}, top-5 {report['agreement']['top5']:.0%}",
        "features: " + ", ".join(f"stage {f['stage']} {f['rel']:.3g}" for f in report["features"]),
        f"gradients: input {report['input_grad']['rel']:.3g}, parameters (worst of {report['param_grad']['tensors']}) "
        f"{report['param_grad']['rel']:.3g} ({report['param_grad']['worst']})",
        f"AdamW step (lr {report['adamw']['lr']:g}): clear-gradient error / bound {report['adamw']['clear_over_bound']:.3g}, "
        f"outside bound {report['adamw']['outside_fraction']:.2g}, max diff / lr {report['adamw']['max_over_lr']:.3g}",
        "",
        f"{'check':36s} {'value':>12s} {'tolerance':>12s}  result",
    ]
    for c in report["checks"]:
        tol = "-" if c["tolerance"] is None else f"{c['tolerance']:.3g}"
        lines.append(f"{c['check']:36s} {c['value']:12.4g} {tol:>12s}  {'ok' if c['ok'] else 'FAIL'}")
    lines.append("PARITY OK" if report["ok"] else "PARITY FAILED")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mambaout_jax.parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--weights", help="a PyTorch checkpoint or a weight file of this project (the JAX side's)")
    which.add_argument("--pretrained", metavar="TAG", help="published weights by name, e.g. mambaout_tiny.in1k")
    which.add_argument("--random-weights", metavar="MODEL", help="a variant with every parameter random (no file)")
    p.add_argument("--reference", help="the PyTorch side's checkpoint; default: the same file as the JAX side")
    p.add_argument("--model", help="variant or tag (its eval settings); default: from the weights")
    add_weight_set_flags(p)
    p.add_argument("--images", help="a folder of images; default: scikit-image's photos")
    p.add_argument("--max-images", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the JAX side's compute dtype")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="the PyTorch side's device")
    p.add_argument("--seed", type=int, default=0, help="for --random-weights")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON here")
    args = p.parse_args(argv)
    if args.max_images <= 0:
        p.error("--max-images must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if _TORCH_MISSING is not None:
        print(f"error: the parity report runs timm on PyTorch as the reference, but {_TORCH_MISSING}. Install the "
              "torch extra: pip install 'mambaout-jax[torch]' (from a checkout: pip install -e '.[torch]')",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        report = run_report(args)
    except (CheckpointError, ParityError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
