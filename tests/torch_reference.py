"""Helpers for tests against timm: random-weight models with *every* parameter randomised."""

from __future__ import annotations

import re

import numpy as np

from mambaout_jax.convert.verify import randomize_  # noqa: F401  (the tests import it from here)


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
