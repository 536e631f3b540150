"""Reading and writing weight files safely: PyTorch pickles (weights only), safetensors, our own format.

Nothing here executes code from a file: ``.pth``/``.pt``/``.bin`` go through
``torch.load(weights_only=True)`` and everything else through safetensors. The one global
unpickled beyond ``weights_only``'s own allow-list is ``argparse.Namespace``: the ``args`` entry of
timm's ``CheckpointSaver`` files (``last.pth.tar``, ``model_best.pth.tar``, ``checkpoint-<epoch>.pth.tar``
of timm 0.6.x -- the authors' ``train.py`` -- and 1.0.x), whose other entries (``optimizer``,
``amp_scaler``/``amp``, ``metric``, ``epoch``, ``version``, ``arch``) are plain containers and tensors. A file may be local
or a ``gs://`` object (read whole into memory). Every write is atomic (``storage.atomic_output``:
a temporary file renamed into place, or one object upload), so a failed conversion never leaves
a partial or clobbered output behind.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from mambaout_jax import storage

# Metadata key and value marking a safetensors file written by this project (flat contract params).
FORMAT_KEY = "format"
FLAX_FORMAT = "mambaout_jax.params.v1"


# Globals a timm CheckpointSaver file needs beyond torch.load(weights_only=True)'s own allow-list
# (timm/utils/checkpoint_saver.py ``_save``: ``save_state['args'] = self.args``, an argparse.Namespace).
TRAINING_CHECKPOINT_GLOBALS = (argparse.Namespace,)

# Where a wrapped checkpoint keeps each weight set, in the order timm's ``_get_state_dict``
# (timm/models/_helpers.py) looks: raw weights under 'state_dict' (CheckpointSaver) or 'model' (the
# authors' release, DeiT-style scripts), EMA weights under 'state_dict_ema' or 'model_ema'.
RAW_KEYS = ("state_dict", "model")
EMA_KEYS = ("state_dict_ema", "model_ema")


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message names the file and what is wrong with it."""


def _to_numpy(value, key: str, path: Path) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    import torch

    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
        value = value.float()
    return value.numpy()


def select_weight_set(obj, path, ema: bool | None = None) -> tuple[str | None, Mapping]:
    """``(set name, state_dict)`` of a loaded checkpoint: a bare state_dict, or one of its wrapped sets.

    ``ema``: None takes the raw weights (timm's ``validate.py``: ``load_checkpoint(use_ema=False)``)
    and the EMA weights only when the file has no raw ones; True the EMA set, False the raw set, each
    an error naming the keys found when the file lacks it. The set name is None for a bare state_dict.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state_dict (a mapping of tensors)")
    raw = next((k for k in RAW_KEYS if isinstance(obj.get(k), Mapping)), None)
    averaged = next((k for k in EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
    if raw is None and averaged is None:  # a bare state_dict
        if ema:
            raise CheckpointError(
                f"{path}: holds a single, bare state_dict (no {' / '.join(EMA_KEYS)} entry), so there are no EMA "
                "weights to choose; load it without --ema (ema=None)"
            )
        return None, obj
    found = ", ".join(repr(str(k)) for k in obj)
    if ema is None:
        key = raw or averaged
    elif ema:
        if averaged is None:
            raise CheckpointError(
                f"{path}: has no EMA weights (none of {', '.join(EMA_KEYS)}; found: {found}); load it with "
                "--no-ema (ema=False) or without --ema"
            )
        key = averaged
    else:
        if raw is None:
            raise CheckpointError(
                f"{path}: has only EMA weights (none of {', '.join(RAW_KEYS)}; found: {found}); load it with "
                "--ema (ema=True) or without --no-ema"
            )
        key = raw
    return key, obj[key]


def _strip_prefix(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop DistributedDataParallel's 'module.' prefix when every key carries it."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def read_safetensors(path: Path, data: bytes | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A safetensors file, from ``path`` (memory-mapped) or from its ``data`` read from a bucket."""
    import json

    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load

    try:
        if data is None:
            with safe_open(str(path), framework="numpy") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        else:
            header_size = int.from_bytes(data[:8], "little")
            metadata = dict(json.loads(data[8 : 8 + header_size]).get("__metadata__") or {})
            tensors = load(data)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, metadata


