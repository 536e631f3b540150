"""The front door, shaped like timm's: ``list_models``, ``create_model``, ``model_info``."""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mambaout_jax.models.complexity import compute_cost
from mambaout_jax.models.layers import ConvImpl, DepthwiseImpl
from mambaout_jax.models.mambaout import MambaOut
from mambaout_jax.models.params import param_shapes, set_params
from mambaout_jax.models.registry import PAPER_MODELS, get_model_spec, list_models  # noqa: F401  (re-export)


def _build(
    name: str,
    num_classes: int,
    *,
    drop_path_rate=0.0,
    drop_rate=0.0,
    dtype=jnp.float32,
    dw_conv_impl="auto",
    conv_impl="auto",
    rngs,
):
    spec = get_model_spec(name)
    return MambaOut(
        spec.config,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        drop_rate=drop_rate,
        dtype=dtype,
        dw_conv_impl=dw_conv_impl,
        conv_impl=conv_impl,
        rngs=rngs,
    )


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
        training checkpoint directory of ``train.py``. Loading is strict.
      num_classes: classifier size; 0 removes the classifier (the model returns pre-logits). Defaults
        to the checkpoint's when ``pretrained`` is given, else to the variant's (1000).
      dtype: compute dtype (``jnp.bfloat16`` on TPU/GPU); parameters stay float32.
      dw_conv_impl: depthwise conv form: 'grouped', 'shift', or 'auto' (by backend).
      conv_impl: dense (stem, downsample) conv form: 'xla', 'im2col', or 'auto' (by backend).

    ``model.train()`` enables drop path / dropout; then call ``model(x, key)`` with a PRNG key.
    """
    spec = get_model_spec(name)
    options = dict(
        drop_path_rate=drop_path_rate, drop_rate=drop_rate, dtype=dtype, dw_conv_impl=dw_conv_impl, conv_impl=conv_impl
    )
    if pretrained is not None:
        from mambaout_jax.convert import load_pretrained

        _, num_classes, params = load_pretrained(pretrained, model=spec.name, num_classes=num_classes)
        return model_from_params(spec.name, params, num_classes=num_classes, **options)
    if num_classes is None:
        num_classes = spec.eval.num_classes
    rngs = rngs if rngs is not None else nnx.Rngs(seed)
    model = _jit_init(functools.partial(_build, spec.name, num_classes, **options), rngs)
    model.eval()
    return model


def model_from_params(
    name: str,
    params: Mapping[str, Any],
    *,
    num_classes: int,
    drop_path_rate: float = 0.0,
    drop_rate: float = 0.0,
    dtype=jnp.float32,
    dw_conv_impl: DepthwiseImpl = "auto",
    conv_impl: ConvImpl = "auto",
) -> MambaOut:
    """A model holding ``params`` (flat contract dict, strictly checked), without drawing random weights."""
    build = functools.partial(
        _build, get_model_spec(name).name, num_classes,
        drop_path_rate=drop_path_rate, drop_rate=drop_rate, dtype=dtype, dw_conv_impl=dw_conv_impl,
        conv_impl=conv_impl,
    )
    model = nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0)))
    set_params(model, params)
    model.eval()
    return model


def _jit_init(build, rngs: nnx.Rngs) -> MambaOut:
    """Initialise under one jit instead of hundreds of eager random draws.

    The program runs once, so it is compiled without optimisation: XLA:CPU otherwise spends
    seconds optimising the few hundred independent random-number generators.
    """
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(rngs=nnx.Rngs(0))))
    rng_graphdef, rng_state = nnx.split(rngs)

    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def init(rng_state):
        rngs = nnx.merge(rng_graphdef, rng_state)
        model = build(rngs=rngs)
        return nnx.state(model), nnx.state(rngs)

    state, rng_state = init(rng_state)
    nnx.update(rngs, rng_state)  # the caller's Rngs advance as if the model were built eagerly
    return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=64)
def model_param_shapes(name: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Contract path -> shape of a variant, without allocating any parameter."""
    abstract = nnx.eval_shape(lambda: _build(name, num_classes, dw_conv_impl="grouped", conv_impl="xla", rngs=nnx.Rngs(0)))
    return param_shapes(abstract)


def model_info(name: str, *, image_size: int = 224, num_classes: int | None = None) -> dict:
    """Parameter count, analytic compute (see ``complexity``) and the eval settings of a variant."""
    spec = get_model_spec(name)
    num_classes = spec.eval.num_classes if num_classes is None else num_classes
    cost = compute_cost(spec.config, image_size=image_size, num_classes=num_classes)
    ev = spec.eval
    return {
        "name": spec.name,
        "params": int(sum(math.prod(s) for s in model_param_shapes(spec.name, num_classes).values())),
        "macs": cost["macs"],
        "macs_fvcore": cost["macs_fvcore"],
        "flops": cost["flops"],
        "image_size_for_macs": image_size,
        "num_classes": num_classes,
        "depths": spec.config.depths,
        "dims": spec.config.dims,
        "input_size": ev.input_size,
        "test_input_size": ev.test_input_size,
        "crop_pct": ev.crop_pct,
        "test_crop_pct": ev.test_crop_pct,
        "crop_mode": ev.crop_mode,
        "interpolation": ev.interpolation,
        "mean": ev.mean,
        "std": ev.std,
        "pretrained_tags": spec.pretrained_tags,
        "paper_model": spec.name in PAPER_MODELS,
    }
