"""The built-in default dataset: scikit-learn's 8x8 handwritten digits, as an image folder.

It ships inside scikit-learn, so the default training run needs no download, and it is written to
disk in the ImageNet image-folder layout (``root/{train,val}/<class>/*.png``) so that it goes
through exactly the path ImageNet does: folder source, grain pipeline, sharded step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mambaout_jax import storage

DIGITS_VERSION = "v1"
# The size the digits are written, trained and evaluated at (configs/digits.py, eval.py --source digits):
# the whole 8x8 digit upscaled, no crop.
IMAGE_SIZE = 32
EVAL_CROP_PCT = 1.0


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mambaout_jax"


def write_digits_folder(cache_dir: str | os.PathLike | None = None, *, image_size: int = IMAGE_SIZE, val_fraction: float = 0.2) -> Path:
    """Write the digits once (upscaled to ``image_size``, grayscale PNGs) and return the root.

    The split is fixed: within each class, every ``1/val_fraction``-th image is held out. The folder
    appears atomically (written under a temporary name, then renamed), so an interrupted first run
    never leaves a half-written dataset behind for the next one.
    """
    from sklearn.datasets import load_digits

    if cache_dir and storage.is_url(cache_dir):
        raise ValueError(f"the digits cache {os.fspath(cache_dir)!r} is a URL; it is a local cache: give a local folder")
    root = Path(cache_dir or default_cache_dir()) / f"digits-{image_size}px-{DIGITS_VERSION}"
    if (root / "COMPLETE").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    try:
        digits = load_digits()
        every = round(1 / val_fraction)
        seen: dict[int, int] = {}
        for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            label = int(label)
            split = "val" if seen.get(label, 0) % every == every - 1 else "train"
            seen[label] = seen.get(label, 0) + 1
            gray = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
            image = Image.fromarray(gray, mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC)
            folder = tmp / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:04d}.png")
        (tmp / "COMPLETE").write_text("sklearn.datasets.load_digits\n")
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first
            if not (root / "COMPLETE").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
