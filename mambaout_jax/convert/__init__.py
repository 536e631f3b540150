"""PyTorch <-> Flax weight conversion for MambaOut (authors' and timm layouts)."""

from mambaout_jax.convert.convert import (
    convert_state_dict,
    export_timm_safetensors,
    identify_model,
    load_pretrained,
    save_flax_weights,
)
from mambaout_jax.convert.mapping import authors_to_timm, detect_layout, flax_to_torch, torch_to_flax
from mambaout_jax.convert.torch_io import CheckpointError, read_weights

__all__ = [
    "CheckpointError",
    "authors_to_timm",
    "convert_state_dict",
    "detect_layout",
    "export_timm_safetensors",
    "flax_to_torch",
    "identify_model",
    "load_pretrained",
    "read_weights",
    "save_flax_weights",
    "torch_to_flax",
]
