"""Class names for a classifier's outputs: ImageNet's (shipped with the package) or a dataset's own.

The ImageNet tables (``imagenet_classes/imagenet-1k.tsv``, ``imagenet-12k.tsv``: one
``<WordNet synset id>\\t<readable name>`` line per class, in the classifier's index order) were
written from timm 1.0.31's own tables (``timm.data.ImageNetInfo(subset)``: ``index_to_label_name``
and ``index_to_description``), which timm uses for its ImageNet checkpoints; ``tests/test_predict.py``
checks them against the installed timm. 12k is timm's 11,821-class subset of ImageNet-21k (the head
of ``mambaout_base_plus_rw.sw_e150_in12k``).

A dataset's own classes are folder names (an image folder, and so ``train.py`` runs) or TFDS label
names; for ImageNet both are synset ids (``n01440764``), which are shown with their readable names.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
from typing import Sequence

# timm's own mapping from a head size to the ImageNet subset its classes are (timm.data.imagenet_info).
IMAGENET_SUBSETS = {1000: "imagenet-1k", 11821: "imagenet-12k"}


@dataclasses.dataclass(frozen=True)
class ClassNames:
    """What each output index of a classifier means."""

    labels: tuple[str, ...]  # readable, one per class, in index order
    ids: tuple[str, ...]  # machine ids (synsets, folder names; the index itself when there are none)
    source: str  # where they came from, for messages: 'imagenet-1k', 'the checkpoint', a file, 'indices'

    def __post_init__(self):
        if len(self.labels) != len(self.ids):
            raise ValueError(f"{len(self.labels)} labels for {len(self.ids)} class ids")

    def __len__(self) -> int:
        return len(self.labels)


@functools.cache
def imagenet_class_names(subset: str = "imagenet-1k") -> ClassNames:
    """The shipped ImageNet table: ``subset`` is 'imagenet-1k' or 'imagenet-12k'."""
    if subset not in IMAGENET_SUBSETS.values():
        raise ValueError(f"unknown ImageNet subset {subset!r}; known: {sorted(IMAGENET_SUBSETS.values())}")
    text = importlib.resources.files(__package__).joinpath("imagenet_classes", f"{subset}.tsv").read_text("utf-8")
    rows = [line.split("\t", 1) for line in text.splitlines()]
    return ClassNames(labels=tuple(r[1] for r in rows), ids=tuple(r[0] for r in rows), source=subset)


@functools.cache
def _synset_names() -> dict[str, str]:
    table = {}
    for subset in IMAGENET_SUBSETS.values():
        names = imagenet_class_names(subset)
        table.update(zip(names.ids, names.labels))
    return table


def dataset_class_names(ids: Sequence[str], source: str) -> ClassNames:
    """A dataset's classes (folder or TFDS label names); synset ids get their readable names."""
    table = _synset_names()
    ids = tuple(str(i) for i in ids)
    return ClassNames(labels=tuple(table.get(i, i) for i in ids), ids=ids, source=source)


def index_class_names(num_classes: int) -> ClassNames:
    """No names known: each class is its index."""
    ids = tuple(str(i) for i in range(num_classes))
    return ClassNames(labels=ids, ids=ids, source="indices")


def default_class_names(num_classes: int) -> ClassNames:
    """ImageNet's names for a head of ImageNet's size (as timm guesses them), else indices."""
    subset = IMAGENET_SUBSETS.get(num_classes)
    return imagenet_class_names(subset) if subset else index_class_names(num_classes)


def read_class_names_file(path: str) -> ClassNames:
    """A user's names: a text file with one class per line (``name`` or ``id<TAB>name``), in index order."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read class names: {e}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or any(not line.strip() for line in lines):
        raise ValueError(f"{path}: expected one class name per line in index order, with no empty lines")
    rows = [line.split("\t", 1) if "\t" in line else [line, line] for line in lines]
    return ClassNames(labels=tuple(r[1] for r in rows), ids=tuple(r[0] for r in rows), source=path)
