"""Key and tensor-layout mapping between PyTorch state_dicts and the project's parameter contract.

Three layouts meet here:
- the authors' (yuweihao/MambaOut): ``downsample_layers.S``, ``stages.S.B``, ``norm``, ``head.fc1``;
- timm's: ``stem``, ``stages.S.downsample``, ``stages.S.blocks.B``, ``head.pre_logits.fc``;
- ours: timm's key with '.' -> '/' and Flax leaf names, tensors channels-last.

The timm <-> contract table is derived from the Flax model itself (one entry per parameter), so it
cannot drift from the architecture; each entry names both keys and the tensor transform.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, Mapping

import numpy as np

from mambaout_jax.convert.torch_io import CheckpointError

Layout = Literal["timm", "authors"]

# Authors' key layout -> timm's, exactly timm's ``checkpoint_filter_fn`` (applied in this order).
_AUTHORS_RULES = (
    (re.compile(r"^downsample_layers\.0\."), "stem."),
    (re.compile(r"stages\.([0-9]+)\.([0-9]+)"), r"stages.\1.blocks.\2"),
    (re.compile(r"downsample_layers\.([0-9]+)"), r"stages.\1.downsample"),
)
_AUTHORS_HEAD = (("head.fc1.", "head.pre_logits.fc."), ("head.norm.", "head.pre_logits.norm."), ("head.fc2.", "head.fc."))


def detect_layout(state_dict: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> Layout:
    """'timm' or 'authors', from marker keys; a clear error for anything else."""
    if "stem.conv1.weight" in state_dict:
        return "timm"
    if "downsample_layers.0.conv1.weight" in state_dict:
        return "authors"
    sample = ", ".join(list(state_dict)[:5]) or "(no keys)"
    raise CheckpointError(
        f"{source}: not a MambaOut state_dict: it has neither 'stem.conv1.weight' (timm layout) nor "
        f"'downsample_layers.0.conv1.weight' (authors' layout); first keys: {sample}"
    )


def authors_to_timm(state_dict: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Rename an authors'-layout state_dict to timm's layout (tensors untouched)."""
    out, origin = {}, {}
    for key, value in state_dict.items():
        new = key
        for pattern, repl in _AUTHORS_RULES:
            new = pattern.sub(repl, new)
        if new.startswith("norm."):
            new = "head." + new  # the final norm runs after pooling, inside timm's head
        elif new.startswith("head."):
            for old, repl in _AUTHORS_HEAD:
                new = new.replace(old, repl)
        if new in out:
            raise CheckpointError(
                f"{source}: not a valid authors'-layout MambaOut state_dict: keys {origin[new]!r} and {key!r} "
                f"both become {new!r} in timm's layout (the file mixes the authors' and timm's key names)"
            )
        out[new] = value
        origin[new] = key
    return out


def to_timm_layout(state_dict: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> dict[str, np.ndarray]:
    if detect_layout(state_dict, source=source) == "authors":
        return authors_to_timm(state_dict, source=source)
    return dict(state_dict)


@dataclasses.dataclass(frozen=True)
class KeyMapping:
    """One parameter: its contract path, its timm key, and how the tensor is laid out in each."""

    path: str  # e.g. "stages/1/blocks/0/fc1/kernel"
    torch_key: str  # e.g. "stages.1.blocks.0.fc1.weight"
    kind: Literal["conv", "linear", "vector"]

    def to_flax(self, t: np.ndarray) -> np.ndarray:
        if self.kind == "conv":  # (O, I, kh, kw) -> (kh, kw, I, O); depthwise (C, 1, k, k) -> (k, k, 1, C)
            return np.ascontiguousarray(np.transpose(t, (2, 3, 1, 0)))
        if self.kind == "linear":  # (O, I) -> (I, O)
            return np.ascontiguousarray(t.T)
        return np.asarray(t)

    def to_torch(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "conv":
            return np.ascontiguousarray(np.transpose(a, (3, 2, 0, 1)))
        if self.kind == "linear":
            return np.ascontiguousarray(a.T)
        return np.asarray(a)

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "conv":
            kh, kw, i, o = flax_shape
            return (o, i, kh, kw)
        if self.kind == "linear":
            return tuple(reversed(flax_shape))
        return tuple(flax_shape)


def key_mapping(path: str, ndim: int) -> KeyMapping:
    """The timm key and layout of one contract path (``ndim`` of its Flax array)."""
    *module, leaf = path.split("/")
    if leaf == "kernel":
        kind, torch_leaf = ("conv" if ndim == 4 else "linear"), "weight"
    elif leaf == "scale":
        kind, torch_leaf = "vector", "weight"
    elif leaf in ("bias", "gamma"):
        kind, torch_leaf = "vector", leaf
    else:
        raise ValueError(f"parameter {path!r} has a leaf name the contract does not know: {leaf!r}")
    return KeyMapping(path, ".".join(module + [torch_leaf]), kind)


def mapping_table(flax_shapes: Mapping[str, tuple[int, ...]]) -> list[KeyMapping]:
    return [key_mapping(path, len(shape)) for path, shape in flax_shapes.items()]


def expected_torch_shapes(flax_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {m.torch_key: m.torch_shape(tuple(flax_shapes[m.path])) for m in mapping_table(flax_shapes)}


def torch_to_flax(
    timm_state_dict: Mapping[str, np.ndarray], flax_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """timm-layout state_dict -> contract params. The caller has checked keys and shapes match."""
    return {m.path: m.to_flax(timm_state_dict[m.torch_key]) for m in mapping_table(flax_shapes)}


def flax_to_torch(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Contract params -> timm-layout state_dict (numpy), loadable by timm with strict=True."""
    return {m.torch_key: m.to_torch(np.asarray(params[m.path])) for m in mapping_table({k: np.shape(v) for k, v in params.items()})}


def checkpoint_num_classes(timm_state_dict: Mapping[str, np.ndarray]) -> int:
    """Classes of the checkpoint's classifier; 0 when it has none (a pre-logits/backbone export)."""
    w = timm_state_dict.get("head.fc.weight")
    return int(np.shape(w)[0]) if w is not None and np.ndim(w) >= 1 else 0
