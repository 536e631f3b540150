"""The front door, shaped like timm's: ``create_model(name, pretrained=...)``, ``list_models``, ``model_info``.

It sits on top of the layers: the model itself comes from ``models`` (pure modules, no file I/O) and
its weights from ``convert`` (every weight source the project reads, strictly checked).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from mambaout_jax.convert.weights import load_weights
from mambaout_jax.models.factory import build_model, model_from_params, model_info  # noqa: F401  (re-export)
from mambaout_jax.models.layers import ConvImpl, DepthwiseImpl
from mambaout_jax.models.mambaout import MambaOut
from mambaout_jax.models.registry import get_model_spec, list_models  # noqa: F401  (re-export)


def create_model(
    name: str,
    *,
    pretrained: str | os.PathLike | None = None,
    num_classes: int | None = None,
    drop_path_rate: float = 0.0,
    drop_rate: float = 0.0,
    dtype=jnp.float32,
    dw_conv_impl: DepthwiseImpl = "auto",
    conv_impl: ConvImpl = "auto",
    seed: int = 0,
    rngs: nnx.Rngs | None = None,
) -> MambaOut:
    """Build a MambaOut variant, optionally with weights, in inference mode.

    Args:
      name: a registered variant (``list_models()``), optionally with a timm tag (``mambaout_tiny.in1k``).
      pretrained: path to a PyTorch checkpoint (.pth/.pt/.bin/.safetensors, authors' or timm layout,
        bare or wrapped in {"model": ...}), to a weight file written by this project, or to a
        training run of ``train.py``; local or in a bucket (``gs://bucket/...``). Loading is strict.
      num_classes: classifier size; 0 removes the classifier (the model returns pre-logits). Defaults
        to the checkpoint's when ``pretrained`` is given, else to the variant's (1000).
      dtype: compute dtype (``jnp.bfloat16`` on TPU/GPU); parameters stay float32.
      dw_conv_impl: depthwise conv form: 'grouped', 'shift', or 'auto' (by backend).
      conv_impl: dense (stem, downsample) conv form: 'xla', 'im2col', or 'auto' (by backend).
      seed, rngs: the random initialisation when there is no ``pretrained``.

    ``model.train()`` enables drop path / dropout; then call ``model(x, key)`` with a PRNG key.
    """
    spec = get_model_spec(name)
    options = dict(
        drop_path_rate=drop_path_rate, drop_rate=drop_rate, dtype=dtype, dw_conv_impl=dw_conv_impl, conv_impl=conv_impl
    )
    if pretrained is None:
        return build_model(spec.name, num_classes=num_classes, seed=seed, rngs=rngs, **options)
    weights = load_weights(pretrained, model=spec.name, num_classes=num_classes)
    return model_from_params(spec.name, weights.params, num_classes=weights.num_classes, **options)
