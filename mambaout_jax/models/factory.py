"""Building a variant: random weights, given parameters, or only its graph; and what it costs.

Pure: nothing here reads or writes a file. Weights from files come through ``convert`` and the
front door (``mambaout_jax.create_model``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mambaout_jax.models.complexity import compute_cost
from mambaout_jax.models.layers import ConvImpl, DepthwiseImpl
from mambaout_jax.models.mambaout import MambaOut
from mambaout_jax.models.params import param_shapes, set_params
from mambaout_jax.models.registry import PAPER_MODELS, get_model_spec


def _construct(
    name: str,
    num_classes: int,
    *,
    drop_path_rate=0.0,
    drop_rate=0.0,
    dtype=jnp.float32,
    dw_conv_impl="auto",
    conv_impl="auto",
    rngs,
) -> MambaOut:
    return MambaOut(
        get_model_spec(name).config,
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        drop_rate=drop_rate,
        dtype=dtype,
        dw_conv_impl=dw_conv_impl,
        conv_impl=conv_impl,
        rngs=rngs,
    )


def abstract_model(name: str, num_classes: int | None = None, **options) -> MambaOut:
    """The model's graph with abstract (shape-only) parameters: for jitted steps that take the
    parameters as arguments, and for planning. ``options`` as ``build_model``'s."""
    spec = get_model_spec(name)
    classes = spec.eval.num_classes if num_classes is None else num_classes
    return nnx.eval_shape(lambda: _construct(spec.name, classes, rngs=nnx.Rngs(0), **options))


def build_model(
    name: str,
    *,
    num_classes: int | None = None,
    drop_path_rate: float = 0.0,
    drop_rate: float = 0.0,
    dtype=jnp.float32,
    dw_conv_impl: DepthwiseImpl = "auto",
    conv_impl: ConvImpl = "auto",
    seed: int = 0,
    rngs: nnx.Rngs | None = None,
) -> MambaOut:
    """A variant with freshly initialised weights (timm's init), in inference mode.

    ``num_classes`` defaults to the variant's (1000; 0 removes the classifier). ``rngs`` (or
    ``nnx.Rngs(seed)``) draws the weights.
    """
    spec = get_model_spec(name)
    classes = spec.eval.num_classes if num_classes is None else num_classes
    build = functools.partial(
        _construct, spec.name, classes, drop_path_rate=drop_path_rate, drop_rate=drop_rate, dtype=dtype,
        dw_conv_impl=dw_conv_impl, conv_impl=conv_impl,
    )  # fmt: skip
    model = _jit_init(build, rngs if rngs is not None else nnx.Rngs(seed))
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
    model = abstract_model(
        name, num_classes, drop_path_rate=drop_path_rate, drop_rate=drop_rate, dtype=dtype,
        dw_conv_impl=dw_conv_impl, conv_impl=conv_impl,
    )  # fmt: skip
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
    return param_shapes(abstract_model(name, num_classes, dw_conv_impl="grouped", conv_impl="xla"))


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
