"""A PyTorch state_dict -> Flax parameters: identify the variant, check strictly, convert.

The one strict routine: every weight source (``weights.load_weights``) ends up here, in timm's key space.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from mambaout_jax.convert.mapping import (
    checkpoint_num_classes,
    expected_torch_shapes,
    to_timm_layout,
    torch_to_flax,
)
from mambaout_jax.convert.torch_io import CheckpointError
from mambaout_jax.models.factory import model_param_shapes
from mambaout_jax.models.params import describe_mismatch
from mambaout_jax.models.registry import MODELS, get_model_spec

_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


def _architecture_signature(timm_sd: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(depths, dims) read off the keys: cheap pre-filter before comparing full shape tables."""
    depth: dict[int, int] = {}
    for key in timm_sd:
        m = _BLOCK_KEY.match(key)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            depth[s] = max(depth.get(s, 0), b + 1)
    stages = sorted(depth)
    norms = [timm_sd.get(f"stages.{s}.blocks.0.norm.weight") for s in stages]
    dims = tuple(int(np.shape(w)[0]) for w in norms if w is not None and np.ndim(w) >= 1)
    return tuple(depth[s] for s in stages), dims


def identify_model(timm_sd: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> str:
    """The registered variant whose every key and shape equals the checkpoint's; else a clear error."""
    num_classes = checkpoint_num_classes(timm_sd)
    given = {k: tuple(np.shape(v)) for k, v in timm_sd.items()}
    depths, dims = _architecture_signature(timm_sd)
    candidates = [n for n, spec in MODELS.items() if (spec.config.depths, spec.config.dims) == (depths, dims)]
    for name in candidates:
        if describe_mismatch(expected_torch_shapes(model_param_shapes(name, num_classes)), given) is None:
            return name
    hint = ""
    if candidates:
        problems = describe_mismatch(expected_torch_shapes(model_param_shapes(candidates[0], num_classes)), given)
        hint = f"\nclosest variant {candidates[0]} differs:\n{problems}"
    raise CheckpointError(
        f"{source}: no registered MambaOut variant has this checkpoint's architecture "
        f"(depths {depths}, dims {dims}); known variants: {', '.join(MODELS)}{hint}"
    )


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    *,
    model: str | None = None,
    num_classes: int | None = None,
    source: str = "checkpoint",
) -> tuple[str, int, dict[str, np.ndarray]]:
    """A PyTorch MambaOut state_dict (authors' or timm layout) -> ``(model, num_classes, params)``.

    ``model`` defaults to the variant recognised from the shapes. ``num_classes`` defaults to the
    checkpoint's; 0 drops its classifier (a backbone); any other mismatch is an error that says how
    to load the file. Strict: every missing, unexpected or mis-shaped key is named.
    """
    timm_sd = to_timm_layout(state_dict, source=source)
    timm_sd = _select_classifier(timm_sd, num_classes, source)
    found_classes = checkpoint_num_classes(timm_sd)
    if model is None:
        model = identify_model(timm_sd, source=source)
    else:
        model = get_model_spec(model).name
        expected = expected_torch_shapes(model_param_shapes(model, found_classes))
        problem = describe_mismatch(expected, {k: tuple(np.shape(v)) for k, v in timm_sd.items()})
        if problem:
            try:
                guess = f"\nits shapes are those of {identify_model(timm_sd)}; pass --model/model= that name"
            except CheckpointError:
                guess = ""
            raise CheckpointError(
                f"{source}: does not match {model} (it does not hold {model} weights):\n{problem}{guess}"
            )
    params = torch_to_flax(timm_sd, model_param_shapes(model, found_classes))
    return model, found_classes, {k: v.astype(np.float32) for k, v in params.items()}


def _select_classifier(timm_sd: dict[str, np.ndarray], num_classes: int | None, source: str) -> dict[str, np.ndarray]:
    found = checkpoint_num_classes(timm_sd)
    if num_classes is None or num_classes == found:
        return timm_sd
    if num_classes == 0:
        return {k: v for k, v in timm_sd.items() if not k.startswith("head.fc.")}
    if found:
        have = f"its classifier has {found} classes (head.fc.weight {tuple(np.shape(timm_sd['head.fc.weight']))})"
        how = (
            f"Load it with num_classes={found} (--num-classes {found}; e.g. the 11,821-class ImageNet-12k "
            "head of mambaout_base_plus_rw.sw_e150_in12k), or with num_classes=0 to drop the classifier"
        )
    else:
        have = "it has no classifier (no head.fc.weight)"
        how = "Load it with num_classes=0 (a backbone returning pre-logits features)"
    raise CheckpointError(f"{source}: {have}, but num_classes={num_classes} was asked for. {how}.")
