"""Host-side image transforms: decoding, timm's eval preprocessing, timm's train augmentation.

Everything here is numpy + PIL and runs inside the grain workers; nothing imports torch or timm.
The PyTorch checkpoints were evaluated and trained with PIL-based torchvision/timm transforms, so
the same PIL calls are made with the same integer rounding: `eval_transform` is pixel-identical to
`timm.data.create_transform(size, is_training=False, ...)`, and `TrainTransform` samples its random
parameters from the same distributions as timm's train transform (tests/test_data_transforms.py
holds both claims against timm). Randomness always comes from an explicit `np.random.Generator`
(never the global `random` module), so a pipeline can derive it from (seed, position in the stream).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mambaout_jax.data.auto_augment import RandAugment

Resampling = Image.Resampling

INTERPOLATIONS: dict[str, Resampling] = {
    "nearest": Resampling.NEAREST,
    "bilinear": Resampling.BILINEAR,
    "bicubic": Resampling.BICUBIC,
    "box": Resampling.BOX,
    "hamming": Resampling.HAMMING,
    "lanczos": Resampling.LANCZOS,
}
# timm's interpolation='random': each image picks one of these.
RANDOM_INTERPOLATION = (Resampling.BILINEAR, Resampling.BICUBIC)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm fills the empty corners of RandAugment's rotate/shear/translate with the dataset mean in
# 0..255 (`img_mean=tuple(min(255, round(255 * x)) for x in mean)` in transforms_factory.py).
IMAGENET_FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)

ImageInput = bytes | bytearray | memoryview | str | os.PathLike | Image.Image


class ImageDecodeError(ValueError):
    """An image could not be read or decoded (corrupt, truncated, not an image, unreadable file).

    Only this error is treated as a bad record by the pipeline, so a bug in an augmentation is
    never silently counted as a corrupt image.
    """


def open_image(image: ImageInput) -> Image.Image:
    """Opens encoded bytes or a file path lazily: only the header is parsed.

    Lazy opening lets the train transform look at the image size, choose its crop, and then ask the
    JPEG decoder for a reduced-size decode (`Image.draft`) before any pixel is decoded.
    The format is sniffed from the content, so a PNG saved as `.JPEG` opens fine.
    """
    if isinstance(image, Image.Image):
        return image
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(image))
        return Image.open(image)
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not an image in a format PIL can read") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Decodes (if still lazy) and converts to 8-bit RGB, as timm's and torchvision's loaders do.

    `Image.convert("RGB")` is the conversion those loaders apply, so grayscale, CMYK (including
    Adobe's inverted CMYK JPEGs), palette, RGBA (alpha dropped, not composited) and 16-bit images
    become the same RGB pixels the PyTorch models were trained and evaluated on.
    """
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as e:
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from e


def decode_rgb(image: ImageInput) -> Image.Image:
    """Opens and fully decodes an image to RGB; raises ImageDecodeError if it can't."""
    return to_rgb(open_image(image))


CROP_MODES = ("center", "squash")


def check_interpolation(name: str) -> None:
    """A clear error for an interpolation name PIL does not have."""
    _pil_interpolation(name)


def _pil_interpolation(name: str) -> Resampling:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(
            f"Unknown interpolation {name!r}; expected one of {sorted(INTERPOLATIONS)}"
        ) from None


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _resize_shorter_side(image: Image.Image, size: int, resample: Resampling) -> Image.Image:
    """torchvision's `Resize(int)` on a PIL image, including its float-then-truncate rounding."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), resample)


def _resize_keep_ratio(
    image: Image.Image, size_hw: tuple[int, int], resample: Resampling
) -> Image.Image:
    """timm's `ResizeKeepRatio(longest=0)`: the shorter side (relative to target) fits exactly."""
    width, height = image.size
    ratio = min(height / size_hw[0], width / size_hw[1])
    new_h, new_w = round(height * 1.0 / ratio), round(width * 1.0 / ratio)
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), resample)


