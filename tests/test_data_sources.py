"""Sources: image folders labelled as torchvision labels them, and TFDS imagenet2012 in ArrayRecord
format, built by TFDS itself and then read without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_fixtures import (
    TRAIN_WNIDS,
    build_tfds_imagenet,
    encode,
    photo_image,
    require,
    synthetic_image,
    write_image_folder,
)
from mambaout_jax.data import (
    EvalPreprocessing,
    eval_transform,
    image_folder_source,
    make_eval_iterator,
    tfds_source,
)

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _jpeg(seed: int) -> bytes:
    return encode(synthetic_image(48, 40, seed))


def test_image_folder_classes_and_sample_order_match_torchvision(tmp_path):
    torchvision = require("torchvision", "torchvision's ImageFolder is the reference")
    write_image_folder(tmp_path / "train", {
        "n02": {"b.JPEG": _jpeg(0), "A.jpeg": _jpeg(1), "c.PNG": encode(synthetic_image(9, 9, 2), "PNG"),
                "notes.txt": b"not an image", "d.webp": encode(synthetic_image(9, 9, 3), "WEBP")},
        "N01": {"x.jpg": _jpeg(4), "sub/deeper.JPG": _jpeg(5)},
        "n10": {"z.bmp": encode(synthetic_image(9, 9, 6), "BMP")},
        "empty_class": {},
    })
    ours = image_folder_source(tmp_path, "train")
    theirs = torchvision.datasets.ImageFolder(tmp_path / "train", allow_empty=True)
    assert list(ours.classes) == theirs.classes == ["N01", "empty_class", "n02", "n10"]
    assert ours.samples == [(str(p), label) for p, label in theirs.samples]
    assert len(ours) == 7
    record = ours[0]
    assert record["label"] == 0 and record["key"] == record["image"] == str(tmp_path / "train/N01/x.jpg")


def test_image_folder_split_can_reuse_the_train_class_list(tmp_path):
    write_image_folder(tmp_path / "train", {"a": {"1.jpg": _jpeg(0)}, "b": {"1.jpg": _jpeg(1)}})
    write_image_folder(tmp_path / "val", {"b": {"1.jpg": _jpeg(2)}})
    train = image_folder_source(tmp_path, "train")
    assert image_folder_source(tmp_path, "val")[0]["label"] == 0  # alone, 'b' would be class 0 ...
    assert image_folder_source(tmp_path, "val", classes=train.classes)[0]["label"] == 1  # ... not here
    with pytest.raises(ValueError, match="'a'"):
        image_folder_source(tmp_path, "train", classes=["b"])


def test_image_folder_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "train")):
        image_folder_source(tmp_path / "nowhere", "train")
    (tmp_path / "bare" / "val").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'bare' / 'val'}.*no class subfolders"):
        image_folder_source(tmp_path / "bare", "val")
    write_image_folder(tmp_path / "noimg" / "val", {"cls": {"readme.txt": b"x"}})
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'noimg' / 'val'}.*no images"):
        image_folder_source(tmp_path / "noimg", "val")


# --- TFDS imagenet2012 in ArrayRecord format --------------------------------------------------


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """A 12-image train split (3 classes, photos and synthetic images of several sizes) and a
    5-image validation split, written by TFDS's imagenet2012 builder. Needs TensorFlow, as
    building the real dataset does."""
    require("tensorflow", "TFDS needs it to build a dataset")
    require("importlib_resources", "TFDS's dataset builder imports it")
    photos = ("astronaut", "coffee", "chelsea", "rocket")
    train = {
        wnid: [encode(photo_image(photos[i], (200 + 60 * c, 150 + 45 * i))) if i < 2
               else encode(synthetic_image(120 + 20 * i, 90 + 30 * c, seed=10 * c + i))
               for i in range(4)]
        for c, wnid in enumerate(TRAIN_WNIDS)
    }
    val = [encode(photo_image(photos[i % 4], (180 + 40 * i, 240 - 20 * i))) for i in range(5)]
    data_dir = build_tfds_imagenet(tmp_path_factory.mktemp("imagenet"), train, val)
    return data_dir, train, val


def test_tfds_source_reads_stored_jpeg_bytes_labels_and_file_names(imagenet):
    data_dir, train, val = imagenet
    source = tfds_source(data_dir, "train")
    assert len(source) == 12 and len(source.classes) == 1000
    assert source.classes[:3] == TRAIN_WNIDS
    seen = set()
    for i in range(len(source)):
        record = source[i]
        file_name = record["key"].split()[-1]  # 'imagenet2012/train[3] n01443537_2.JPEG'
        wnid, number = file_name.removesuffix(".JPEG").split("_")
        assert record["label"] == TRAIN_WNIDS.index(wnid)
        assert record["image"] == train[wnid][int(number)]  # the JPEG bytes, untouched
        seen.add(file_name)
    assert len(seen) == 12
    # Validation labels are line k of TFDS's validation_labels.txt for ILSVRC2012_val_<k>.JPEG.
    import tensorflow_datasets as tfds

    validation = tfds_source(data_dir, "validation")
    labels_txt = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt").read_text().split()
    for i in range(len(validation)):
        record = validation[i]
        number = int(record["key"].split("_")[-1].removesuffix(".JPEG"))
        assert validation.classes[record["label"]] == labels_txt[number - 1]
        assert record["image"] == val[number - 1]


def test_eval_over_tfds_equals_eval_transform_of_the_stored_images(imagenet):
    data_dir, _, _ = imagenet
    source = tfds_source(data_dir, "validation")
    batches = list(make_eval_iterator(source, global_batch_size=4,
                                      preprocessing=EvalPreprocessing(image_size=224, crop_pct=0.95), shard=(0, 1)))
    assert len(batches) == 2
    images = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.tolist() == [True] * 5 + [False] * 3
    for i in range(5):
        np.testing.assert_array_equal(images[i], eval_transform(source[i]["image"], crop_pct=0.95))
        assert labels[i] == source[i]["label"]


def test_missing_tfds_dataset_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build imagenet2012 --file_format=array_record"):
        tfds_source(tmp_path, "train")


def test_reading_tfds_through_the_pipeline_never_imports_tensorflow(imagenet):
    data_dir, _, _ = imagenet
    script = textwrap.dedent(f"""
        import json, sys
        from mambaout_jax.data import tfds_source, make_train_iterator, make_eval_iterator
        train = make_train_iterator(tfds_source({str(data_dir)!r}, "train"), global_batch_size=4,
                                    seed=0, shard=(0, 1))
        shapes = [next(train)["image"].shape for _ in range(4)]
        evals = list(make_eval_iterator(tfds_source({str(data_dir)!r}, "validation"),
                                        global_batch_size=4, shard=(0, 1)))
        print(json.dumps({{"tf": [m for m in sys.modules if m.split(".")[0] == "tensorflow"],
                           "shapes": [list(s) for s in shapes], "eval_batches": len(evals)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tf"] == []
    assert report["shapes"] == [[4, 224, 224, 3]] * 4 and report["eval_batches"] == 2
