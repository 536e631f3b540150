"""MambaOut-Femto: the authors' ImageNet-1k recipe (300 + 10 epochs, batch 4096, drop path 0.025)."""

from mambaout_jax.train.recipe import paper_model_config


def get_config():
    return paper_model_config("mambaout_femto", drop_path_rate=0.025)