def _center_crop(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """torchvision's `CenterCrop`: zero-pads if the image is smaller, then rounds the offset with
    Python's `round` (half to even), which decides the pixel alignment of every eval image."""
    crop_h, crop_w = size_hw
    height, width = image.shape[:2]
    if crop_h > height or crop_w > width:
        pad_top = (crop_h - height) // 2 if crop_h > height else 0
        pad_bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
        pad_left = (crop_w - width) // 2 if crop_w > width else 0
        pad_right = (crop_w - width + 1) // 2 if crop_w > width else 0
        image = np.pad(image, ((pad_top, pad_bottom), (pad_left, pad_right), (0, 0)))
        height, width = image.shape[:2]
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return image[top : top + crop_h, left : left + crop_w]


def eval_transform(
    image: ImageInput,
    *,
    size: int | Sequence[int] = 224,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    crop_mode: str = "center",
) -> np.ndarray:
    """timm's eval preprocessing, minus ToTensor/Normalize: uint8 array (height, width, 3).

    Resize so that the shorter side is floor(size / crop_pct), then center crop `size`; with
    `crop_mode="squash"` both sides are resized to floor(size / crop_pct), ignoring the aspect
    ratio (timm's mode for the 384px `base_plus_rw` weights). Pixel-identical to
    `timm.data.create_transform(size, is_training=False, crop_pct=..., crop_mode=...,
    interpolation=...)` up to its ToTensor; JPEG draft decoding is deliberately never used here.
    `image` is a PIL image, encoded bytes or a path.
    """
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
    resample = _pil_interpolation(interpolation)
    size_hw = _as_hw(size)
    scale_hw = (math.floor(size_hw[0] / crop_pct), math.floor(size_hw[1] / crop_pct))
    rgb = decode_rgb(image)
    if crop_mode == "squash":
        if rgb.size != (scale_hw[1], scale_hw[0]):
            rgb = rgb.resize((scale_hw[1], scale_hw[0]), resample)
    elif scale_hw[0] == scale_hw[1]:
        rgb = _resize_shorter_side(rgb, scale_hw[0], resample)
    else:
        rgb = _resize_keep_ratio(rgb, scale_hw, resample)
    return np.ascontiguousarray(_center_crop(np.asarray(rgb), size_hw))


def sample_resized_crop(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """The crop box (top, left, height, width) of torchvision's/timm's RandomResizedCrop.

    Area uniform in `scale` x image area, aspect ratio log-uniform in `ratio`, rounded to integers,
    accepted if it fits; after 10 misses, the largest centred crop whose aspect is within `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    target_areas = rng.uniform(scale[0], scale[1], size=10) * area
    aspect_ratios = np.exp(rng.uniform(log_ratio[0], log_ratio[1], size=10))
    for target_area, aspect_ratio in zip(target_areas.tolist(), aspect_ratios.tolist()):
        crop_w = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_h = int(round(math.sqrt(target_area / aspect_ratio)))
        if crop_w <= width and crop_h <= height:
            top = int(rng.integers(0, height - crop_h, endpoint=True))
            left = int(rng.integers(0, width - crop_w, endpoint=True))
            return top, left, crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w = width
        crop_h = int(round(crop_w / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h = height
        crop_w = int(round(crop_h * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """timm's ImageNet train transform on the host: RandomResizedCrop -> flip -> RandAugment.

    Output is uint8 (image_size, image_size, 3); normalisation, random erasing and mixup/cutmix run
    on device (batch_transforms.py). Each piece can be switched off:
      random_resized_crop: False -> resize the shorter side to image_size and center crop (timm's
        no-aug train transform).
      interpolation: "random" picks bilinear or bicubic per image, as timm's 'random'.
      hflip: probability of a horizontal flip; 0 disables it.
      rand_augment: a timm RandAugment string such as "rand-m9-mstd0.5-inc1", or None.
      fill: the colour RandAugment's geometric ops fill with (timm passes the mean x 255).
      jpeg_draft: decode JPEGs directly at 1/2, 1/4 or 1/8 scale (in the DCT domain, much cheaper)
        when the random crop will be shrunk by at least that factor anyway; the reduced crop is
        still at least image_size on each side, so the final resize only ever downsamples. It
        changes pixels slightly (libjpeg's scaled IDCT instead of PIL's filter for that factor)
        and saves most of the decode time on large images; it never applies to eval.
    """

    image_size: int = 224
    random_resized_crop: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "random"
    hflip: float = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    fill: tuple[int, int, int] = IMAGENET_FILL
    jpeg_draft: bool = True

    def __post_init__(self):
        if self.interpolation != "random":
            _pil_interpolation(self.interpolation)
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip must be a probability, got {self.hflip}")
        # Parse once, so a bad string fails when the pipeline is built, not in a worker.
        object.__setattr__(
            self,
            "_rand_augment",
            RandAugment.from_config(self.rand_augment, fill=self.fill)
            if self.rand_augment
            else None,
        )

    def _resample(self, rng: np.random.Generator) -> Resampling:
        if self.interpolation == "random":
            return RANDOM_INTERPOLATION[int(rng.integers(2))]
        return INTERPOLATIONS[self.interpolation]

    def _random_resized_crop(self, image: ImageInput, rng: np.random.Generator) -> Image.Image:
        lazy = open_image(image)
        width, height = lazy.size
        top, left, crop_h, crop_w = sample_resized_crop(width, height, rng, self.scale, self.ratio)
        resample = self._resample(rng)
        size = (self.image_size, self.image_size)
        box = (left, top, left + crop_w, top + crop_h)
        if (
            self.jpeg_draft
            and lazy is not image
            and lazy.format == "JPEG"
            and min(crop_w, crop_h) >= 2 * self.image_size  # else no DCT scale (1/2..1/8) fits
        ):
            # Ask for the smallest decode whose crop is still >= image_size on both sides.
            requested = (
                math.ceil(width * self.image_size / crop_w),
                math.ceil(height * self.image_size / crop_h),
            )
            drafted = lazy.draft("RGB", requested)
            if drafted is not None and drafted[1][2] < width:
                reduction = width / drafted[1][2]
                rgb = to_rgb(lazy)
                return rgb.resize(size, resample, box=tuple(c / reduction for c in box))
        return to_rgb(lazy).crop(box).resize(size, resample)

    def __call__(self, image: ImageInput, rng: np.random.Generator) -> np.ndarray:
        if self.random_resized_crop:
            rgb = self._random_resized_crop(image, rng)
        else:
            interpolation = "bilinear" if self.interpolation == "random" else self.interpolation
            rgb = Image.fromarray(
                eval_transform(image, size=self.image_size, interpolation=interpolation)
            )
        if self.hflip > 0 and rng.random() < self.hflip:
            rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self._rand_augment is not None:
            rgb = self._rand_augment(rgb, rng)
        return np.asarray(rgb)
