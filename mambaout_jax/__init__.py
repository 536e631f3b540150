"""mambaout-jax: MambaOut in JAX/Flax NNX, numerically identical to the PyTorch references."""

from mambaout_jax.api import create_model, list_models, model_info
from mambaout_jax.models import compile_forward, get_params, set_params

__version__ = "0.1.0"
__all__ = ["compile_forward", "create_model", "get_params", "list_models", "model_info", "set_params"]
