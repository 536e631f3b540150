"""Every MambaOut variant timm registers, with its architecture and its pretrained eval settings.

Like timm's registrations at the bottom of ``mambaout.py``: a variant is a name, a
``MambaOutConfig`` and the settings its published weights are evaluated with (timm's pretrained configs).
"""

from __future__ import annotations

import dataclasses

from mambaout_jax.models.mambaout import MambaOutConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """timm's pretrained cfg: how the published weights were evaluated."""

    input_size: int = 224
    test_input_size: int = 288
    crop_pct: float = 1.0
    test_crop_pct: float = 1.0
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    config: MambaOutConfig
    eval: EvalSettings
    pretrained_tags: tuple[str, ...] = ()
    # Pretrained tags whose eval settings differ from the variant's default ones.
    tag_eval: tuple[tuple[str, EvalSettings], ...] = ()


_PAPER = dict(stem_mid_norm=True, downsample="conv", ls_init_value=None, head="mlp")
# timm's "rw" variants. Layer scale starts at the registrations' 1e-6 (test_mambaout: 1e-4), the value
# the _rw weights were trained with; timm 1.0.31's GatedConvBlock drops it (LayerScale(dim): 1e-5).
_RW = dict(stem_mid_norm=False, downsample="conv_nf", ls_init_value=1e-6, head="norm_mlp")
_BASE_DIMS = (128, 256, 512, 768)
_RW_CROP = EvalSettings(crop_pct=0.95, test_crop_pct=1.0)

_SPECS = [
    ModelSpec("mambaout_femto", MambaOutConfig((3, 3, 9, 3), (48, 96, 192, 288), **_PAPER), EvalSettings(), ("in1k",)),
    ModelSpec("mambaout_kobe", MambaOutConfig((3, 3, 15, 3), (48, 96, 192, 288), **_PAPER), EvalSettings(), ("in1k",)),
    ModelSpec("mambaout_tiny", MambaOutConfig((3, 3, 9, 3), (96, 192, 384, 576), **_PAPER), EvalSettings(), ("in1k",)),
    ModelSpec("mambaout_small", MambaOutConfig((3, 4, 27, 3), (96, 192, 384, 576), **_PAPER), EvalSettings(), ("in1k",)),
    ModelSpec("mambaout_base", MambaOutConfig((3, 4, 27, 3), _BASE_DIMS, **_PAPER), EvalSettings(), ("in1k",)),
    ModelSpec(
        "mambaout_small_rw",
        MambaOutConfig((3, 4, 27, 3), (96, 192, 384, 576), **_RW),
        EvalSettings(),
        ("sw_e450_in1k",),
    ),
    ModelSpec(
        "mambaout_base_short_rw",
        MambaOutConfig((3, 3, 25, 3), _BASE_DIMS, expansion_ratio=3.0, conv_ratio=1.25, **_RW),
        _RW_CROP,
        ("sw_e500_in1k",),
    ),
    ModelSpec(
        "mambaout_base_tall_rw",
        MambaOutConfig((3, 4, 30, 3), _BASE_DIMS, expansion_ratio=2.5, conv_ratio=1.25, **_RW),
        _RW_CROP,
        ("sw_e500_in1k",),
    ),
    ModelSpec(
        "mambaout_base_wide_rw",
        MambaOutConfig((3, 4, 27, 3), _BASE_DIMS, expansion_ratio=3.0, conv_ratio=1.5, act="silu", **_RW),
        _RW_CROP,
        ("sw_e500_in1k",),
    ),
    ModelSpec(
        "mambaout_base_plus_rw",
        MambaOutConfig((3, 4, 30, 3), _BASE_DIMS, expansion_ratio=3.0, conv_ratio=1.5, act="silu", **_RW),
        EvalSettings(),
        ("sw_e150_in12k_ft_in1k", "sw_e150_r384_in12k_ft_in1k", "sw_e150_in12k"),
        tag_eval=(
            ("sw_e150_r384_in12k_ft_in1k", EvalSettings(input_size=384, test_input_size=384, crop_mode="squash")),
            ("sw_e150_in12k", EvalSettings(num_classes=11821)),
        ),
    ),
    ModelSpec(
        "test_mambaout",
        MambaOutConfig(
            (1, 1, 3, 1), (16, 32, 48, 64), expansion_ratio=3.0, act="silu", **{**_RW, "ls_init_value": 1e-4}
        ),
        EvalSettings(input_size=160, test_input_size=192),
    ),
]

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
PAPER_MODELS = ("mambaout_femto", "mambaout_kobe", "mambaout_tiny", "mambaout_small", "mambaout_base")


def list_models() -> list[str]:
    """Names of every registered variant, in timm's registration order."""
    return list(MODELS)


def get_model_spec(name: str) -> ModelSpec:
    """The spec of ``name``; accepts timm's ``name.tag`` form and picks that tag's eval settings."""
    base, _, tag = name.partition(".")
    if base not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    spec = MODELS[base]
    if tag:
        if tag not in spec.pretrained_tags:
            raise ValueError(f"unknown pretrained tag {tag!r} for {base}; known tags: {', '.join(spec.pretrained_tags)}")
        spec = dataclasses.replace(spec, eval=dict(spec.tag_eval).get(tag, spec.eval))
    return spec
