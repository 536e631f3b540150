"""predict.py and mambaout_jax.predict: top-k with names and probabilities, as timm computes them."""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from configs import digits as digits_config
from data_fixtures import encode, photo_image, require
from mambaout_jax.convert import CheckpointError, save_flax_weights
from mambaout_jax.data import class_names
from mambaout_jax.models.factory import build_model
from mambaout_jax.models.params import get_params
from mambaout_jax.predict import expand_image_paths, load_predictor
from mambaout_jax.train.checkpoint import RunCheckpoints

import predict as predict_cli

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Real photos of several sizes and aspect ratios, as JPEG and PNG files."""
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i, name in enumerate(PHOTOS):
        path = root / f"{name}.{'png' if i % 2 else 'jpg'}"
        path.write_bytes(encode(photo_image(name), "PNG" if i % 2 else "JPEG", **({} if i % 2 else {"quality": 90})))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    """A timm test_mambaout (1000 classes) with every parameter random, as timm's safetensors."""
    require("timm", "the reference for predictions")
    from safetensors.torch import save_file
    from torch_reference import random_timm_model

    model = random_timm_model("test_mambaout", seed=3)
    path = tmp_path_factory.mktemp("timm") / "test_mambaout.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.fixture(scope="module")
def timm_predictor(timm_file):
    return load_predictor(timm_file[1], batch_size=2)  # 5 photos: two full batches and a padded one


def test_imagenet_tables_are_timms():
    """The shipped tables are, line for line, timm's ImageNet-1k and -12k synsets and descriptions."""
    require("timm", "the source of the class tables")
    from timm.data import ImageNetInfo

    for subset, size in (("imagenet-1k", 1000), ("imagenet-12k", 11821)):
        info = ImageNetInfo(subset)
        ours = class_names.default_class_names(size)
        assert ours.source == subset and len(ours) == info.num_classes() == size
        assert ours.ids == tuple(info.label_names())
        assert ours.labels == tuple(info.label_descriptions())
    assert class_names.default_class_names(1000).labels[281] == "tabby, tabby cat"
    assert class_names.default_class_names(10).labels == tuple(str(i) for i in range(10))
    # a dataset whose folders are synsets (an ImageNet image folder, TFDS imagenet2012) reads as names
    named = class_names.dataset_class_names(["n01440764", "my_class"], source="folders")
    assert named.labels == ("tench, Tinca tinca", "my_class") and named.ids == ("n01440764", "my_class")


