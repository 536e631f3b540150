"""Every weight source the project reads, through one strict routine, and the files it writes.

``load_weights(source)`` takes a PyTorch checkpoint (.pth/.pt/.bin/.safetensors, authors' or timm
layout, bare or wrapped), a weight file written by this project, or a ``train.py`` run (its
workdir, checkpoints folder or one step folder), local or in a bucket (``gs://...``), and returns
the model, class count and parameters.
Whatever the source, the parameters go through ``convert_state_dict`` in timm's key space: the
variant is recognised (or checked) from the shapes and the classifier is kept, dropped or refused
there, so every reader applies the same checks and says the same things.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np
from etils import epath

from mambaout_jax import storage
from mambaout_jax.convert.convert import convert_state_dict
from mambaout_jax.convert.mapping import flax_to_torch
from mambaout_jax.convert.run_checkpoint import find_step_dir, read_meta, read_run_params
from mambaout_jax.convert.torch_io import CheckpointError, read_weights, write_flax_weights, write_safetensors
from mambaout_jax.models.registry import MODELS, get_model_spec


@dataclasses.dataclass(frozen=True)
class LoadedWeights:
    """Parameters read from a weight source, strictly checked against ``model``."""

    model: str  # the registered variant
    num_classes: int  # 0: no classifier (pre-logits)
    params: dict[str, np.ndarray]  # the flat parameter contract
    source: str  # the file or run they came from
    weight_set: str | None = None  # which of several sets in the source, when it has several
    classes: tuple[str, ...] | None = None  # class names, when the source records them (train.py runs)


def load_weights(
    source: str | os.PathLike, *, model: str | None = None, num_classes: int | None = None
) -> LoadedWeights:
    """Read any supported weight source (see the module docstring), strictly checked.

    ``model`` (a variant, optionally ``variant.tag``) is checked against the source; by default it is
    recognised from the shapes (files) or read from the run's record (runs). ``num_classes`` defaults
    to the source's; 0 drops its classifier; another count is an error that says how to load it.
    """
    try:
        path = storage.as_path(source, "weights")
        storage.check_place("weights", source)  # a missing or forbidden bucket, named as such
        is_run = path.is_dir()
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    asked = get_model_spec(model).name if model is not None else None
    if is_run:
        return _load_run(path, asked, num_classes)
    kind, tensors, metadata = read_weights(path)
    if kind == "torch":
        found, classes, params = convert_state_dict(tensors, model=asked, num_classes=num_classes, source=str(path))
        return LoadedWeights(found, classes, params, str(path))
    saved = metadata.get("model", "")
    if saved not in MODELS:
        what = f"names the unknown model {saved!r}" if saved else "names no model"
        raise CheckpointError(
            f"{path}: a mambaout_jax weight file whose metadata {what}; known models: {', '.join(MODELS)}. "
            "The file is damaged or was written by another version of this project"
        )
    return _from_contract(tensors, saved, asked, num_classes, str(path))


def _load_run(path: epath.Path, asked: str | None, num_classes: int | None) -> LoadedWeights:
    step_dir = find_step_dir(path)
    meta = read_meta(step_dir)
    saved = meta.get("model")
    if not saved and asked is None:
        raise CheckpointError(
            f"{step_dir}: the checkpoint records no model name (no meta/ item with a 'model' entry); "
            "pass the variant it was trained as: --model NAME (model=NAME)"
        )
    weight_set, params = read_run_params(step_dir)
    loaded = _from_contract(params, saved or asked, asked, num_classes, str(step_dir))
    classes = tuple(meta["classes"]) if meta.get("classes") else None
    return dataclasses.replace(loaded, weight_set=weight_set, classes=classes)


def _from_contract(
    params: Mapping[str, np.ndarray], saved: str, asked: str | None, num_classes: int | None, source: str
) -> LoadedWeights:
    """Parameters in the contract's key spelling (our files, runs), checked as a timm state_dict."""
    if asked is not None and asked != saved:
        raise CheckpointError(f"{source}: holds {saved} weights, not {asked}")
    try:
        state_dict = flax_to_torch(params)
    except ValueError as e:  # a key the parameter contract does not know
        raise CheckpointError(f"{source}: not a valid mambaout_jax checkpoint: {e}") from None
    model, classes, checked = convert_state_dict(state_dict, model=saved, num_classes=num_classes, source=source)
    return LoadedWeights(model, classes, checked, source)


def save_flax_weights(path: str | os.PathLike, params: Mapping[str, np.ndarray], *, model: str, num_classes: int) -> None:
    """Write contract params in this project's weight format (atomic)."""
    write_flax_weights(path, {k: np.asarray(v, np.float32) for k, v in params.items()}, model=model, num_classes=num_classes)


def export_timm_safetensors(path: str | os.PathLike, params: Mapping[str, np.ndarray], *, model: str) -> None:
    """Write contract params as a timm-layout .safetensors: ``timm.create_model(model).load_state_dict``
    with ``strict=True`` accepts it."""
    state_dict = flax_to_torch({k: np.asarray(v, np.float32) for k, v in params.items()})
    write_safetensors(path, state_dict, {"format": "pt", "model": model})
