"""Building blocks of MambaOut, written to compute exactly what timm's PyTorch layers compute.

Every module keeps float32 parameters and computes in a configurable ``dtype``; LayerNorm statistics
are always float32. Parameter names follow the project's one parameter contract (README, "The parameter contract"):
``kernel``/``bias`` for convolutions and linears, ``scale``/``bias`` for LayerNorm, ``gamma`` for
layer scale, so a parameter's path mirrors its timm ``state_dict`` key.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mambaout_jax.kernels import cpu as cpu_kernels

DepthwiseImpl = Literal["auto", "grouped", "shift"]
DEPTHWISE_IMPLS = ("auto", "grouped", "shift")


# timm's ``trunc_normal_(std=.02)`` has *absolute* bounds +-2, i.e. +-100 std, which float32 never
# reaches: a plain normal is the same distribution (and compiles far faster than an erfinv sampler).
weight_init = jax.nn.initializers.normal(stddev=0.02)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU as in PyTorch's ``nn.GELU()`` (JAX's default ``gelu`` is the tanh form).

    float32: PyTorch's own formula, ``x / 2 * (1 + erf(x / sqrt(2)))``. XLA:CPU emits erf as one
    rational polynomial where ``jax.nn.gelu``'s ``erfc`` takes two branches and an exp: CPU
    inference 1.24x (femto) and 1.12x (tiny) faster (benchmarks/RESULTS.md), the same numbers to
    float32 rounding, and bit-equal to PyTorch's more often. Narrower dtypes keep
    ``jax.nn.gelu``'s ``x / 2 * erfc(-x / sqrt(2))``: in bfloat16 ``1 + erf(x)`` cancels to
    nothing for negative x, erfc does not (and the TPU step stays as it was).
    """
    if x.dtype == jnp.float32:
        return x * 0.5 * (1.0 + jax.lax.erf(x * np.float32(np.sqrt(0.5))))
    return jax.nn.gelu(x, approximate=False)


def get_activation(name: str):
    """``gelu`` (exact, PyTorch's ``nn.GELU()``) or ``silu``."""
    if name == "gelu":
        return gelu
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"unknown activation {name!r}; expected 'gelu' or 'silu'")


# LayerNorm over the last (channel) axis, eps 1e-6 (timm's), float32 parameters and statistics.
# ``use_fast_variance=False``: flax's default one-pass E[x^2] - E[x]^2 drifts from PyTorch in fp32
# on activations with a large mean; E[(x - E[x])^2] is what torch computes.
LayerNorm = functools.partial(nnx.LayerNorm, epsilon=1e-6, param_dtype=jnp.float32, use_fast_variance=False)

# ``y = x @ kernel + bias`` on the last axis in the compute dtype; kernel (in, out) is torch's weight
# transposed; float32 parameters with timm's init.
Linear = functools.partial(
    nnx.Linear, param_dtype=jnp.float32, kernel_init=weight_init, bias_init=jax.nn.initializers.zeros
)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array, dtype) -> jax.Array:
    """``x @ kernel + bias`` on the last axis in ``dtype``: what ``Linear`` computes, for a column
    block of a ``Linear``'s parameters."""
    x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias


ConvImpl = Literal["auto", "xla", "im2col"]
CONV_IMPLS = ("auto", "xla", "im2col")


