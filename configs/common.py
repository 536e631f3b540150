"""The authors' ImageNet-1k recipe (their repository's train script), shared by the paper models' configs.

Every field and its recipe value is listed in ``mambaout_jax.train.recipe.recipe_config``, so
``--config.<field>=...`` overrides are checked against that set (the config is locked: a typo is an
error, not a silently ignored new key).
"""

from mambaout_jax.train.recipe import recipe_config


def get_config():
    return recipe_config()
