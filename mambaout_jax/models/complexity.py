"""Analytic compute cost of a MambaOut variant, by walking its config layer by layer.

Counting convention (written down because the paper's table depends on it):
- ``macs``: multiply-accumulates of every convolution and linear layer (biases not counted) for one
  image. This is what ``thop``/``ptflops`` report for convs and linears.
- ``layernorm_elements``: elements normalised by all LayerNorms. fvcore, whose counter the
  MetaFormer/MambaOut papers use, adds 5 ops per LayerNorm element (mean, variance, normalise,
  scale, shift); ``macs_fvcore = macs + 5 * layernorm_elements`` rounds to every value of the
  paper's ImageNet table, ``macs`` alone does not for femto and small.
Activations, the gating product, residual adds and pooling are not counted by either convention.
"""

from __future__ import annotations

from mambaout_jax.models.mambaout import MambaOutConfig

FVCORE_OPS_PER_LAYERNORM_ELEMENT = 5


def _conv_out(size: int, stride: int = 2, kernel: int = 3, pad: int = 1) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def compute_cost(config: MambaOutConfig, image_size: int = 224, num_classes: int = 1000, in_chans: int = 3) -> dict:
    """MACs and LayerNorm elements of one ``image_size`` x ``image_size`` image."""
    macs = 0
    ln = 0
    c0 = config.dims[0]
    h = _conv_out(image_size)
    macs += h * h * 9 * in_chans * (c0 // 2)  # stem.conv1
    if config.stem_mid_norm:
        ln += h * h * (c0 // 2)
    h = _conv_out(h)
    macs += h * h * 9 * (c0 // 2) * c0  # stem.conv2
    ln += h * h * c0
    prev = c0
    for s, (depth, dim) in enumerate(zip(config.depths, config.dims)):
        if s > 0:
            if config.downsample == "conv_nf":
                ln += h * h * prev
            h = _conv_out(h)
            macs += h * h * 9 * prev * dim
            if config.downsample == "conv":
                ln += h * h * dim
        hidden = config.hidden_dim(dim)
        conv_ch = config.conv_channels(dim)
        per_block = dim * 2 * hidden + conv_ch * config.kernel_size**2 + hidden * dim
        macs += depth * h * h * per_block
        ln += depth * h * h * dim
        prev = dim
    hidden = config.head_hidden_dim
    macs += prev * hidden + hidden * num_classes
    ln += prev + (hidden if config.head == "mlp" else 0)
    return {
        "macs": macs,
        "layernorm_elements": ln,
        "macs_fvcore": macs + FVCORE_OPS_PER_LAYERNORM_ELEMENT * ln,
        "flops": 2 * macs,
    }