def read_torch_pickle(path: Path, data: bytes | None = None, *, ema: bool | None = None) -> tuple[str | None, dict[str, np.ndarray]]:
    """``(weight set, state_dict)`` of a PyTorch pickle; see ``select_weight_set`` for ``ema``."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: reading PyTorch pickles needs torch; install the extra: pip install 'mambaout-jax[torch]' "
            "(or convert the file to .safetensors first)"
        ) from None
    import pickle

    try:
        with torch.serialization.safe_globals(list(TRAINING_CHECKPOINT_GLOBALS)):
            obj = torch.load(str(path) if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice to drop weights_only; keep its one line naming the global.
        reason = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "WeightsUnpickler" in ln), str(e))
        raise CheckpointError(
            f"{path}: refused to unpickle (it is not a plain weights file, or it contains code; "
            f"only torch.load(weights_only=True) content, plus argparse.Namespace, is accepted): {reason}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    weight_set, sd = select_weight_set(obj, path, ema)
    not_tensors = [str(k) for k, v in sd.items() if not isinstance(v, (torch.Tensor, np.ndarray))]
    if not_tensors:
        where = f"its {weight_set!r} entry" if weight_set else "it"
        raise CheckpointError(
            f"{path}: {where} is not a state_dict: entries {not_tensors[:8]} are not tensors "
            f"(top-level keys found: {', '.join(repr(str(k)) for k in (obj if isinstance(obj, Mapping) else {}))})"
        )
    return weight_set, _strip_prefix({str(k): _to_numpy(v, str(k), path) for k, v in sd.items()})


def read_weights(
    path: str | os.PathLike, *, ema: bool | None = None
) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """Read a weight file, local or ``gs://``. Returns ``(kind, tensors, metadata)``; kind is 'flax' or 'torch'.

    'flax' means a safetensors file this project wrote (keys are contract paths); 'torch' means a
    PyTorch state_dict (authors' or timm layout), from a pickle or a safetensors file. A pickle's
    metadata has ``weight_set``: the entry its weights came from ('state_dict', 'state_dict_ema',
    'model', ...) when it wraps them; ``ema`` picks the set (``select_weight_set``). A safetensors
    file holds one set: ``ema=True`` is an error there.
    """
    try:
        path = storage.as_path(path, "weights")
        if not path.exists():
            raise CheckpointError(f"{path}: no such file")
        if path.is_dir():
            raise CheckpointError(f"{path}: is a directory, expected a weight file")
        # A bucket's object is read whole, once; a local file is opened by its readers (mmap).
        data = path.read_bytes() if storage.is_gcs(path) else None
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    if data is None:
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{path}: is empty")
        with open(path, "rb") as f:
            head = f.read(9)
    else:
        if not data:
            raise CheckpointError(f"{path}: is empty")
        head = data[:9]
    if head[8:9] == b"{":  # safetensors: u64 header length, then the JSON header
        if ema:
            raise CheckpointError(
                f"{path}: a safetensors file holds one weight set, so there are no EMA weights to choose; "
                "load it without --ema (ema=None)"
            )
        tensors, metadata = read_safetensors(path, data)
        if metadata.get(FORMAT_KEY) == FLAX_FORMAT:
            return "flax", tensors, metadata
        tensors = _strip_prefix(_unwrap_flat(tensors))
        return "torch", tensors, metadata
    if head.startswith(b"PK") or head.startswith(b"\x80"):  # torch zip archive / legacy pickle
        weight_set, tensors = read_torch_pickle(path, data, ema=ema)
        return "torch", tensors, ({"weight_set": weight_set} if weight_set else {})
    raise CheckpointError(f"{path}: neither a PyTorch checkpoint (.pth/.pt/.bin) nor a safetensors file")


def _unwrap_flat(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A safetensors file saved from {"model": sd} flattens to 'model.<key>' names."""
    if tensors and all(k.startswith("model.") for k in tensors):
        return {k[len("model.") :]: v for k, v in tensors.items()}
    return tensors


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    try:
        with storage.atomic_output(path) as tmp:
            save_file(arrays, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None


def write_flax_weights(path: str | os.PathLike, params: Mapping[str, np.ndarray], *, model: str, num_classes: int) -> None:
    """Write contract params as this project's weight file (safetensors + identifying metadata)."""
    write_safetensors(
        path,
        params,
        {FORMAT_KEY: FLAX_FORMAT, "model": model, "num_classes": str(num_classes)},
    )
