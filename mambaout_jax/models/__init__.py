"""MambaOut models in Flax NNX: pure modules, no file I/O (weights from files come through ``convert``)."""

from mambaout_jax.models.factory import abstract_model, build_model, model_from_params, model_info, model_param_shapes
from mambaout_jax.models.inference import compile_forward
from mambaout_jax.models.mambaout import GatedCNNBlock, MambaOut, MambaOutConfig
from mambaout_jax.models.params import ParamMismatchError, count_params, get_params, set_params
from mambaout_jax.models.registry import MODELS, PAPER_MODELS, get_model_spec, list_models

__all__ = [
    "MODELS",
    "PAPER_MODELS",
    "GatedCNNBlock",
    "MambaOut",
    "MambaOutConfig",
    "ParamMismatchError",
    "abstract_model",
    "build_model",
    "compile_forward",
    "count_params",
    "get_model_spec",
    "get_params",
    "list_models",
    "model_from_params",
    "model_info",
    "model_param_shapes",
    "set_params",
]