def resolve_conv_impl(impl: ConvImpl, backend: str | None = None) -> str:
    """'auto': im2col + matmul on CPU, XLA's convolution elsewhere.

    XLA:CPU hands its dot products to a fast library but, inside a loop (gradient accumulation,
    micro-batched inference), runs convolutions through a slow generic emitter: a femto train step
    spent most of its time in the five dense stride-2 convolutions. As one matmul over 9 strided
    slices they are dots like every other layer.
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown dense conv impl {impl!r}; expected one of {CONV_IMPLS}")
    if impl != "auto":
        return impl
    return "im2col" if (backend or jax.default_backend()) == "cpu" else "xla"


def conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """A dense convolution (NHWC, HWIO kernel) as one matmul over k*k strided slices of x."""
    k, _, cin, cout = kernel.shape
    _, h, w, _ = x.shape
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    patches = jnp.concatenate(
        [xp[:, i : i + span_h : stride, j : j + span_w : stride, :] for i in range(k) for j in range(k)], axis=-1
    )  # channel order (i, j, cin) matches the HWIO kernel flattened
    return jnp.dot(patches, kernel.reshape(k * k * cin, cout))


class Conv2d(nnx.Module):
    """Dense 3x3 convolution, NHWC/HWIO, with symmetric padding.

    Padding is explicit ``(pad, pad)`` on both spatial axes: XLA's ``'SAME'`` pads stride-2
    convolutions asymmetrically (0 before, 1 after) and gives different numbers from PyTorch.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 1,
        impl: ConvImpl = "auto",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.stride = stride
        self.padding = padding
        self.impl = resolve_conv_impl(impl)
        self.dtype = dtype
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(weight_init(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if self.impl == "im2col":
            y = conv_im2col(x, kernel, self.stride, self.padding)
        else:
            pad = ((self.padding, self.padding), (self.padding, self.padding))
            y = jax.lax.conv_general_dilated(
                x, kernel, (self.stride, self.stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
        return y + self.bias[...].astype(self.dtype)


def resolve_depthwise_impl(impl: DepthwiseImpl, backend: str | None = None) -> str:
    """'auto' picks the form that is fast on the backend that will run the model.

    On CPU, XLA's grouped convolution is ~19x slower than PyTorch while 49 fused shifted
    multiply-adds match it (benchmarks/RESULTS.md); on TPU and GPU the grouped convolution is the native path.
    """
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"unknown depthwise conv impl {impl!r}; expected one of {DEPTHWISE_IMPLS}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    return "shift" if backend == "cpu" else "grouped"


def depthwise_conv_grouped(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise 'same' convolution as XLA's grouped convolution; kernel (k, k, 1, C)."""
    k = kernel.shape[0]
    pad = k // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _shifted_sum(xp: jax.Array, kernel: jax.Array, h: int, w: int) -> jax.Array:
    """sum over (i, j) of xp[:, i:i+h, j:j+w, :] * kernel[i, j, 0, :] (one fused loop nest in XLA)."""
    k = kernel.shape[0]
    out = None
    for i in range(k):
        for j in range(k):
            term = xp[:, i : i + h, j : j + w, :] * kernel[i, j, 0, :]
            out = term if out is None else out + term
    return out


def _pad_same(x: jax.Array, k: int) -> jax.Array:
    pad = k // 2
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def depthwise_conv_shift(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, passthrough: int = 0
) -> jax.Array:
    """``[x[..., :p], conv(x[..., p:]) + bias]`` (p = passthrough): the depthwise 'same' convolution
    of the last channels of x, as a sum of k*k shifted, per-channel-scaled copies of them.

    On the CPU, one hand-written pass (``mambaout_jax/kernels``: no padded copy, no concatenate,
    2-3x XLA's form); elsewhere, or where the kernel is off, XLA's form: the k*k slices and
    multiply-adds fuse into one loop nest that vectorises over the channel axis. The gradient is
    written out (below) because autodiff of 49 slices keeps 49 padded cotangents alive: 10 GB of
    temporaries for a femto train step at batch 32 instead of under 4.
    """
    if bias is None:
        bias = jnp.zeros(kernel.shape[-1:], x.dtype)
    return _depthwise_shift(x, kernel, bias, passthrough)


def _shift_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, passthrough: int) -> jax.Array:
    if x.dtype == kernel.dtype == bias.dtype == jnp.float32 and cpu_kernels.depthwise_available(kernel.shape[0]):
        return jax.lax.platform_dependent(
            x,
            kernel,
            bias,
            cpu=functools.partial(cpu_kernels.depthwise_forward, passthrough=passthrough),
            default=functools.partial(_shift_forward_xla, passthrough=passthrough),
        )
    return _shift_forward_xla(x, kernel, bias, passthrough)


def _shift_forward_xla(x: jax.Array, kernel: jax.Array, bias: jax.Array, passthrough: int) -> jax.Array:
    _, h, w, _ = x.shape
    y = _shifted_sum(_pad_same(x[..., passthrough:], kernel.shape[0]), kernel, h, w) + bias
    return jnp.concatenate([x[..., :passthrough], y], axis=-1) if passthrough else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _depthwise_shift(x, kernel, bias, passthrough):
    return _shift_forward(x, kernel, bias, passthrough)


def _depthwise_shift_fwd(x, kernel, bias, passthrough):
    return _shift_forward(x, kernel, bias, passthrough), (x, kernel, bias)


def _depthwise_shift_bwd(passthrough, residuals, g):
    x, kernel, bias = residuals
    k = kernel.shape[0]
    # d/dx: the passed-through cotangent, and the same 'same' convolution of the convolved
    # channels' cotangent with the spatially flipped kernel (no bias).
    dx = _shift_forward(g, kernel[::-1, ::-1], jnp.zeros_like(bias), passthrough)
    gc = g[..., passthrough:]
    xp, g32 = _pad_same(x[..., passthrough:], k).astype(jnp.float32), gc.astype(jnp.float32)
    if cpu_kernels.depthwise_available(k):
        # On the CPU, one hand-written pass (mambaout_jax/kernels); elsewhere XLA's form below.
        dk = jax.lax.platform_dependent(
            xp, g32, cpu=cpu_kernels.depthwise_kernel_grad, default=_depthwise_kernel_grad_xla
        )
    else:
        dk = _depthwise_kernel_grad_xla(xp, g32)
    dbias = jnp.sum(g32, axis=(0, 1, 2))
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype), dbias.astype(bias.dtype)


def _depthwise_kernel_grad_xla(xp: jax.Array, g: jax.Array) -> jax.Array:
    """d/dkernel[i, j, c] = sum over batch and space of the (i, j)-shifted padded input times the
    cotangent, (k * k, C). One image at a time: the k*k products of an image stay in cache instead
    of k*k batch-sized temporaries (0.9 GB for femto's first stage at batch 32)."""
    _, h, w, c = g.shape
    k = xp.shape[1] - h + 1

    def accumulate(acc, image_and_cotangent):
        xi, gi = image_and_cotangent
        taps = [jnp.sum(xi[i : i + h, j : j + w, :] * gi, axis=(0, 1)) for i in range(k) for j in range(k)]
        return acc + jnp.stack(taps), None

    dk, _ = jax.lax.scan(accumulate, jnp.zeros((k * k, c), jnp.float32), (xp, g))
    return dk


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


def _with_identity_taps(kernel: jax.Array, passthrough: int) -> jax.Array:
    """``kernel`` (k, k, 1, C) preceded by ``passthrough`` channels whose only tap is the centre, 1."""
    k = kernel.shape[0]
    identity = jnp.zeros((k, k, 1, passthrough), kernel.dtype).at[k // 2, k // 2].set(1)
    return jnp.concatenate([identity, kernel], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv_grouped_passthrough(x: jax.Array, kernel: jax.Array, passthrough: int) -> jax.Array:
    """``[x[..., :p], conv(x[..., p:])]`` as one grouped convolution over all of x (p = passthrough).

    The first p channels get a kernel whose only tap is the centre with weight 1, so they come out
    exactly as they went in (x * 1 plus zeros, for finite x) and no slice of x nor concatenation
    of the result is ever materialised: on TPU every buffer keeps its 128-lane tiles whole. The
    gradient is written out because autodiff would differentiate the constant identity taps too
    (a kernel gradient over all channels, which the TPU compiler rejects once the constant part
    is sliced away); the kernel gradient is the plain depthwise one over the convolved channels.
    """
    return depthwise_conv_grouped(x, _with_identity_taps(kernel, passthrough))


def _passthrough_fwd(x, kernel, passthrough):
    return depthwise_conv_grouped_passthrough(x, kernel, passthrough), (x, kernel)


def _passthrough_bwd(passthrough, residuals, g):
    x, kernel = residuals
    # A 'same' correlation's input gradient is the correlation of g with the flipped kernel.
    dx = depthwise_conv_grouped(g, _with_identity_taps(kernel, passthrough)[::-1, ::-1])
    _, kernel_vjp = jax.vjp(lambda k: depthwise_conv_grouped(x[..., passthrough:], k), kernel)
    (dk,) = kernel_vjp(g[..., passthrough:])
    return dx, dk


depthwise_conv_grouped_passthrough.defvjp(_passthrough_fwd, _passthrough_bwd)


class DepthwiseConv2d(nnx.Module):
    """k x k depthwise convolution with bias ('same' padding, stride 1), two interchangeable forms.

    ``conv(x, passthrough=p)`` leaves the first p channels of x unchanged and convolves the rest
    (the Gated CNN block's ``[i, conv(c)]``): the grouped form does it in place, in one convolution
    over all channels (``depthwise_conv_grouped_passthrough``); the shift form, whose cost grows
    with the channels it touches, convolves only the last ones (``depthwise_conv_shift``: on the
    CPU one C++ pass writing both parts, elsewhere XLA's form and a concatenate).
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 7,
        impl: DepthwiseImpl = "auto",
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.channels = channels
        self.impl = resolve_depthwise_impl(impl)
        self.dtype = dtype
        shape = (kernel_size, kernel_size, 1, channels)
        self.kernel = nnx.Param(weight_init(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array, *, passthrough: int = 0) -> jax.Array:
        if x.shape[-1] != passthrough + self.channels:
            raise ValueError(f"expected {passthrough} + {self.channels} channels, got {x.shape[-1]}")
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        bias = self.bias[...].astype(self.dtype)
        if self.impl == "grouped" and passthrough:
            bias = jnp.concatenate([jnp.zeros((passthrough,), self.dtype), bias])
            return depthwise_conv_grouped_passthrough(x, kernel, passthrough) + bias
        if self.impl == "grouped":
            return depthwise_conv_grouped(x, kernel) + bias
        return depthwise_conv_shift(x, kernel, bias, passthrough)


class LayerScale(nnx.Module):
    """Per-channel residual-branch scale (timm's LayerScale); ``gamma`` mirrors timm's key."""

    def __init__(self, dim: int, init_value: float):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


def fold_in(key: jax.Array, data: int) -> jax.Array:
    """``jax.random.fold_in`` of one key, or of each key of a batch of per-sample keys."""
    if key.ndim == 0:
        return jax.random.fold_in(key, data)
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)


def _drop(x: jax.Array, rate: float, key: jax.Array, mask_shape: tuple[int, ...]) -> jax.Array:
    """Zero entries of ``x`` with probability ``rate`` (broadcast over ``mask_shape``), scale kept ones by 1/keep.

    ``key`` is one key for the whole batch, or one key per sample (shape ``(batch,)``): then each
    sample's mask depends on its own key only, so the draws do not change with how a batch is
    split into micro-batches or over devices.
    """
    keep = 1.0 - rate
    if key.ndim == 0:
        mask = jax.random.bernoulli(key, keep, mask_shape)
    else:
        if key.shape != x.shape[:1]:
            raise ValueError(f"per-sample keys {key.shape} do not match a batch of {x.shape[0]}")
        mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, mask_shape[1:]))(key)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def _per_sample(x: jax.Array) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.ndim - 1)


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Stochastic depth: zero the residual branch of whole samples, scale kept ones by 1/keep."""
    return _drop(x, rate, key, _per_sample(x))


class _RandomDrop(nnx.Module):
    """A drop with an explicit key, identity when ``deterministic`` (``model.eval()``)."""

    def __init__(self, rate: float, *, deterministic: bool = True):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{type(self).__name__} rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.deterministic = deterministic

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        if key is None:
            raise ValueError(f"{type(self).__name__} in train mode needs a PRNG key: call model(x, key=...)")
        return _drop(x, self.rate, key, self._mask_shape(x))


class DropPath(_RandomDrop):
    """Stochastic depth on a residual branch: whole samples dropped."""

    _mask_shape = staticmethod(_per_sample)


class Dropout(_RandomDrop):
    """Element-wise dropout."""

    _mask_shape = staticmethod(lambda x: x.shape)
