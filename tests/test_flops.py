"""The paper's Eq. 6 (a Transformer block's FLOPs) and the Gated CNN block's, against XLA's cost analysis.

Each block is written in JAX, jitted, and XLA counts its FLOPs (``Lowered.cost_analysis()``: the HLO
as traced, before fusion, so the count is of the computation as written). The matrix products
and the depthwise convolution must match the analytic terms exactly; the full blocks (norms,
softmax, activations, residuals: what Eq. 6 leaves out) are fitted over several sequence lengths
to show what XLA adds and that none of it changes which block is quadratic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mambaout_jax.models import block_flops
from mambaout_jax.models.mambaout import GatedCNNBlock
from mambaout_jax.models.registry import get_model_spec


def xla_flops(fn, *args) -> int:
    return int(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def transformer_block(x, p, heads, *, full=True):
    """A pre-norm ViT block on (L, D) tokens; ``full=False`` keeps only the matrix products."""
    L, D = x.shape
    norm = (lambda v, s: (v - v.mean(-1, keepdims=True)) * jax.lax.rsqrt(v.var(-1, keepdims=True) + 1e-6) * s) if full else (lambda v, s: v)
    y = norm(x, p["ln1"])
    q, k, v = (t.reshape(L, heads, D // heads) for t in jnp.split(y @ p["qkv"], 3, axis=-1))
    scores = jnp.einsum("qhd,khd->hqk", q, k)
    if full:
        scores = jax.nn.softmax(scores * (D // heads) ** -0.5, axis=-1)
    mixed = jnp.einsum("hqk,khd->qhd", scores, v).reshape(L, D) @ p["proj"]
    x = x + mixed if full else mixed
    h = norm(x, p["ln2"]) @ p["fc1"]
    out = (jax.nn.gelu(h, approximate=False) if full else h) @ p["fc2"]
    return x + out if full else out


def transformer_params(D, mlp_ratio=4):
    z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731  (shapes are all XLA's count needs)
    return {"ln1": z(D), "ln2": z(D), "qkv": z(D, 3 * D), "proj": z(D, D), "fc1": z(D, mlp_ratio * D), "fc2": z(mlp_ratio * D, D)}


def gated_cnn_core(x, p, conv_channels):
    """The Gated CNN block's products only, on (H, W, D): fc1, depthwise conv on k channels, fc2."""
    y = x @ p["fc1"]
    hidden = p["fc2"].shape[0]
    g, i, c = jnp.split(y, [hidden, 2 * hidden - conv_channels], axis=-1)
    c = jax.lax.conv_general_dilated(
        c[None], p["dw"], (1, 1), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=conv_channels
    )[0]  # fmt: skip
    return jnp.concatenate([i, c], -1) @ p["fc2"]


@pytest.mark.parametrize("L, D, heads", [(196, 384, 6), (49, 768, 12), (1024, 96, 3)])
def test_transformer_matrix_products_are_eq6_exactly(L, D, heads):
    """24 D^2 L + 4 D L^2, to the FLOP, whatever the head count."""
    analytic = block_flops.transformer_block_flops(L, D)
    assert analytic.linear == 24 * D * D * L and analytic.quadratic == 4 * D * L * L
    x = jnp.zeros((L, D))
    assert xla_flops(lambda x, p: transformer_block(x, p, heads, full=False), x, transformer_params(D)) == analytic.total


@pytest.mark.parametrize("name, stage", [("mambaout_tiny", 0), ("mambaout_base", 0), ("mambaout_base_wide_rw", 2)])
def test_gated_cnn_products_match_exactly(name, stage):
    """fc1, the depthwise 7x7 and fc2. XLA counts only the conv taps inside the image (none of the
    zero padding): 1.6% fewer than 49 per position at 56 x 56, 10% fewer at 14 x 14."""
    config = get_model_spec(name).config
    side = int(np.sqrt(block_flops.stage_tokens(config)[stage][0]))
    D = config.dims[stage]
    hidden, k = config.hidden_dim(D), config.conv_channels(D)
    p = {"fc1": jnp.zeros((D, 2 * hidden)), "dw": jnp.zeros((7, 7, 1, k)), "fc2": jnp.zeros((hidden, D))}
    analytic = block_flops.gated_cnn_block_flops(side * side, D, config.expansion_ratio, config.conv_ratio, image_shape=(side, side))
    every_tap = block_flops.gated_cnn_block_flops(side * side, D, config.expansion_ratio, config.conv_ratio)
    assert analytic.quadratic == every_tap.quadratic == 0
    assert every_tap.linear - analytic.linear == 2 * k * (49 * side * side - (7 * side - 12) ** 2)
    assert xla_flops(lambda x, p: gated_cnn_core(x, p, k), jnp.zeros((side, side, D)), p) == analytic.total


