"""Eval preprocessing, resolved in one place: model defaults < pretrained tag < overrides.

Every entry point that turns an image into model input for evaluation or prediction (``train()``'s
evaluation, ``eval.py``, prediction, the demo, the parity report) asks ``resolve_eval_preprocessing``
and gets one ``EvalPreprocessing``: the resize/crop of timm's eval transform *and* the
normalisation constants, which travel together.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mambaout_jax.data.transforms import CROP_MODES, ImageInput, check_interpolation, eval_transform
from mambaout_jax.models.registry import ModelSpec, get_model_spec


@dataclasses.dataclass(frozen=True)
class EvalPreprocessing:
    """timm's eval transform of a model: resize, crop, and the mean/std the model expects."""

    image_size: int = 224
    crop_pct: float = 1.0
    crop_mode: str = "center"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        if not (isinstance(self.image_size, int) and self.image_size > 0):
            raise ValueError(f"eval image size must be a positive int, got {self.image_size!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        check_interpolation(self.interpolation)

    def transform(self, image: ImageInput) -> np.ndarray:
        """An image (bytes, path or PIL) -> uint8 (image_size, image_size, 3), not yet normalised."""
        return eval_transform(
            image, size=self.image_size, crop_pct=self.crop_pct, interpolation=self.interpolation,
            crop_mode=self.crop_mode,
        )  # fmt: skip

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> float32 ``(x / 255 - mean) / std`` on the host (the steps do it on device)."""
        x = np.asarray(images, np.float32) / np.float32(255.0)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def resolve_eval_preprocessing(
    model: str | ModelSpec,
    *,
    image_size: int | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    interpolation: str | None = None,
) -> EvalPreprocessing:
    """The eval preprocessing of ``model`` (a variant or ``variant.tag``) with the given overrides.

    Precedence, lowest first: the variant's settings, the pretrained tag's (``mambaout_base_plus_rw.
    sw_e150_r384_in12k_ft_in1k``: 384 px, squash), then every override that is not None (a config
    field or a command-line flag).
    """
    spec = get_model_spec(model) if isinstance(model, str) else model
    ev = spec.eval
    return EvalPreprocessing(
        image_size=ev.input_size if image_size is None else image_size,
        crop_pct=ev.crop_pct if crop_pct is None else crop_pct,
        crop_mode=ev.crop_mode if crop_mode is None else crop_mode,
        interpolation=ev.interpolation if interpolation is None else interpolation,
        mean=tuple(ev.mean),
        std=tuple(ev.std),
    )
