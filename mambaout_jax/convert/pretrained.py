"""The published MambaOut weights by name: timm 1.0.31's 12 pretrained tags and the authors' release.

``PRETRAINED`` is timm's ``default_cfgs`` of ``timm/models/mambaout.py`` (1.0.31), copied here at
development time so that nothing imports timm at run time: the Hugging Face Hub repository of each
tag (``hf_hub_id='timm/'`` there, i.e. ``timm/<model>.<tag>``) and its eval settings (input size,
crop_pct, crop mode, class count). ``tests/test_hub.py`` checks the table against the installed
timm's ``default_cfgs`` and against ``models.registry`` (whose ``get_model_spec("model.tag")`` is what
preprocessing reads).

The five paper models have a second source: the authors' GitHub release
(``default_cfgs`` of ``models/mambaout.py`` in github.com/yuweihao/MambaOut:
``https://github.com/yuweihao/MambaOut/releases/download/model/mambaout_<name>.pth``). The authors
publish no checksums (their ``torch.hub.load_state_dict_from_url(..., check_hash=True)`` checks
nothing: the file names carry no hash prefix), so ``release_sha256`` is None for every entry; the
release download (``hub.download_release``) then records the SHA-256 of the first complete
download and checks the cached file against it on every later load. An entry given a published
hash is checked against it instead.
"""

from __future__ import annotations

import dataclasses

from mambaout_jax.models.registry import MODELS

HF_PREFIX = "hf-hub:"  # timm's spelling of a hub repository as a model name
RELEASE_URL = "https://github.com/yuweihao/MambaOut/releases/download/model"
# Where published weights download from: 'hub', timm's files on the Hugging Face Hub; 'release', the
# authors' GitHub release (the five paper models).
PRETRAINED_SOURCES = ("hub", "release")


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """One published weight set: where it lives and how it is evaluated (timm's pretrained_cfg)."""

    tag: str  # timm's full name, 'mambaout_tiny.in1k'
    input_size: int = 224
    test_input_size: int = 288
    crop_pct: float = 1.0
    test_crop_pct: float = 1.0
    crop_mode: str = "center"
    num_classes: int = 1000
    release_file: str | None = None  # the authors' release asset, for the paper models
    release_sha256: str | None = None  # a published SHA-256 of it (none are published)

    @property
    def model(self) -> str:
        return self.tag.partition(".")[0]

    @property
    def hf_hub_id(self) -> str:
        return f"timm/{self.tag}"


_TABLE = [
    # timm: "original weights" (converted from the authors' release)
    PretrainedWeights("mambaout_femto.in1k", release_file="mambaout_femto.pth"),
    PretrainedWeights("mambaout_kobe.in1k", release_file="mambaout_kobe.pth"),
    PretrainedWeights("mambaout_tiny.in1k", release_file="mambaout_tiny.pth"),
    PretrainedWeights("mambaout_small.in1k", release_file="mambaout_small.pth"),
    PretrainedWeights("mambaout_base.in1k", release_file="mambaout_base.pth"),
    # timm: "timm experiments"
    PretrainedWeights("mambaout_small_rw.sw_e450_in1k"),
    PretrainedWeights("mambaout_base_short_rw.sw_e500_in1k", crop_pct=0.95),
    PretrainedWeights("mambaout_base_tall_rw.sw_e500_in1k", crop_pct=0.95),
    PretrainedWeights("mambaout_base_wide_rw.sw_e500_in1k", crop_pct=0.95),
    PretrainedWeights("mambaout_base_plus_rw.sw_e150_in12k_ft_in1k"),
    PretrainedWeights(
        "mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k", input_size=384, test_input_size=384, crop_mode="squash"
    ),
    PretrainedWeights("mambaout_base_plus_rw.sw_e150_in12k", num_classes=11821),
]

PRETRAINED: dict[str, PretrainedWeights] = {w.tag: w for w in _TABLE}


def default_tag(model: str) -> str:
    """timm's default weights of a variant: the first tag its ``default_cfgs`` lists."""
    for tag in PRETRAINED:
        if tag.partition(".")[0] == model:
            return tag
    with_weights = sorted({w.model for w in _TABLE})
    raise ValueError(
        f"{model} has no published pretrained weights; variants with weights: {', '.join(with_weights)}"
    )


def resolve_tag(name: str) -> PretrainedWeights:
    """A published weight set by any of timm's spellings.

    ``mambaout_tiny`` (the variant's default tag, as ``timm.create_model(name, pretrained=True)``),
    ``mambaout_tiny.in1k``, ``timm/mambaout_tiny.in1k`` and ``hf-hub:timm/mambaout_tiny.in1k``.
    Anything else is an error listing the known tags.
    """
    tag = name[len(HF_PREFIX) :] if name.startswith(HF_PREFIX) else name
    if tag.startswith("timm/"):
        tag = tag[len("timm/") :]
    if "." not in tag and tag in MODELS:
        tag = default_tag(tag)
    if tag not in PRETRAINED:
        raise ValueError(f"unknown pretrained weights {name!r}; known tags: {', '.join(PRETRAINED)}")
    return PRETRAINED[tag]


def looks_like_tag(name: str) -> bool:
    """Whether a ``pretrained=`` string means a published tag rather than a path (checked after the path)."""
    if name.startswith(HF_PREFIX) or name.startswith("timm/"):
        return True
    return name.partition(".")[0] in MODELS
