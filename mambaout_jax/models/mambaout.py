"""MambaOut (Yu & Wang, 2024) in Flax NNX, channels-last, module for module after timm's mambaout.py.

The attribute names (``stem.conv1``, ``stages[s].downsample``, ``stages[s].blocks[b].fc1``,
``head.pre_logits.fc``, ...) are timm's, so every parameter path equals its timm ``state_dict`` key
with '.' -> '/' and ``weight`` -> ``kernel``/``scale``: that is the project's parameter contract.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mambaout_jax.models.layers import (
    Conv2d,
    ConvImpl,
    DepthwiseConv2d,
    DepthwiseImpl,
    DropPath,
    Dropout,
    LayerNorm,
    LayerScale,
    Linear,
    dense,
    fold_in,
    gelu,
    get_activation,
)


@dataclasses.dataclass(frozen=True)
class MambaOutConfig:
    """Architecture hyper-parameters of one MambaOut variant (timm's registrations)."""

    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 576)
    expansion_ratio: float = 8 / 3
    conv_ratio: float = 1.0
    kernel_size: int = 7
    act: Literal["gelu", "silu"] = "gelu"
    stem_mid_norm: bool = True
    downsample: Literal["conv", "conv_nf"] = "conv"
    ls_init_value: float | None = None
    head: Literal["mlp", "norm_mlp"] = "mlp"
    head_mlp_ratio: int = 4

    def __post_init__(self):
        if len(self.depths) != len(self.dims) or not self.depths:
            raise ValueError(f"depths {self.depths} and dims {self.dims} must be non-empty and equally long")
        if self.downsample not in ("conv", "conv_nf"):
            raise ValueError(f"downsample must be 'conv' or 'conv_nf', got {self.downsample!r}")
        if self.head not in ("mlp", "norm_mlp"):
            raise ValueError(f"head must be 'mlp' or 'norm_mlp', got {self.head!r}")
        get_activation(self.act)

    def hidden_dim(self, dim: int) -> int:
        return int(self.expansion_ratio * dim)

    def conv_channels(self, dim: int) -> int:
        return int(self.conv_ratio * dim)

    @property
    def head_hidden_dim(self) -> int:
        return int(self.head_mlp_ratio * self.dims[-1])


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Linear from 0 to ``rate`` over all blocks, split per stage (timm: float32 torch.linspace)."""
    flat = np.linspace(0.0, rate, sum(depths), dtype=np.float32).tolist()
    out, start = [], 0
    for d in depths:
        out.append(flat[start : start + d])
        start += d
    return out


class Stem(nnx.Module):
    """conv3x3/2 -> [LN] -> act -> conv3x3/2 -> LN: 224 -> 56, 3 -> dims[0] channels."""

    def __init__(
        self, in_chans: int, out_chans: int, *, mid_norm: bool, act: str, conv_impl: ConvImpl, dtype, rngs: nnx.Rngs
    ):
        self.conv1 = Conv2d(in_chans, out_chans // 2, impl=conv_impl, dtype=dtype, rngs=rngs)
        self.norm1 = LayerNorm(out_chans // 2, dtype=dtype, rngs=rngs) if mid_norm else None
        self.act = get_activation(act)
        self.conv2 = Conv2d(out_chans // 2, out_chans, impl=conv_impl, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(out_chans, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("stem"):
            x = self.conv1(x)
            if self.norm1 is not None:
                x = self.norm1(x)
            x = self.act(x)
            return self.norm2(self.conv2(x))


class Downsample(nnx.Module):
    """Paper variants: conv3x3/2 then LN over the new channels."""

    def __init__(self, in_chans: int, out_chans: int, *, conv_impl: ConvImpl, dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(in_chans, out_chans, impl=conv_impl, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(out_chans, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("downsample"):
            return self.norm(self.conv(x))


class DownsampleNormFirst(nnx.Module):
    """``_rw`` variants: LN over the incoming channels, then conv3x3/2."""

    def __init__(self, in_chans: int, out_chans: int, *, conv_impl: ConvImpl, dtype, rngs: nnx.Rngs):
        self.norm = LayerNorm(in_chans, dtype=dtype, rngs=rngs)
        self.conv = Conv2d(in_chans, out_chans, impl=conv_impl, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("downsample"):
            return self.conv(self.norm(x))


class GatedCNNBlock(nnx.Module):
    """x + DropPath(LayerScale(fc2(act(g) * [i, dwconv(c)]))), [g|i|c] = fc1(LN(x)).

    Each part runs under a ``jax.named_scope`` (norm, fc1, dwconv, gate, fc2, residual) that the
    compiled program's op names keep, which is how ``mambaout_jax.plan.breakdown`` attributes
    the train step's bytes and FLOPs to model parts.

    The depthwise conv runs on only ``conv_ratio * dim`` channels (timm's ``GatedConvBlock``);
    the split sizes (h, h - k, k) can be odd, e.g. (341, 213, 128) in base's first stage.
    """

    def __init__(
        self,
        dim: int,
        *,
        config: MambaOutConfig,
        drop_path: float,
        dw_impl: DepthwiseImpl,
        dtype,
        rngs: nnx.Rngs,
    ):
        hidden = config.hidden_dim(dim)
        conv_channels = config.conv_channels(dim)
        if not 0 < conv_channels <= hidden:
            raise ValueError(f"conv channels {conv_channels} must be in (0, hidden={hidden}]")
        self.split_sizes = (hidden, hidden - conv_channels, conv_channels)
        self.norm = LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.fc1 = Linear(dim, 2 * hidden, dtype=dtype, rngs=rngs)
        self.act = get_activation(config.act)
        self.conv = DepthwiseConv2d(conv_channels, kernel_size=config.kernel_size, impl=dw_impl, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(hidden, dim, dtype=dtype, rngs=rngs)
        self.ls = LayerScale(dim, config.ls_init_value) if config.ls_init_value is not None else None
        self.drop_path = DropPath(drop_path)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        shortcut = x
        h, i_size, _ = self.split_sizes
        with jax.named_scope("norm"):
            y = self.norm(x)
        with jax.named_scope("fc1"):
            # fc1 as two products, g and [i | c] (column blocks of timm's one fc1): each lands in
            # its own lane-aligned buffer instead of being sliced out of one 2h-wide result, and
            # [i | c] goes to the depthwise conv whole (passthrough=i), so [i, conv(c)] is never
            # concatenated. Same dot products, same numbers; bytes saved: docs/TPU_PLANNING.md.
            g = dense(y, self.fc1.kernel[...][:, :h], self.fc1.bias[...][:h], self.fc1.dtype)
            ic = dense(y, self.fc1.kernel[...][:, h:], self.fc1.bias[...][h:], self.fc1.dtype)
        with jax.named_scope("dwconv"):
            ic = self.conv(ic, passthrough=i_size)  # [i, dwconv(c)]
        with jax.named_scope("gate"):
            y = self.act(g) * ic
        with jax.named_scope("fc2"):
            y = self.fc2(y)
        with jax.named_scope("residual"):
            if self.ls is not None:
                y = self.ls(y)
            return shortcut + self.drop_path(y, key)


class MambaOutStage(nnx.Module):
    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        *,
        config: MambaOutConfig,
        downsample: bool,
        drop_path: Sequence[float],
        dw_impl: DepthwiseImpl,
        conv_impl: ConvImpl,
        dtype,
        rngs: nnx.Rngs,
    ):
        if downsample:
            cls = Downsample if config.downsample == "conv" else DownsampleNormFirst
            self.downsample = cls(in_dim, dim, conv_impl=conv_impl, dtype=dtype, rngs=rngs)
        else:
            if in_dim != dim:
                raise ValueError(f"a stage without downsample keeps its width, got {in_dim} -> {dim}")
            self.downsample = None
        self.blocks = nnx.List(
            [
                GatedCNNBlock(dim, config=config, drop_path=drop_path[b], dw_impl=dw_impl, dtype=dtype, rngs=rngs)
                for b in range(depth)
            ]
        )

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        for b, block in enumerate(self.blocks):
            with jax.named_scope(f"blocks_{b}"):
                x = block(x, None if key is None else fold_in(key, b))
        return x


class PreLogits(nnx.Module):
    """fc(C -> 4C) -> GELU -> [LN(4C)]; the LN exists in the paper head ('mlp') only."""

    def __init__(self, in_features: int, hidden: int, *, with_norm: bool, dtype, rngs: nnx.Rngs):
        self.fc = Linear(in_features, hidden, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(hidden, dtype=dtype, rngs=rngs) if with_norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(self.fc(x))
        if self.norm is not None:
            x = self.norm(x)
        return x


class MlpHead(nnx.Module):
    """mean over H, W -> LN -> PreLogits -> Dropout -> fc. The head always uses exact GELU."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        config: MambaOutConfig,
        drop_rate: float,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.num_features = config.head_hidden_dim
        self.norm = LayerNorm(in_features, dtype=dtype, rngs=rngs)
        self.pre_logits = PreLogits(
            in_features, self.num_features, with_norm=config.head == "mlp", dtype=dtype, rngs=rngs
        )
        self.head_dropout = Dropout(drop_rate)
        self.fc = Linear(self.num_features, num_classes, dtype=dtype, rngs=rngs) if num_classes > 0 else None

    def __call__(self, x: jax.Array, key: jax.Array | None = None, *, pre_logits: bool = False) -> jax.Array:
        with jax.named_scope("head"):
            x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
            x = self.pre_logits(self.norm(x))
            x = self.head_dropout(x, key)
            if pre_logits or self.fc is None:
                return x
            return self.fc(x)


class MambaOut(nnx.Module):
    """MambaOut image classifier on NHWC float input (already normalised).

    ``dw_conv_impl`` and ``conv_impl`` choose how the depthwise and the dense (stem, downsample)
    convolutions are computed; 'auto' picks by backend, every form computes the same numbers.
    The model is built in inference mode. ``model.train()`` switches on drop path and head dropout
    (then ``model(x, key=...)`` needs a PRNG key: one for the batch, or one per sample, shape
    ``(batch,)``, which makes every sample's draws independent of the batch it is in);
    ``model.eval()`` switches them off again.
    Outputs are float32 whatever the compute ``dtype``.
    """

    def __init__(
        self,
        config: MambaOutConfig,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        dtype=jnp.float32,
        dw_conv_impl: DepthwiseImpl = "auto",
        conv_impl: ConvImpl = "auto",
        rngs: nnx.Rngs,
    ):
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no classifier), got {num_classes}")
        self.config = config
        self.num_classes = num_classes
        self.dtype = dtype
        self.stem = Stem(
            in_chans,
            config.dims[0],
            mid_norm=config.stem_mid_norm,
            act=config.act,
            conv_impl=conv_impl,
            dtype=dtype,
            rngs=rngs,
        )
        dp_rates = drop_path_rates(drop_path_rate, config.depths)
        stages, prev = [], config.dims[0]
        for s, (depth, dim) in enumerate(zip(config.depths, config.dims)):
            stages.append(
                MambaOutStage(
                    prev,
                    dim,
                    depth,
                    config=config,
                    downsample=s > 0,
                    drop_path=dp_rates[s],
                    dw_impl=dw_conv_impl,
                    conv_impl=conv_impl,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
            prev = dim
        self.stages = nnx.List(stages)
        self.head = MlpHead(prev, num_classes, config=config, drop_rate=drop_rate, dtype=dtype, rngs=rngs)
        self.eval()

    @property
    def feature_info(self) -> list[dict]:
        """Channels and stride of each stage's output (timm's ``feature_info``)."""
        return [dict(num_chs=d, reduction=4 * 2**s, module=f"stages.{s}") for s, d in enumerate(self.config.dims)]

    def forward_intermediates(
        self, x: jax.Array, key: jax.Array | None = None, *, indices: Sequence[int] | None = None
    ) -> tuple[jax.Array, list[jax.Array]]:
        """Final features and the NHWC output of the selected stages (strides 4, 8, 16, 32)."""
        take = range(len(self.stages)) if indices is None else indices
        x = self.stem(x)
        features = []
        for s, stage in enumerate(self.stages):
            with jax.named_scope(f"stages_{s}"):
                x = stage(x, None if key is None else fold_in(key, s))
            if s in take:
                features.append(x)
        return x, features

    def forward_features(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return self.forward_intermediates(x, key, indices=())[0]

    def forward_head(self, x: jax.Array, key: jax.Array | None = None, *, pre_logits: bool = False) -> jax.Array:
        head_key = None if key is None else fold_in(key, len(self.stages))
        return self.head(x, head_key, pre_logits=pre_logits).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Logits (or pre-logits features when ``num_classes == 0``), float32."""
        return self.forward_head(self.forward_features(x, key), key)
