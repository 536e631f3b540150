"""Helpers for tests against timm: random-weight models with *every* parameter randomised."""

from __future__ import annotations

import re

import numpy as np


def randomize_(module, seed: int = 0) -> None:
    """Overwrite every parameter with random values in place.

    timm's default init (LayerNorm scale 1 and bias 0, zero biases, layer scale 1e-5) makes many
    mapping mistakes invisible; LayerNorm scales are drawn around 1 and everything else around 0 with
    magnitudes that keep activations O(1), so that logits are informative.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                value = 1.0 + 0.2 * noise
            elif name.endswith("ls.gamma"):
                value = 0.5 + 0.2 * noise
            elif p.ndim == 1:
                value = 0.1 * noise
            else:
                fan_in = int(np.prod(p.shape[1:]))
                value = noise / np.sqrt(fan_in)
            p.copy_(value.to(p.device))


def random_timm_model(name: str, num_classes: int = 1000, seed: int = 0, device: str = "cpu"):
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    randomize_(model, seed)
    return model.eval().to(device)


def state_dict_numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def timm_to_authors(sd: dict) -> dict:
    """Inverse of timm's checkpoint_filter_fn: what the authors' released .pth files look like."""
    out = {}
    for k, v in sd.items():
        if k.startswith("head.norm."):
            k = "norm." + k[len("head.norm."):]
        elif k.startswith("head."):
            k = k.replace("head.pre_logits.fc.", "head.fc1.").replace("head.pre_logits.norm.", "head.norm.")
            k = k.replace("head.fc.", "head.fc2.")
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"stages\.([0-9]+)\.downsample", r"downsample_layers.\1", k)
        k = re.sub(r"stages\.([0-9]+)\.blocks\.([0-9]+)", r"stages.\1.\2", k)
        out[k] = v
    return out
