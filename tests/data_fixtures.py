"""Small image datasets the data tests build themselves: real photos, synthetic images, an image
folder, and a genuine TFDS `imagenet2012` in ArrayRecord format built by TFDS's own builder from
miniature ImageNet tars (TensorFlow is needed for that build only, as for a real one)."""

from __future__ import annotations

import functools
import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# scikit-image's bundled photographs (no download): faces, texture, fine detail, several sizes.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")

# Sizes (width, height) with ImageNet's typical and extreme aspect ratios, odd sizes included.
IMAGE_SIZES = ((500, 375), (375, 500), (500, 333), (257, 255), (640, 201), (97, 131), (1000, 872))


@functools.lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def photo_image(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    """An RGB photo, resized (bicubic) to `size` = (width, height) if given."""
    image = Image.fromarray(photo(name)).convert("RGB")
    return image if size is None else image.resize(size, Image.Resampling.BICUBIC)


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """A natural-ish RGB image: smooth colour fields plus edges and mild noise, so that JPEG
    sizes and decode costs resemble photos' rather than white noise's."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = (np.sin(xx / rng.uniform(3, 12) + yy / rng.uniform(5, 20)) > 0)[..., None] * 40
    noise = rng.normal(0, 6, (height, width, 3))
    return np.clip(field.astype(np.float32) + stripes + noise, 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if fmt == "JPEG":
        kwargs.setdefault("quality", 90)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def odd_mode_images() -> dict[str, bytes]:
    """Encoded images in every mode a real ImageNet folder holds, by file name."""
    rgb = photo_image("chelsea", (120, 90))
    return {
        "gray.JPEG": encode(rgb.convert("L")),
        "cmyk.JPEG": encode(rgb.convert("CMYK")),
        "palette.png": encode(rgb.convert("P"), "PNG"),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "png_inside.JPEG": encode(rgb, "PNG"),
        "upper.JPG": encode(rgb),
        "plain.jpg": encode(rgb),
    }


def write_image_folder(root: Path, classes: dict[str, dict[str, bytes]]) -> Path:
    """Writes root/<class>/<file name> for each class; returns root."""
    for class_name, files in classes.items():
        (root / class_name).mkdir(parents=True, exist_ok=True)
        for file_name, data in files.items():
            path = root / class_name / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def in_memory_source(num_examples: int, *, seed: int = 0, corrupt: dict[int, bytes] = {}):
    """A list-of-dicts source whose label is the record index, so batches identify examples."""
    records = []
    for i in range(num_examples):
        width, height = 40 + (i * 7) % 50, 30 + (i * 11) % 40
        data = corrupt.get(i) or encode(synthetic_image(width, height, seed * 100_000 + i))
        records.append({"image": data, "label": i, "key": f"record-{i}"})
    return records


def require(module: str, why: str):
    """Imports a test-only dependency, failing (never skipping) without it: a silent skip would hide
    a missing install step, in CI or on a developer's machine."""
    import importlib
    import pytest

    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{module} is missing ({why}); install the test dependencies: pip install -e '.[test]'")


# --- a miniature ImageNet, built by TFDS's imagenet2012 builder --------------------------------

TRAIN_WNIDS = ("n01440764", "n01443537", "n01484850")  # labels 0, 1, 2 in TFDS's labels.txt


def _add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_imagenet_tars(manual_dir: Path, train: dict[str, list[bytes]], val: list[bytes]) -> None:
    """ILSVRC2012_img_train.tar (one inner tar per wnid) and ILSVRC2012_img_val.tar, as shipped."""
    manual_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid, images in train.items():
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i, data in enumerate(images):
                    _add_to_tar(inner, f"{wnid}_{i}.JPEG", data)
            _add_to_tar(outer, f"{wnid}.tar", inner_bytes.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, data in enumerate(val, start=1):
            _add_to_tar(tar, f"ILSVRC2012_val_{i:08d}.JPEG", data)


def build_tfds_imagenet(root: Path, train: dict[str, list[bytes]], val: list[bytes]) -> Path:
    """Runs TFDS's imagenet2012 builder in ArrayRecord format; returns the TFDS data_dir.

    The same as `tfds build imagenet2012 --file_format=array_record --manual_dir=...` on the
    real tars. Validation labels come from TFDS's validation_labels.txt (first len(val) lines).
    """
    import tensorflow_datasets as tfds

    manual_dir, data_dir = root / "manual", root / "tfds"
    write_imagenet_tars(manual_dir, train, val)
    builder = tfds.builder("imagenet2012", data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    return data_dir
