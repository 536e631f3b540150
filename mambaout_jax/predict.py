"""Classify images: weights, the model's own eval preprocessing and its class names, compiled once.

``load_predictor(weights)`` reads any weight source the project reads (``convert.load_weights``: a
PyTorch checkpoint, a Flax weight file, a ``train.py`` run) and returns a ``Predictor``:

  predictor = load_predictor("runs/digits")
  predictor.predict(["cat.jpg"], top_k=5)[0].top   # (ClassScore(index=281, label='tabby, ...', prob=0.93), ...)

Preprocessing is the source's: a ``train.py`` run evaluates with its config's eval settings (the
digits run at 32 px), a file with its variant's (or the ``model=`` tag's), flags override both.
Class names: given ones, else the run's (its dataset's folder names), else ImageNet's for a 1000- or
11,821-class head, else the indices. ``predict.py`` at the repository root and ``demo.py`` are the
command lines over this module.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from mambaout_jax.convert.run_checkpoint import read_meta
from mambaout_jax.convert.torch_io import CheckpointError
from mambaout_jax.convert.weights import LoadedWeights, load_source
from mambaout_jax.data.class_names import ClassNames, dataset_class_names, default_class_names, read_class_names_file
from mambaout_jax.data.preprocessing import EvalPreprocessing, resolve_eval_preprocessing
from mambaout_jax.data.sources import IMAGE_EXTENSIONS
from mambaout_jax.data.transforms import ImageDecodeError, ImageInput
from mambaout_jax.models.factory import model_from_params
from mambaout_jax.models.inference import compile_forward
from mambaout_jax.models.registry import get_model_spec
from mambaout_jax.train import recipe


@dataclasses.dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    prob: float


@dataclasses.dataclass(frozen=True)
class ImagePrediction:
    image: str
    top: tuple[ClassScore, ...]

    def to_json(self) -> dict:
        """``{"image": path, "top": [{"index": int, "label": str, "prob": float}, ...]}``."""
        return {"image": self.image, "top": [dataclasses.asdict(s) for s in self.top]}


@dataclasses.dataclass(frozen=True)
class ImageFailure:
    """An input that gave no prediction: a path that does not exist, a glob with no match, an unreadable image."""

    image: str
    reason: str


class Predictor:
    """A classifier ready for images: compiled forward pass, preprocessing, class names.

    ``batch_size`` images go through the device at a time; a shorter last batch is padded to it,
    so a run of any length compiles once.
    """

    def __init__(
        self,
        weights: LoadedWeights,
        preprocessing: EvalPreprocessing,
        classes: ClassNames,
        *,
        name: str | None = None,
        dataset: str | None = None,
        dtype=jnp.float32,
        batch_size: int = 32,
    ):
        if weights.num_classes == 0:
            raise CheckpointError(
                f"{weights.source}: has no classifier (num_classes=0: a backbone / pre-logits export), so there "
                "are no classes to predict; use weights that include their classification head"
            )
        if len(classes) != weights.num_classes:
            raise ValueError(
                f"{len(classes)} class names ({classes.source}) for a classifier with {weights.num_classes} classes "
                f"({weights.source})"
            )
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch size must be a positive int, got {batch_size!r}")
        self.weights_source = weights.source
        self.loaded = dataclasses.replace(weights, params={})  # what was loaded (source, set, tag), without the arrays
        self.model = name or weights.model
        self.dataset = dataset  # what a train.py run trained on ('digits', 'tfds', 'folder'); None: unknown
        self.num_classes = weights.num_classes
        self.preprocessing = preprocessing
        self.classes = classes
        self.batch_size = batch_size
        model = model_from_params(weights.model, weights.params, num_classes=weights.num_classes, dtype=dtype)
        forward = compile_forward(model)
        mean, std = np.asarray(preprocessing.mean, np.float32), np.asarray(preprocessing.std, np.float32)

        # uint8 crosses to the device (4x fewer bytes than float32); normalisation and softmax run there,
        # the softmax in float32 whatever the compute dtype.
        @jax.jit
        def probabilities(images):
            x = (images.astype(jnp.float32) / 255.0 - mean) / std
            return jax.nn.softmax(forward(x).astype(jnp.float32), axis=-1)

        self._probabilities = probabilities

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, size, size, 3), already through ``preprocessing.transform`` -> float32 (N, classes)."""
        results = [self._dispatch(images[s : s + self.batch_size]) for s in range(0, len(images), self.batch_size)]
        return np.concatenate([np.asarray(r) for r in results]) if results else np.zeros((0, self.num_classes), np.float32)

    def _dispatch(self, batch: np.ndarray) -> jax.Array:
        """Starts one padded batch on the device and returns its (unpadded) result without waiting."""
        n = len(batch)
        if n < self.batch_size:
            batch = np.concatenate([batch, np.zeros((self.batch_size - n,) + batch.shape[1:], np.uint8)])
        return self._probabilities(batch)[:n]

    def warm_up(self) -> float:
        """Compiles the forward pass now (one blank batch) instead of at the first image; returns seconds."""
        size = self.preprocessing.image_size
        start = time.perf_counter()
        jax.block_until_ready(self._dispatch(np.zeros((1, size, size, 3), np.uint8)))
        return time.perf_counter() - start

    def top_k(self, probs: np.ndarray, k: int) -> tuple[ClassScore, ...]:
        """The ``k`` most probable classes of one image's probabilities, highest first (ties: lower index)."""
        order = np.argsort(-probs, kind="stable")[: min(k, len(probs))]
        return tuple(ClassScore(int(i), self.classes.labels[i], float(probs[i])) for i in order)

    def predict(self, images: Sequence[ImageInput], *, top_k: int = 5) -> list[ImagePrediction]:
        """Predictions for images in memory or on disk; an unreadable one raises ``ImageDecodeError``."""
        size = self.preprocessing.image_size
        batch = np.stack([self.preprocessing.transform(image) for image in images] or [np.zeros((size, size, 3), np.uint8)])
        probs = self.probabilities(batch[: len(images)])
        return [ImagePrediction(_image_name(image, i), self.top_k(p, top_k)) for i, (image, p) in enumerate(zip(images, probs))]

    def predict_files(
        self, paths: Sequence[str], *, top_k: int = 5, threads: int | None = None
    ) -> tuple[list[ImagePrediction], list[ImageFailure]]:
        """Predictions for image files in order; each unreadable file is reported and skipped.

        Decoding (PIL releases the GIL) runs on ``threads`` threads and overlaps the device's work on
        the previous batch.
        """
        predictions, failures = [], []
        pending = None  # (paths, device result) of the batch in flight
        with concurrent.futures.ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(paths), self.batch_size):
                chunk = paths[start : start + self.batch_size]
                decoded = list(pool.map(self._try_transform, chunk))
                good = [(p, x) for p, x in zip(chunk, decoded) if not isinstance(x, ImageFailure)]
                failures.extend(x for x in decoded if isinstance(x, ImageFailure))
                launched = (
                    ([p for p, _ in good], self._dispatch(np.stack([x for _, x in good]))) if good else None
                )  # fmt: skip
                if pending:
                    predictions.extend(self._collect(*pending, top_k))
                pending = launched
            if pending:
                predictions.extend(self._collect(*pending, top_k))
        return predictions, failures

    def _try_transform(self, path: str):
        try:
            return self.preprocessing.transform(path)
        except ImageDecodeError as e:
            return ImageFailure(path, f"cannot read the image: {e}")

    def _collect(self, paths, result, top_k):
        return [ImagePrediction(p, self.top_k(probs, top_k)) for p, probs in zip(paths, np.asarray(result))]


