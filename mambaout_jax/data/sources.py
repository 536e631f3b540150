"""Random-access sources of ImageNet-style records: TFDS ArrayRecord and image folders.

A source is a `Sequence` (len + getitem) of records, each a dict
    {"image": encoded bytes or a file path, "label": int, "key": str}
plus, when a record could not even be read, "error": str. Sources never decode pixels: decoding
happens in the grain workers (pipeline.py), where a corrupt record can be skipped and counted.
Anything with this shape works as a source, e.g. a plain list of such dicts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mambaout_jax import storage

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively as torchvision does.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class TfdsSource(Sequence):
    """A TFDS dataset in ArrayRecord format, read with `tfds.data_source`, without TensorFlow.

    The image feature is read with `tfds.decode.SkipDecoding()`, so records carry the stored JPEG
    bytes and TFDS parses the tf.train.Example protos with its NumPy parser; TensorFlow is only
    needed once, to build the dataset (see the README). Pickles cheaply into grain workers.

    ``data_dir`` may be a bucket (``gs://...``): TFDS lists it through ``etils.epath`` and
    array_record reads each record with its own Cloud Storage client (one ranged read per record;
    see docs/CLOUD_STORAGE.md for what that costs against a local copy).
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, name: str = "imagenet2012"):
        import tensorflow_datasets as tfds  # Heavy import, only needed for this source.

        storage.as_path(data_dir, "data dir")  # a bad URL fails here; points the clients at an emulator
        self.name, self.split = name, split
        try:
            self._source = tfds.data_source(
                name,
                split=split,
                data_dir=os.fspath(data_dir),
                download=False,
                decoders={"image": tfds.decode.SkipDecoding()},
            )
        except Exception as e:
            raise FileNotFoundError(
                f"No TFDS dataset {name!r} (split {split!r}) in ArrayRecord format under "
                f"{os.fspath(data_dir)!r}: {e}. Build it once with `tfds build {name} "
                f"--file_format=array_record --data_dir={os.fspath(data_dir)} --manual_dir=...`."
            ) from e
        features = self._source.dataset_info.features
        self.classes: tuple[str, ...] = tuple(features["label"].names)
        self._has_file_name = "file_name" in features

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        key = f"{self.name}/{self.split}[{index}]"
        try:
            example = self._source[index]
        except Exception as e:  # A record whose proto can't be parsed: reported downstream.
            return {"image": None, "label": -1, "key": key, "error": f"{type(e).__name__}: {e}"}
        if self._has_file_name:
            file_name = example["file_name"]
            file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
            key = f"{key} {file_name}"
        return {"image": example["image"], "label": int(example["label"]), "key": key}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"


def tfds_source(data_dir: str | os.PathLike, split: str, name: str = "imagenet2012") -> TfdsSource:
    """ImageNet (or another image-classification TFDS dataset) built in ArrayRecord format."""
    return TfdsSource(data_dir, split, name)


def find_classes(directory: str | os.PathLike) -> list[str]:
    """Class folder names in sorted order: torchvision ImageFolder's `find_classes`."""
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


class ImageFolderSource(Sequence):
    """Images laid out as `directory/<class>/**/<file>` (torchvision's ImageFolder layout).

    Labels are indices into the sorted class-folder names and samples are ordered as
    `torchvision.datasets.ImageFolder` orders them, so labels agree with PyTorch checkpoints trained
    on the same folders. Pass `classes` (e.g. the train split's) to pin the mapping for a split
    that lacks some class folders. Paths are held in NumPy arrays so that pickling the source into
    each grain worker stays cheap at ImageNet scale (1.28M files).
    """

    def __init__(self, directory: str | os.PathLike, classes: Sequence[str] | None = None):
        self.directory = os.fspath(directory)
        if storage.is_url(self.directory):
            raise FileNotFoundError(
                f"Image folder {self.directory!r} is a URL: an image folder is read file by file from a file system "
                "(1.28M small objects would be one request each). Build the TFDS ArrayRecord dataset in the bucket "
                "and read that (source 'tfds', gs:// works), or mount the bucket (gcsfuse) and pass the mounted path"
            )
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"Image folder {self.directory!r} does not exist")
        found = find_classes(self.directory)
        if not found:
            raise FileNotFoundError(
                f"Image folder {self.directory!r} has no class subfolders; expected "
                f"{self.directory}/<class>/<image>"
            )
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise ValueError(f"{self.directory!r} has class folders not in `classes`: {unknown}")
        self.classes: tuple[str, ...] = tuple(classes)
        class_to_index = {name: i for i, name in enumerate(self.classes)}

        paths, labels = [], []
        for name in found:
            class_dir = os.path.join(self.directory, name)
            for root, _, file_names in sorted(os.walk(class_dir, followlinks=True)):
                for file_name in sorted(file_names):
                    if file_name.lower().endswith(IMAGE_EXTENSIONS):
                        path = os.path.join(root, file_name)
                        paths.append(os.path.relpath(path, self.directory))
                        labels.append(class_to_index[name])
        if not paths:
            raise FileNotFoundError(
                f"Image folder {self.directory!r} has class folders but no images with "
                f"extensions {IMAGE_EXTENSIONS} (case-insensitive)"
            )
        self._paths = np.array([p.encode("utf-8", "surrogateescape") for p in paths])
        self._labels = np.asarray(labels, np.int32)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """(path, label) pairs, as torchvision's `ImageFolder.samples`."""
        return [(self._path(i), int(label)) for i, label in enumerate(self._labels)]

    def _path(self, index: int) -> str:
        relative = self._paths[index].decode("utf-8", "surrogateescape")
        return os.path.join(self.directory, relative)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        path = self._path(index)
        return {"image": path, "label": int(self._labels[index]), "key": path}

    def __repr__(self) -> str:
        return (
            f"ImageFolderSource({self.directory!r}, {len(self)} images, "
            f"{len(self.classes)} classes)"
        )


def image_folder_source(
    root: str | os.PathLike, split: str, classes: Sequence[str] | None = None
) -> ImageFolderSource:
    """The `split` ('train', 'val', ...) of an image folder laid out as `root/<split>/<class>/*`."""
    return ImageFolderSource(os.path.join(os.fspath(root), split), classes=classes)
