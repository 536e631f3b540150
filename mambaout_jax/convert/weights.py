"""Every weight source the project reads, through one strict routine, and the files it writes.

``load_weights(source)`` takes a PyTorch checkpoint (.pth/.pt/.bin/.safetensors, authors' or timm
layout, bare or wrapped), a weight file written by this project, or a ``train.py`` run (its
workdir, checkpoints folder or one step folder), local or in a bucket (``gs://...``), and returns
the model, class count and parameters.
Whatever the source, the parameters go through ``convert_state_dict`` in timm's key space: the
variant is recognised (or checked) from the shapes and the classifier is kept, dropped or refused
there, so every reader applies the same checks and says the same things.

``load_pretrained(name)`` is the same for published weights by name (``pretrained.resolve_tag``):
downloaded (``hub``) from the Hugging Face Hub or the authors' release, then read as a file.

Weight sets (``ema``): a timm ``CheckpointSaver`` file has the raw weights and, with
``--model-ema``, the EMA ones; None takes the raw ones, as timm's ``validate.py`` does (the EMA ones
only when the file has no raw ones), True / False force one. A ``train.py`` run: None takes the EMA
weights when the run kept them (what the run itself evaluated), True / False force one.
``LoadedWeights.weight_set`` says which set was read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np
from etils import epath

from mambaout_jax import storage
from mambaout_jax.convert.convert import convert_state_dict
from mambaout_jax.convert.hub import download_hub, download_release
from mambaout_jax.convert.mapping import flax_to_torch
from mambaout_jax.convert.pretrained import PRETRAINED_SOURCES, looks_like_tag, resolve_tag
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
    tag: str | None = None  # the published weights' timm name ('mambaout_tiny.in1k'), for load_pretrained

    def describe(self) -> str:
        """One line for the tools: where the weights came from and which set."""
        what = f"{self.tag} ({self.source})" if self.tag else self.source
        return f"{what}: {self.model}, {self.num_classes} classes, weight set: {self.weight_set or 'the only one'}"


def load_weights(
    source: str | os.PathLike,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    ema: bool | None = None,
) -> LoadedWeights:
    """Read any supported weight source (see the module docstring), strictly checked.

    ``model`` (a variant, optionally ``variant.tag``) is checked against the source; by default it is
    recognised from the shapes (files) or read from the run's record (runs). ``num_classes`` defaults
    to the source's; 0 drops its classifier; another count is an error that says how to load it.
    ``ema`` picks the weight set (module docstring).
    """
    try:
        path = storage.as_path(source, "weights")
        storage.check_place("weights", source)  # a missing or forbidden bucket, named as such
        is_run = path.is_dir()
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    asked = get_model_spec(model).name if model is not None else None
    if is_run:
        return _load_run(path, asked, num_classes, ema)
    kind, tensors, metadata = read_weights(path, ema=ema)
    if kind == "torch":
        found, classes, params = convert_state_dict(tensors, model=asked, num_classes=num_classes, source=str(path))
        return LoadedWeights(found, classes, params, str(path), weight_set=metadata.get("weight_set"))
    if ema:
        raise CheckpointError(f"{path}: a mambaout_jax weight file holds one weight set; load it without --ema (ema=None)")
    saved = metadata.get("model", "")
    if saved not in MODELS:
        what = f"names the unknown model {saved!r}" if saved else "names no model"
        raise CheckpointError(
            f"{path}: a mambaout_jax weight file whose metadata {what}; known models: {', '.join(MODELS)}. "
            "The file is damaged or was written by another version of this project"
        )
    return _from_contract(tensors, saved, asked, num_classes, str(path))


def load_pretrained(
    name: str, *, source: str = "hub", num_classes: int | None = None, ema: bool | None = None
) -> LoadedWeights:
    """Published weights by name (``pretrained.resolve_tag``), from the cache or downloaded into it.

    ``source``: 'hub' (timm's files on the Hugging Face Hub) or 'release' (the authors' GitHub
    release, the five paper models). The tag's variant is checked against the file's shapes.
    """
    if source not in PRETRAINED_SOURCES:
        raise ValueError(f"unknown pretrained source {source!r}; use one of {', '.join(PRETRAINED_SOURCES)}")
    weights = resolve_tag(name)
    path = download_hub(weights) if source == "hub" else download_release(weights)
    loaded = load_weights(path, model=weights.model, num_classes=num_classes, ema=ema)
    if num_classes is None and loaded.num_classes != weights.num_classes:
        raise CheckpointError(
            f"{path}: {weights.tag} should have a {weights.num_classes}-class head (timm's pretrained_cfg), "
            f"but the file has {loaded.num_classes} classes; the download is not {weights.tag}'s weights"
        )
    return dataclasses.replace(loaded, tag=weights.tag)


def load_source(
    weights: str | os.PathLike | None = None,
    pretrained: str | None = None,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    ema: bool | None = None,
    pretrained_source: str = "hub",
) -> LoadedWeights:
    """The command lines' ``--weights PATH`` or ``--pretrained TAG`` (exactly one of them)."""
    if (weights is None) == (pretrained is None):
        raise ValueError("give either --weights PATH or --pretrained TAG (one of them)")
    if pretrained is not None:
        loaded = load_pretrained(pretrained, source=pretrained_source, num_classes=num_classes, ema=ema)
        if model is not None and get_model_spec(model).name != loaded.model:
            raise CheckpointError(f"--pretrained {pretrained} holds {loaded.model} weights, not {model}")
        return loaded
    return load_weights(weights, model=model, num_classes=num_classes, ema=ema)


def is_pretrained_name(pretrained: str | os.PathLike) -> bool:
    """Whether a ``pretrained=`` value names published weights rather than a file or run.

    A path that exists wins (a file may well be called ``mambaout_tiny.in1k``); ``gs://`` is a path.
    """
    if not isinstance(pretrained, str) or storage.is_gcs(pretrained) or os.path.exists(pretrained):
        return False
    return looks_like_tag(pretrained)


def _load_run(path: epath.Path, asked: str | None, num_classes: int | None, ema: bool | None) -> LoadedWeights:
    step_dir = find_step_dir(path)
    meta = read_meta(step_dir)
    saved = meta.get("model")
    if not saved and asked is None:
        raise CheckpointError(
            f"{step_dir}: the checkpoint records no model name (no meta/ item with a 'model' entry); "
            "pass the variant it was trained as: --model NAME (model=NAME)"
        )
    weight_set, params = read_run_params(step_dir, ema=ema)
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