def weights_preprocessing(
    weights: LoadedWeights,
    model: str | None = None,
    *,
    image_size: int | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
) -> EvalPreprocessing:
    """The eval preprocessing the weights were meant for, with overrides (None: keep).

    A ``train.py`` run: its config's eval settings (what the run itself evaluated with: the digits
    run's 32 px). A file: the variant's settings, or those of ``model`` when it names a pretrained tag.
    """
    overrides = dict(image_size=image_size, crop_pct=crop_pct, crop_mode=crop_mode)
    config = run_config(weights)
    if config is None:
        return resolve_eval_preprocessing(model or weights.model, **overrides)
    own = recipe.eval_preprocessing(config)
    return dataclasses.replace(own, **{k: v for k, v in overrides.items() if v is not None})


def run_config(weights: LoadedWeights) -> ConfigDict | None:
    """The config of the ``train.py`` run the weights come from (None for weight files)."""
    if not Path(weights.source).is_dir():
        return None
    saved = read_meta(Path(weights.source)).get("config")
    return ConfigDict(json.loads(saved)) if saved else None


def weights_class_names(weights: LoadedWeights, class_names_file: str | None = None) -> ClassNames:
    """Given names, else the ones the source records (a run's dataset classes), else the default for its size."""
    if class_names_file:
        return read_class_names_file(class_names_file)
    if weights.classes:
        return dataset_class_names(weights.classes, source="the run's dataset")
    return default_class_names(weights.num_classes)


def load_predictor(
    weights: str | os.PathLike | None = None,
    *,
    pretrained: str | None = None,
    pretrained_source: str = "hub",
    ema: bool | None = None,
    model: str | None = None,
    class_names_file: str | None = None,
    image_size: int | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    dtype=jnp.float32,
    batch_size: int = 32,
) -> Predictor:
    """A ``Predictor`` for a weight source (see the module docstring), or for published weights by
    name (``pretrained="mambaout_tiny.in1k"``, with their tag's eval settings); ``ema`` picks the weight
    set (``convert.weights``). Errors name the file at fault."""
    if model is not None:
        get_model_spec(model)  # an unknown name or tag fails before any file is read
    # Absolute: orbax refuses a relative checkpoint path (and a run's folder is often given relative).
    local = Path(weights).absolute() if weights is not None else None
    loaded = load_source(local, pretrained, model=model, ema=ema, pretrained_source=pretrained_source)
    model = model or loaded.tag
    preprocessing = weights_preprocessing(loaded, model, image_size=image_size, crop_pct=crop_pct, crop_mode=crop_mode)
    classes = weights_class_names(loaded, class_names_file)
    config = run_config(loaded)
    dataset = config.data.source if config is not None else None
    return Predictor(loaded, preprocessing, classes, name=model, dataset=dataset, dtype=dtype, batch_size=batch_size)


def _image_name(image: ImageInput, position: int) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"<image {position}>"


def expand_image_paths(specs: Iterable[str]) -> tuple[list[str], list[ImageFailure]]:
    """Files, folders (every image file below, sorted) and glob patterns -> image paths, in the given order.

    A file named explicitly is taken whatever its extension (its content decides); in folders and
    globs only image extensions count (torchvision's list). Nothing found for a spec is a failure.
    """
    paths, failures = [], []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(spec, followlinks=True)
                for f in files
                if f.lower().endswith(IMAGE_EXTENSIONS)
            )
            what = "a folder with no image files"
        elif os.path.exists(spec):
            found = [spec]
        elif glob.has_magic(spec):
            found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS))
            what = "a pattern that matches no image file"
        else:
            found, what = [], "no such file or folder"
        if not found:
            failures.append(ImageFailure(spec, what))
        paths.extend(found)
    return paths, failures
