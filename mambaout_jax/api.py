"""The front door, shaped like timm's: ``create_model(name, pretrained=...)``, ``list_models``, ``model_info``.

It sits on top of the layers: the model itself comes from ``models`` (pure modules, no file I/O) and
its weights from ``convert`` (every weight source the project reads, strictly checked).
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from mambaout_jax.convert.weights import is_pretrained_name, load_pretrained, load_weights
from mambaout_jax.models.factory import build_model, model_from_params, model_info  # noqa: F401  (re-export)
from mambaout_jax.models.layers import ConvImpl, DepthwiseImpl
from mambaout_jax.models.mambaout import MambaOut
from mambaout_jax.models.registry import get_model_spec, list_models  # noqa: F401  (re-export)


def create_model(
    name: str,
    *,
    pretrained: str | os.PathLike | bool | None = None,
    num_classes: int | None = None,
    ema: bool | None = None,
    pretrained_source: str = "hub",
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
      pretrained: True for the published weights of ``name`` (its tag, else the variant's default tag,
        as timm: ``create_model("mambaout_tiny", pretrained=True)`` is ``mambaout_tiny.in1k``); a tag
        (``"mambaout_tiny.in1k"``, ``"timm/mambaout_tiny.in1k"``, ``"hf-hub:timm/mambaout_tiny.in1k"``),
        downloaded into the Hugging Face cache on first use; or a path to a PyTorch checkpoint
        (.pth/.pt/.bin/.safetensors/.pth.tar, authors' or timm layout, bare, wrapped in {"model": ...} or
        a timm training checkpoint), to a weight file written by this project, or to a training run
        of ``train.py``; local or in a bucket (``gs://bucket/...``). Loading is strict.
      ema: which weight set of a source that has two (``convert.weights``): None the raw weights of a
        timm checkpoint (as timm's validate.py) and the EMA ones of a ``train.py`` run that kept them;
        True / False force the EMA / raw set.
      pretrained_source: for published weights, 'hub' (the Hugging Face Hub, timm's files) or
        'release' (the authors' GitHub release of the five paper models).
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
    if pretrained is None or pretrained is False:
        return build_model(spec.name, num_classes=num_classes, seed=seed, rngs=rngs, **options)
    if pretrained is True or is_pretrained_name(pretrained):
        tag = name if pretrained is True else str(pretrained)
        weights = load_pretrained(tag, source=pretrained_source, num_classes=num_classes, ema=ema)
        if weights.model != spec.name:
            raise ValueError(f"pretrained={pretrained!r} holds {weights.model} weights, not {spec.name}")
    else:
        weights = load_weights(pretrained, model=spec.name, num_classes=num_classes, ema=ema)
    return model_from_params(spec.name, weights.params, num_classes=weights.num_classes, **options)
