"""RandAugment with timm's op set, magnitude scaling and config strings (`rand-m9-mstd0.5-inc1`).

A port of timm/data/auto_augment.py (RandAugment part) that makes the same PIL calls with the same
arguments, so each op is pixel-identical to timm's for the same random draws. Two things differ on
purpose: randomness comes from an explicit `np.random.Generator` instead of Python's global
`random` (so grain can derive it from the example's position), and sampling (`sample`) is split
from applying (`apply_op`), so the op and magnitude distributions can be tested without images.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_LEVEL_DENOM = 10.0  # timm's 'M' scale: magnitude 10 is the strongest level of each op.
_DEFAULT_FILL = (128, 128, 128)
_RANDOM_INTERPOLATION = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)

# timm's `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS` (selected by `inc1`), in timm's
# order. 'Cutout' is absent in timm too: random erasing replaces it.
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)

# Ops whose PIL call resamples, and so draw an interpolation (timm's `_check_args_tf`).
_GEOMETRIC_OPS = frozenset(
    {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}
)


# --- the ops: same PIL calls as timm's ------------------------------------------------------------


def _affine(img, matrix, *, fill, resample):
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample,
                         fillcolor=fill)


def shear_x(img, factor, *, fill, resample):
    return _affine(img, (1, factor, 0, 0, 1, 0), fill=fill, resample=resample)


def shear_y(img, factor, *, fill, resample):
    return _affine(img, (1, 0, 0, factor, 1, 0), fill=fill, resample=resample)


def translate_x_rel(img, pct, *, fill, resample):
    return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill=fill, resample=resample)


def translate_y_rel(img, pct, *, fill, resample):
    return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill=fill, resample=resample)


def rotate(img, degrees, *, fill, resample):
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def auto_contrast(img, **_):
    return ImageOps.autocontrast(img)


def equalize(img, **_):
    return ImageOps.equalize(img)


def invert(img, **_):
    return ImageOps.invert(img)


def solarize(img, threshold, **_):
    return ImageOps.solarize(img, threshold)


def solarize_add(img, add, threshold=128, **_):
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    if img.mode == "RGB":
        return img.point(lut * 3)
    if img.mode == "L":
        return img.point(lut)
    return img


def posterize(img, bits_to_keep, **_):
    """ImageOps.posterize's lookup table, also for 0 bits (a black image).

    PosterizeIncreasing asks for 0 bits at magnitude 10, which `magnitude_std` reaches ~2% of the
    time at m9. Older Pillow's posterize returned black for 0 bits (its mask becomes 0); Pillow 13
    raises a ValueError instead, which crashes timm's own RandAugment there. We keep black, what
    the recipe was trained with.
    """
    if bits_to_keep >= 8:
        return img
    mask = ~(2 ** (8 - bits_to_keep) - 1)
    lut = [i & mask for i in range(256)]
    return img.point(lut * len(img.getbands()))


def color(img, factor, **_):
    return ImageEnhance.Color(img).enhance(factor)


def contrast(img, factor, **_):
    return ImageEnhance.Contrast(img).enhance(factor)


def brightness(img, factor, **_):
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img, factor, **_):
    return ImageEnhance.Sharpness(img).enhance(factor)


# --- magnitude -> op argument: timm's LEVEL_TO_ARG ---------------------------------------------
# `negate` is the random sign timm draws inside `_randomly_negate` (-v with probability 1/2).


def _rotate_arg(level, negate, hp):
    degrees = (level / _LEVEL_DENOM) * 30.0
    return -degrees if negate else degrees


def _enhance_arg(level, negate, hp):
    return (level / _LEVEL_DENOM) * 1.8 + 0.1


def _enhance_increasing_arg(level, negate, hp):
    level = (level / _LEVEL_DENOM) * 0.9
    return max(0.1, 1.0 + (-level if negate else level))


def _shear_arg(level, negate, hp):
    factor = (level / _LEVEL_DENOM) * 0.3
    return -factor if negate else factor


def _translate_rel_arg(level, negate, hp):
    pct = (level / _LEVEL_DENOM) * hp["translate_pct"]
    return -pct if negate else pct


def _posterize_arg(level, negate, hp):
    return int((level / _LEVEL_DENOM) * 4)


def _posterize_increasing_arg(level, negate, hp):
    return 4 - _posterize_arg(level, negate, hp)


def _solarize_arg(level, negate, hp):
    return min(256, int((level / _LEVEL_DENOM) * 256))


def _solarize_increasing_arg(level, negate, hp):
    return 256 - _solarize_arg(level, negate, hp)


def _solarize_add_arg(level, negate, hp):
    return min(128, int((level / _LEVEL_DENOM) * 110))


_OPS: dict[str, tuple[Callable, Callable | None]] = {
    "AutoContrast": (auto_contrast, None),
    "Equalize": (equalize, None),
    "Invert": (invert, None),
    "Rotate": (rotate, _rotate_arg),
    "Posterize": (posterize, _posterize_arg),
    "PosterizeIncreasing": (posterize, _posterize_increasing_arg),
    "Solarize": (solarize, _solarize_arg),
    "SolarizeIncreasing": (solarize, _solarize_increasing_arg),
    "SolarizeAdd": (solarize_add, _solarize_add_arg),
    "Color": (color, _enhance_arg),
    "ColorIncreasing": (color, _enhance_increasing_arg),
    "Contrast": (contrast, _enhance_arg),
    "ContrastIncreasing": (contrast, _enhance_increasing_arg),
    "Brightness": (brightness, _enhance_arg),
    "BrightnessIncreasing": (brightness, _enhance_increasing_arg),
    "Sharpness": (sharpness, _enhance_arg),
    "SharpnessIncreasing": (sharpness, _enhance_increasing_arg),
    "ShearX": (shear_x, _shear_arg),
    "ShearY": (shear_y, _shear_arg),
    "TranslateXRel": (translate_x_rel, _translate_rel_arg),
    "TranslateYRel": (translate_y_rel, _translate_rel_arg),
}


def op_argument(name: str, level: float, negate: bool, translate_pct: float = 0.45):
    """The argument timm passes to op `name` at magnitude `level` (None for argument-free ops);
    `negate` is timm's random sign for the ops that have one."""
    _, level_fn = _OPS[name]
    return None if level_fn is None else level_fn(level, negate, {"translate_pct": translate_pct})


