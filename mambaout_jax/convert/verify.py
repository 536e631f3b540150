"""Run timm and the Flax model on the same random batch and compare (needs the ``torch`` extra)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from mambaout_jax.models.factory import model_from_params


def reference_device() -> str:
    """'cuda' when both PyTorch and JAX see a GPU (the CUDA reference), else 'cpu'."""
    import jax
    import torch

    return "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"


def randomize_(module, seed: int = 0) -> None:
    """Every parameter random, in place, so that no mapping mistake hides behind timm's init
    (LayerNorm scale 1 and bias 0, zero biases, layer scale 1e-5): LayerNorm scales around 1, layer
    scale around 0.5, the rest around 0 scaled by fan-in, so activations stay O(1) and logits are
    informative. The parity report's ``--random-weights`` and the tests' random models
    (``tests/torch_reference.py``) use it."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                value = 1.0 + 0.2 * noise
            elif name.endswith("ls.gamma"):
                value = 0.5 + 0.2 * noise
            elif p.ndim == 1:
                value = 0.1 * noise
            else:
                value = noise / np.sqrt(int(np.prod(p.shape[1:])))
            p.copy_(value.to(p.device))


def build_timm_model(model: str, num_classes: int, state_dict: Mapping[str, np.ndarray] | None = None, device="cpu"):
    """A timm model with random weights (no network), optionally loaded strictly from ``state_dict``."""
    import timm
    import torch

    tm = timm.create_model(model, pretrained=False, num_classes=num_classes)
    if state_dict is not None:
        tm.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
    return tm.eval().to(device)


def timm_forward(tm, images_nhwc: np.ndarray, *, features: bool = False):
    """Logits (or per-stage NHWC features) of a timm MambaOut; fp32 with TF32 disabled."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = next(tm.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(device)
    with torch.no_grad():
        if features:
            feats = tm.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
            return [f.float().cpu().numpy() for f in feats]
        return tm(x).float().cpu().numpy()


def flax_forward(model, images_nhwc: np.ndarray, *, features: bool = False):
    """Logits (or per-stage features) of a Flax MambaOut under jit, fp32 matmuls at full precision."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        if features:
            return m.forward_intermediates(x)[1]
        return m(x)

    with jax.default_matmul_precision("highest"):
        out = run(state, images_nhwc)
    return [np.asarray(f) for f in out] if features else np.asarray(out)


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict:
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    scale = float(np.abs(reference).max()) or 1.0
    out = {
        "max_abs_diff": float(diff.max()),
        "rel_err": float(diff.max() / scale),
    }
    if reference.ndim == 2 and reference.shape[-1] > 1:
        out["top1_agreement"] = float(np.mean(reference.argmax(-1) == candidate.argmax(-1)))
    return out


def verify_against_timm(
    model: str,
    num_classes: int,
    params: Mapping[str, np.ndarray],
    timm_state_dict: Mapping[str, np.ndarray],
    *,
    batch_size: int = 4,
    image_size: int = 224,
    seed: int = 0,
) -> dict:
    """Compare timm (loaded from ``timm_state_dict``) and Flax (``params``) on one random batch."""
    device = reference_device()
    tm = build_timm_model(model, num_classes, timm_state_dict, device=device)
    fm = model_from_params(model, params, num_classes=num_classes)
    x = np.random.default_rng(seed).standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32)
    result = compare_logits(timm_forward(tm, x), flax_forward(fm, x))
    result.update(model=model, num_classes=num_classes, batch_size=batch_size, image_size=image_size, device=device)
    return result