def test_predictions_are_timms_softmax_on_timms_transform(timm_file, timm_predictor, photos):
    """Preprocessing, weights, softmax and ranking end to end: the probabilities timm gives on the
    same files (timm's own eval transform from the model's pretrained config), to fp32 precision."""
    import timm.data
    import torch
    from PIL import Image

    model, _ = timm_file
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model), is_training=False)
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
        expected = torch.softmax(model(batch), dim=-1).numpy()

    predictor = timm_predictor
    assert predictor.preprocessing.image_size == 160  # test_mambaout's pretrained cfg
    predictions, failures = predictor.predict_files([str(p) for p in photos], top_k=5)
    assert not failures and [p.image for p in predictions] == [str(p) for p in photos]
    imagenet = class_names.default_class_names(1000)
    for prediction, want in zip(predictions, expected):
        order = np.argsort(-want, kind="stable")[:5]
        assert [s.index for s in prediction.top] == order.tolist()
        assert [s.label for s in prediction.top] == [imagenet.labels[i] for i in order]
        np.testing.assert_allclose([s.prob for s in prediction.top], want[order], rtol=2e-5, atol=1e-8)
    # the whole distribution, and the in-memory path (PIL images) gives the same numbers
    arrays = np.stack([predictor.preprocessing.transform(p) for p in photos])
    np.testing.assert_allclose(predictor.probabilities(arrays), expected, rtol=2e-5, atol=1e-8)
    in_memory = predictor.predict([Image.open(p) for p in photos], top_k=5)
    assert [p.top for p in in_memory] == [p.top for p in predictions]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A train.py run's checkpoint, written by the trainer's own checkpoint writer with the meta
    train() records (model, classes, the digits config); the weights are random."""
    workdir = tmp_path_factory.mktemp("run")
    config = digits_config.get_config()
    model = build_model(config.model, num_classes=10, seed=1)
    meta = {"model": config.model, "num_classes": 10, "classes": [f"digit {i}" for i in range(10)], "config": config.to_json()}
    checkpoints = RunCheckpoints(workdir, meta, keep=1, every_steps=1)
    iterator = iter(grain.MapDataset.range(8).to_iter_dataset())
    state = {"params": {k: jax.numpy.asarray(v) for k, v in get_params(model).items()}, "step": np.int32(7)}
    checkpoints.save(7, state, iterator, force=True)
    checkpoints.close()
    return workdir, model


def test_a_run_predicts_with_its_own_classes_and_eval_settings(digits_run, monkeypatch):
    """A run's class names are its dataset's, and images are preprocessed as the run evaluated them
    (the digits config's 32 px), even when the run folder is given as a relative path."""
    workdir, model = digits_run
    predictor = load_predictor(workdir)
    assert predictor.classes.labels == tuple(f"digit {i}" for i in range(10))
    assert (predictor.preprocessing.image_size, predictor.preprocessing.crop_pct) == (32, 1.0)
    image = photo_image("coffee")
    x = predictor.preprocessing.transform(image)
    assert x.shape == (32, 32, 3)
    want = np.asarray(jax.jit(lambda x: jax.nn.softmax(model(x)))(predictor.preprocessing.normalize(x[None])))[0]
    (got,) = predictor.predict([image], top_k=10)
    np.testing.assert_allclose([s.prob for s in got.top], np.sort(want)[::-1], rtol=2e-5)
    assert got.top[0].label == f"digit {int(np.argmax(want))}"
    # flags override the run's settings
    assert load_predictor(workdir, image_size=48).preprocessing.image_size == 48
    monkeypatch.chdir(Path(workdir).parent)  # the relative path a user types
    assert load_predictor(Path(workdir).name).classes.labels[3] == "digit 3"


def test_cli_json_skips_unreadable_images_names_them_and_exits_1(timm_file, timm_predictor, photos, tmp_path, capsys):
    """--json: one object per readable image, in order; a corrupt image, a truncated one and a
    missing path are named on stderr, skipped, and the exit status is 1 after the rest is done."""
    _, path = timm_file
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    good = [folder / "a.jpg", folder / "sub" / "b.png"]
    good[0].write_bytes(photos[0].read_bytes())
    good[1].write_bytes(photos[1].read_bytes())
    (folder / "notes.txt").write_text("not an image, and not an image extension: ignored in folders\n")
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    truncated = folder / "sub" / "truncated.jpg"
    truncated.write_bytes(photos[2].read_bytes()[:2000])
    missing = tmp_path / "missing.jpg"

    code = predict_cli.main([str(folder), str(missing), "--weights", str(path), "--json", "--top", "3", "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"{corrupt}: cannot read the image" in err and f"{truncated}: cannot read the image" in err
    assert f"{missing}: no such file or folder" in err
    result = json.loads(out)
    assert [r["image"] for r in result] == [str(good[0]), str(good[1])]
    library = timm_predictor.predict(  # same batch size, so the very same numbers
[str(p) for p in good], top_k=3)
    for r, p in zip(result, library):
        assert set(r) == {"image", "top"} and all(set(s) == {"index", "label", "prob"} for s in r["top"])
        assert r["top"] == [{"index": s.index, "label": s.label, "prob": s.prob} for s in p.top]

    # all readable: 0; the table form names every image and its classes
    assert predict_cli.main([str(good[0]), "--weights", str(path), "--top", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == str(good[0]) and len(table) == 3 and table[1].split()[1:] == library[0].top[0].label.split() + [f"[{library[0].top[0].index}]"]


def test_cli_bad_weights_and_no_images_exit_2(photos, tmp_path, capsys):
    not_weights = tmp_path / "not_weights.safetensors"
    not_weights.write_bytes(b"garbage")
    assert predict_cli.main([str(photos[0]), "--weights", str(not_weights)]) == 2
    assert str(not_weights) in capsys.readouterr().err
    assert predict_cli.main([str(tmp_path / "nothing*.jpg"), "--weights", str(not_weights)]) == 2
    err = capsys.readouterr().err
    assert "a pattern that matches no image file" in err and "no image to predict" in err


def test_backbone_weights_and_wrong_class_files_are_refused(tmp_path):
    model = build_model("test_mambaout", num_classes=0, seed=0)
    backbone = tmp_path / "backbone.safetensors"
    save_flax_weights(backbone, get_params(model), model="test_mambaout", num_classes=0)
    with pytest.raises(CheckpointError, match="no classifier"):
        load_predictor(backbone)
    model = build_model("test_mambaout", num_classes=4, seed=0)
    four = tmp_path / "four.safetensors"
    save_flax_weights(four, get_params(model), model="test_mambaout", num_classes=4)
    assert load_predictor(four).classes.labels == ("0", "1", "2", "3")  # no names known: the indices
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\nn01440764\ttench\n")
    with pytest.raises(ValueError, match=r"3 class names .*names.txt.* 4 classes"):
        load_predictor(four, class_names_file=str(names))
    names.write_text("cat\ndog\nn01440764\ttench\nbird\n")
    loaded = load_predictor(four, class_names_file=str(names))
    assert loaded.classes.labels == ("cat", "dog", "tench", "bird") and loaded.classes.ids[2] == "n01440764"


def test_image_paths_from_files_folders_and_globs(tmp_path):
    (tmp_path / "f" / "deep").mkdir(parents=True)
    for name in ("f/b.JPEG", "f/a.png", "f/deep/c.webp", "f/readme.md", "x.jpg", "odd.name"):
        (tmp_path / name).write_bytes(b"")
    paths, failures = expand_image_paths(
        [str(tmp_path / "odd.name"), str(tmp_path / "f"), str(tmp_path / "*.jpg"), str(tmp_path / "nope*.png"), str(tmp_path / "empty")]
    )
    rel = [str(Path(p).relative_to(tmp_path)) for p in paths]
    assert rel == ["odd.name", "f/a.png", "f/b.JPEG", "f/deep/c.webp", "x.jpg"]
    assert [(Path(f.image).name, f.reason) for f in failures] == [
        ("nope*.png", "a pattern that matches no image file"), ("empty", "no such file or folder"),
    ]  # fmt: skip