@dataclasses.dataclass(frozen=True)
class SampledOp:
    """One op as RandAugment decided to apply it: name, argument, and interpolation if any."""

    name: str
    arg: float | int | None
    resample: Image.Resampling | None


def apply_op(img: Image.Image, op: SampledOp, fill=_DEFAULT_FILL) -> Image.Image:
    fn, _ = _OPS[op.name]
    args = () if op.arg is None else (op.arg,)
    return fn(img, *args, fill=fill, resample=op.resample)


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment: `num_layers` ops drawn uniformly with replacement, each applied with
    probability `prob`, at a magnitude drawn from N(magnitude, magnitude_std) clipped to
    [0, magnitude_max] (uniform on [0, magnitude] if magnitude_std is inf)."""

    ops: tuple[str, ...] = RAND_INCREASING_TRANSFORMS
    num_layers: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    magnitude_max: float = _LEVEL_DENOM
    prob: float = 0.5
    fill: tuple[int, int, int] = _DEFAULT_FILL
    resample: tuple[Image.Resampling, ...] = _RANDOM_INTERPOLATION
    translate_pct: float = 0.45

    def __post_init__(self):
        unknown = [name for name in self.ops if name not in _OPS]
        if unknown:
            raise ValueError(f"Unknown RandAugment ops {unknown}; known: {sorted(_OPS)}")

    @classmethod
    def from_config(cls, config: str, *, fill=_DEFAULT_FILL, resample=_RANDOM_INTERPOLATION):
        """Parses timm's RandAugment string: 'rand' then dash-separated m (magnitude), n (layers),
        p (per-op prob), mstd (magnitude noise; > 100 means uniform), mmax, inc (0/1).

        `resample` is what timm uses when the train interpolation is 'random' (the recipe's);
        with a fixed train interpolation timm passes that one instead.
        """
        sections = config.split("-")
        if sections[0] != "rand":
            raise ValueError(f"RandAugment config must start with 'rand', got {config!r}")
        kwargs: dict = {}
        increasing = False
        for section in sections[1:]:
            parts = re.split(r"(\d.*)", section)  # 'mstd0.5' -> ['mstd', '0.5', '']
            if len(parts) < 2:
                raise ValueError(f"Unsupported RandAugment section {section!r} in {config!r}")
            key, value = parts[0], parts[1]
            if key == "m":
                kwargs["magnitude"] = float(int(value))
            elif key == "n":
                kwargs["num_layers"] = int(value)
            elif key == "p":
                kwargs["prob"] = float(value)
            elif key == "mstd":
                std = float(value)
                kwargs["magnitude_std"] = math.inf if std > 100 else std
            elif key == "mmax":
                kwargs["magnitude_max"] = float(int(value))
            elif key == "inc":
                increasing = bool(int(value))
            else:
                raise ValueError(f"Unsupported RandAugment section {section!r} in {config!r}")
        ops = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
        return cls(ops=ops, fill=tuple(fill), resample=tuple(resample), **kwargs)

    def _level(self, rng: np.random.Generator) -> float:
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = rng.uniform(0.0, magnitude)
        elif self.magnitude_std > 0:
            magnitude = rng.normal(magnitude, self.magnitude_std)
        return float(max(0.0, min(magnitude, self.magnitude_max)))

    def sample(self, rng: np.random.Generator) -> list[SampledOp]:
        """Draws the ops to apply (skipped layers are left out), with their arguments."""
        sampled = []
        for index in rng.integers(0, len(self.ops), size=self.num_layers).tolist():
            name = self.ops[index]
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            arg = None
            if _OPS[name][1] is not None:
                arg = op_argument(name, self._level(rng), rng.random() > 0.5, self.translate_pct)
            resample = None
            if name in _GEOMETRIC_OPS:
                resample = self.resample[int(rng.integers(len(self.resample)))]
            sampled.append(SampledOp(name, arg, resample))
        return sampled

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for op in self.sample(rng):
            img = apply_op(img, op, self.fill)
        return img
