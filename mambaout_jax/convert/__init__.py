"""Every weight file the project reads or writes: PyTorch checkpoints (authors' and timm layouts),
this project's weight files and ``train.py`` runs; key mapping both ways; parity against timm."""

from mambaout_jax.convert.convert import convert_state_dict, identify_model
from mambaout_jax.convert.mapping import authors_to_timm, detect_layout, flax_to_torch, torch_to_flax
from mambaout_jax.convert.torch_io import CheckpointError, read_weights
from mambaout_jax.convert.hub import DownloadError
from mambaout_jax.convert.pretrained import PRETRAINED, resolve_tag
from mambaout_jax.convert.weights import (
    LoadedWeights,
    export_timm_safetensors,
    load_pretrained,
    load_source,
    load_weights,
    save_flax_weights,
)

__all__ = [
    "CheckpointError",
    "DownloadError",
    "PRETRAINED",
    "LoadedWeights",
    "authors_to_timm",
    "convert_state_dict",
    "detect_layout",
    "export_timm_safetensors",
    "flax_to_torch",
    "identify_model",
    "load_pretrained",
    "load_source",
    "load_weights",
    "resolve_tag",
    "read_weights",
    "save_flax_weights",
    "torch_to_flax",
]
