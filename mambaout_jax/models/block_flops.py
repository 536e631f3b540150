"""FLOPs of one Transformer block and one Gated CNN block: the paper's Eq. 6 and its long-sequence test.

For ``L`` tokens of width ``D``, a Transformer block (attention + MLP of ratio 4) costs

    FLOPs = 24 D^2 L  +  4 D L^2

(one multiply-add = 2 FLOPs; the linear term is the Q/K/V/output projections, 8 D^2 L, and the MLP,
16 D^2 L; the quadratic term is Q K^T and the attention-weighted sum of V, 2 D L^2 each). The
quadratic term overtakes the linear one when ``L > 6 D``: the paper's threshold for calling a task
"long-sequence", the case Mamba's linear-time token mixing is built for. A Gated CNN block has no
quadratic term at all. Norms, softmax, activations, the gate product and residual adds are not
counted (Eq. 6's convention, and fvcore's but for LayerNorm); what XLA counts on top of this is in
docs/FLOPS.md, and tests/test_flops.py checks every term here against XLA's own cost analysis.
"""

from __future__ import annotations

import dataclasses

from mambaout_jax.models.mambaout import MambaOutConfig


@dataclasses.dataclass(frozen=True)
class BlockFlops:
    """The FLOPs of one block for one sequence, split by how they grow with the sequence length."""

    linear: int  # grows with L: every product with a weight (projections, MLP, depthwise conv)
    quadratic: int  # grows with L^2: token-to-token products (attention scores and their weighted sum)

    @property
    def total(self) -> int:
        return self.linear + self.quadratic

    @property
    def quadratic_over_linear(self) -> float:
        """The paper's ratio ``4 D L^2 / (24 D^2 L) = L / (6 D)``: above 1, attention's L^2 dominates."""
        return self.quadratic / self.linear


def transformer_block_flops(seq_len: int, dim: int, mlp_ratio: float = 4.0) -> BlockFlops:
    """A pre-norm ViT block: multi-head self-attention (any head count: the FLOPs do not depend
    on it) and an MLP ``dim -> mlp_ratio * dim -> dim``."""
    hidden = int(mlp_ratio * dim)
    projections = 2 * seq_len * dim * (3 * dim) + 2 * seq_len * dim * dim  # Q, K, V; output
    mlp = 2 * seq_len * dim * hidden + 2 * seq_len * hidden * dim
    scores_and_mix = 2 * seq_len * seq_len * dim + 2 * seq_len * seq_len * dim  # Q K^T; softmax(.) V
    return BlockFlops(linear=projections + mlp, quadratic=scores_and_mix)


def gated_cnn_block_flops(
    seq_len: int,
    dim: int,
    expansion_ratio: float = 8 / 3,
    conv_ratio: float = 1.0,
    kernel_size: int = 7,
    *,
    image_shape: tuple[int, int] | None = None,
) -> BlockFlops:
    """MambaOut's block on ``seq_len = H * W`` tokens: fc1 ``dim -> 2 * hidden``, a depthwise
    ``kernel_size`` x ``kernel_size`` conv on ``conv_ratio * dim`` of the hidden channels, fc2
    ``hidden -> dim`` (``hidden = floor(expansion_ratio * dim)``, as timm's and the model's split).

    The conv counts every tap at every position (thop's and fvcore's convention, and
    ``complexity.py``'s), unless ``image_shape = (H, W)`` is given: then only the taps that land
    inside the image, which is what XLA counts (zero padding costs it nothing).
    """
    hidden = int(expansion_ratio * dim)
    conv_channels = int(conv_ratio * dim)
    fc = 2 * seq_len * dim * (2 * hidden) + 2 * seq_len * hidden * dim
    if image_shape is None:
        taps = seq_len * kernel_size**2
    else:
        height, width = image_shape
        if height * width != seq_len:
            raise ValueError(f"image_shape {image_shape} has {height * width} positions, not seq_len={seq_len}")
        taps = taps_inside(height, kernel_size) * taps_inside(width, kernel_size)
    return BlockFlops(linear=fc + 2 * conv_channels * taps, quadratic=0)


def taps_inside(size: int, kernel_size: int) -> int:
    """Kernel taps that land inside a ``size``-long axis, summed over its positions ('same' padding)."""
    half = kernel_size // 2
    return sum(min(i + half, size - 1) - max(i - half, 0) + 1 for i in range(size))


def long_sequence_threshold(dim: int, mlp_ratio: float = 4.0) -> int:
    """The token count above which a Transformer block's quadratic term is the larger: ``6 D`` at
    MLP ratio 4 (in general ``(2 + mlp_ratio) D``: linear ``(8 + 4 r) D^2 L`` = quadratic ``4 D L^2``)."""
    return round((2 + mlp_ratio) * dim)


def stage_tokens(config: MambaOutConfig, image_size: int = 224) -> list[tuple[int, int]]:
    """``(tokens, width)`` that each of a MambaOut's four stages mixes for one ``image_size`` image
    (the stem divides the side by 4, each downsample by 2, every stride-2 conv rounding up)."""
    side = image_size
    out = []
    for stage, dim in enumerate(config.dims):
        for _ in range(2 if stage == 0 else 1):
            side = (side + 2 - 3) // 2 + 1
        out.append((side * side, dim))
    return out