def quadratic_fit(counts: dict[int, int]) -> np.ndarray:
    """Exact (a, b, c) of a + b L + c L^2 through three (L, count) points."""
    Ls = sorted(counts)
    A = np.array([[1, L, L * L] for L in Ls], dtype=np.float64)
    return np.linalg.solve(A, np.array([counts[L] for L in Ls], dtype=np.float64))


def test_what_xla_adds_to_a_full_transformer_block():
    """Norms, softmax, GELU and residuals on top of Eq. 6: XLA's L^2 coefficient is Eq. 6's 4 D plus a
    few operations per attention score and head (softmax's max, subtract, sum, divide, and the 1/sqrt(d)
    scaling); everything else it adds is linear in L, so the L > 6 D threshold is (nearly) XLA's too."""
    D, heads = 192, 3
    counts = {L: xla_flops(lambda x, p: transformer_block(x, p, heads), jnp.zeros((L, D)), transformer_params(D)) for L in (64, 128, 256)}
    a, b, c = quadratic_fit(counts)
    assert abs(a) < 1e-3 * counts[64]  # nothing independent of the sequence
    per_score = (c - 4 * D) / heads
    assert per_score == pytest.approx(5, abs=0.01)  # the scaling, max, subtract, sum, divide (exp: a transcendental)
    extra_linear = b - 24 * D * D  # per token: LayerNorms, GELU (erf as a polynomial), residuals
    assert 0 < extra_linear < 0.25 * 24 * D * D, extra_linear / (24 * D * D)
    for L, count in counts.items():
        assert count > block_flops.transformer_block_flops(L, D).total


def test_the_real_gated_cnn_block_adds_only_per_token_work():
    """The model's own GatedCNNBlock (LayerNorm, GELU, gate, biases, residual included): what XLA
    counts beyond the analytic products is a fixed amount per token, plus depthwise taps on however
    many extra channels the implementation convolves (a form that runs the identity channels
    through the same grouped conv counts them), never anything that grows faster than the tokens."""
    config = get_model_spec("mambaout_femto").config
    D = config.dims[1]
    block = GatedCNNBlock(D, config=config, drop_path=0.0, dw_impl="grouped", dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    forward = lambda state, x: nnx.merge(graphdef, state)(x)  # noqa: E731
    hidden, conv_channels = config.hidden_dim(D), config.conv_channels(D)

    def extra(side):
        products = block_flops.gated_cnn_block_flops(side * side, D, config.expansion_ratio, config.conv_ratio, image_shape=(side, side))
        return xla_flops(forward, state, jnp.zeros((1, side, side, D))) - products.total

    def taps(side):  # depthwise 7x7 taps inside a side x side image, per channel
        return block_flops.taps_inside(side, 7) ** 2

    # extra(side) = 2 * channels * taps(side) + per_token * side^2: solved at two sizes, checked at a third
    A = np.array([[2 * taps(s), s * s] for s in (8, 23)], np.float64)
    channels, per_token = np.linalg.solve(A, [extra(8), extra(23)])
    # XLA's count is a floating-point sum: a few FLOPs in 1e8 off the integer
    assert channels == pytest.approx(round(channels), abs=1e-3) and 0 <= round(channels) <= hidden - conv_channels
    assert per_token == pytest.approx(round(per_token), abs=1e-2)
    assert extra(14) == pytest.approx(2 * round(channels) * taps(14) + round(per_token) * 14 * 14, abs=8)
    products_per_token = block_flops.gated_cnn_block_flops(1, D, config.expansion_ratio, config.conv_ratio).linear
    assert 0 < per_token < 0.15 * products_per_token, per_token / products_per_token


def test_long_sequence_threshold_and_mambaouts_imagenet_tokens():
    """Eq. 6's break-even is L = 6 D, and at 224 px MambaOut's stages mix 56^2, 28^2, 14^2 and 7^2 tokens."""
    for D in (96, 384, 768):
        at = block_flops.transformer_block_flops(block_flops.long_sequence_threshold(D), D)
        assert at.quadratic == at.linear and at.quadratic_over_linear == 1.0
    assert block_flops.long_sequence_threshold(384) == 2304 and block_flops.long_sequence_threshold(768) == 4608
    tiny = get_model_spec("mambaout_tiny").config
    assert block_flops.stage_tokens(tiny) == [(3136, 96), (784, 192), (196, 384), (49, 576)]
    assert block_flops.stage_tokens(tiny, 288)[0] == (72 * 72, 96)
    ratios = [block_flops.transformer_block_flops(L, D).quadratic_over_linear for L, D in block_flops.stage_tokens(tiny)]
    assert ratios == pytest.approx([3136 / 576, 784 / 1152, 196 / 2304, 49 / 3456])
