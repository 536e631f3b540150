"""MambaOut-Tiny: the authors' ImageNet-1k recipe (300 + 10 epochs, batch 4096, drop path 0.2)."""

from mambaout_jax.train.recipe import paper_model_config


def get_config():
    return paper_model_config("mambaout_tiny", drop_path_rate=0.2)
