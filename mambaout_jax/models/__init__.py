"""MambaOut models in Flax NNX."""

from mambaout_jax.models.factory import create_model, list_models, model_from_params, model_info, model_param_shapes
from mambaout_jax.models.inference import compile_forward
from mambaout_jax.models.mambaout import GatedCNNBlock, MambaOut, MambaOutConfig
from mambaout_jax.models.params import ParamMismatchError, count_params, get_params, set_params
from mambaout_jax.models.registry import MODELS, PAPER_MODELS, get_model_spec

__all__ = [
    "MODELS",
    "PAPER_MODELS",
    "GatedCNNBlock",
    "MambaOut",
    "MambaOutConfig",
    "ParamMismatchError",
    "compile_forward",
    "count_params",
    "create_model",
    "get_model_spec",
    "get_params",
    "list_models",
    "model_from_params",
    "model_info",
    "model_param_shapes",
    "set_params",
]
