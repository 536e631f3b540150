"""Host transforms against timm: eval pixels exactly equal, train randomness equally distributed."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from data_fixtures import IMAGE_SIZES, PHOTOS, encode, odd_mode_images, photo_image, require
from mambaout_jax.data import TrainTransform, decode_rgb, eval_transform
from mambaout_jax.data.auto_augment import (
    RAND_INCREASING_TRANSFORMS,
    RandAugment,
    SampledOp,
    apply_op,
    op_argument,
)
from mambaout_jax.data.transforms import IMAGENET_FILL, ImageDecodeError, sample_resized_crop

timm_data = require("timm.data", "timm's transforms are the reference")
from timm.data import auto_augment as timm_aa  # noqa: E402
from timm.data.transforms import RandomResizedCropAndInterpolation  # noqa: E402

# (size, crop_pct, interpolation, crop_mode): the model zoo's eval settings plus rounding traps
# (crop_pct that doesn't divide evenly, > 1 so the crop pads, a non-square size).
EVAL_SETTINGS = (
    (224, 1.0, "bicubic", "center"),
    (288, 1.0, "bicubic", "center"),
    (224, 0.95, "bicubic", "center"),
    (224, 0.875, "bilinear", "center"),
    (256, 0.9, "bicubic", "center"),
    (224, 1.15, "bicubic", "center"),
    ((224, 160), 0.95, "bicubic", "center"),
    (384, 1.0, "bicubic", "squash"),
    (224, 0.95, "bilinear", "squash"),
)


def _timm_eval_pixels(image: Image.Image, size, crop_pct, interpolation, crop_mode) -> np.ndarray:
    transform = timm_data.create_transform(
        size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
        crop_mode=None if crop_mode == "center" else crop_mode,
    )
    for t in transform.transforms[:-2]:  # everything before MaybeToTensor + Normalize
        image = t(image)
    return np.asarray(image)


@pytest.mark.parametrize("name", PHOTOS)
def test_eval_transform_is_pixel_equal_to_timm(name):
    mismatches = []
    for width, height in IMAGE_SIZES:
        data = encode(photo_image(name, (width, height)))  # JPEG bytes, as read from a dataset
        timm_input = Image.open(io.BytesIO(data)).convert("RGB")  # timm's loader
        for setting in EVAL_SETTINGS:
            expected = _timm_eval_pixels(timm_input, *setting)
            size, crop_pct, interpolation, crop_mode = setting
            got = eval_transform(data, size=size, crop_pct=crop_pct,
                                 interpolation=interpolation, crop_mode=crop_mode)
            assert got.dtype == np.uint8
            if got.shape != expected.shape or not np.array_equal(got, expected):
                mismatches.append(((width, height), setting))
    assert not mismatches, f"eval_transform differs from timm for {mismatches}"


def test_eval_transform_accepts_pil_images_and_paths(tmp_path):
    image = photo_image("coffee", (500, 333))
    path = tmp_path / "coffee.png"
    image.save(path)
    from_pil = eval_transform(image, size=224, crop_pct=0.95)
    np.testing.assert_array_equal(from_pil, eval_transform(str(path), size=224, crop_pct=0.95))
    np.testing.assert_array_equal(from_pil, _timm_eval_pixels(image, 224, 0.95, "bicubic", "center"))


def test_every_image_mode_decodes_to_the_rgb_timm_loads():
    for file_name, data in odd_mode_images().items():
        rgb = decode_rgb(data)
        assert rgb.mode == "RGB", file_name
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(rgb), expected, err_msg=file_name)


@pytest.mark.parametrize("data", [b"", b"not an image", encode(photo_image("rocket"))[:3000]],
                         ids=["empty", "garbage", "truncated_jpeg"])
def test_undecodable_bytes_raise_image_decode_error(data):
    with pytest.raises(ImageDecodeError):
        eval_transform(data)
    with pytest.raises(ImageDecodeError):
        TrainTransform()(data, np.random.default_rng(0))


# --- RandAugment -------------------------------------------------------------------------------

TIMM_HPARAMS = dict(translate_const=100, img_mean=IMAGENET_FILL)


def _timm_level_args(name, level, negate):
    """timm's LEVEL_TO_ARG for `name`, with its random sign forced."""
    original = random.random
    random.random = lambda: 0.9 if negate else 0.1  # _randomly_negate negates when > 0.5
    try:
        level_fn = timm_aa.LEVEL_TO_ARG[name]
        return level_fn(level, TIMM_HPARAMS) if level_fn else ()
    finally:
        random.random = original


def test_rand_augment_ops_are_pixel_equal_to_timm():
    image = photo_image("chelsea", (224, 224))
    ops = RAND_INCREASING_TRANSFORMS + ("Posterize", "Solarize", "Color", "Contrast", "Brightness",
                                        "Sharpness")
    ra = RandAugment(ops=ops)
    checked = 0
    for name in ops:
        for level in (0.0, 2.7, 9.0, 10.0):
            for negate in (False, True):
                for resample in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
                    (arg,) = _timm_level_args(name, level, negate) or (None,)
                    assert op_argument(name, level, negate, ra.translate_pct) == arg, name
                    got = np.asarray(apply_op(image, SampledOp(name, arg, resample), IMAGENET_FILL))
                    try:
                        expected = timm_aa.NAME_TO_OP[name](
                            image, *(() if arg is None else (arg,)), fillcolor=IMAGENET_FILL,
                            resample=resample,
                        )
                    except ValueError:
                        # Pillow >= 10.x rejects posterize(0 bits), crashing timm at the strongest
                        # level; we return what older Pillow (and so the recipe) produced: black.
                        assert "Posterize" in name and arg == 0
                        assert not got.any()
                        continue
                    np.testing.assert_array_equal(got, np.asarray(expected), err_msg=name)
                    checked += 1
    assert checked > 300


def test_rand_augment_config_matches_timms_parse():
    ours = RandAugment.from_config("rand-m9-mstd0.5-inc1", fill=IMAGENET_FILL)
    theirs = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(TIMM_HPARAMS))
    assert ours.ops == tuple(op.name for op in theirs.ops) == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert ours.num_layers == theirs.num_layers == 2
    assert {op.magnitude for op in theirs.ops} == {ours.magnitude} == {9}
    assert {op.magnitude_std for op in theirs.ops} == {ours.magnitude_std} == {0.5}
    assert {op.prob for op in theirs.ops} == {ours.prob} == {0.5}
    assert {op.kwargs["fillcolor"] for op in theirs.ops} == {ours.fill} == {(124, 116, 104)}
    plain = RandAugment.from_config("rand-m7-n3-p0.7-mstd101")
    assert plain.ops == tuple(timm_aa._RAND_TRANSFORMS)
    assert (plain.magnitude, plain.num_layers, plain.prob, plain.magnitude_std) == (7, 3, 0.7, math.inf)
    for bad in ("rand-m9-tweights", "rand-x3", "augmix-m5"):
        with pytest.raises(ValueError):
            RandAugment.from_config(bad)


def _record_timm_rand_augment(num_images: int, seed: int) -> list[list[tuple]]:
    """Runs timm's RandAugment with each op replaced by a recorder of (name, args, resample)."""
    random.seed(seed)
    np.random.seed(seed)
    transform = timm_aa.rand_augment_transform("rand-m9-mstd0.5-inc1", dict(TIMM_HPARAMS))
    applied: list[tuple] = []
    for op in transform.ops:
        def recorder(img, *args, _name=op.name, **kwargs):
            if _name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
                kwargs["resample"] = timm_aa._interpolation(kwargs)
            applied.append((_name, args[0] if args else None, kwargs.get("resample")))
            return img
        op.aug_fn = recorder
    per_image = []
    for _ in range(num_images):
        applied.clear()
        transform(None)
        per_image.append(list(applied))
    return per_image


def test_rand_augment_sampling_matches_timm():
    n = 6000
    theirs = _record_timm_rand_augment(n, seed=0)
    ra = RandAugment.from_config("rand-m9-mstd0.5-inc1", fill=IMAGENET_FILL)
    rng = np.random.default_rng(0)
    ours = [[(op.name, op.arg, op.resample) for op in ra.sample(rng)] for _ in range(n)]

    # How many of the 2 layers fire per image: Binomial(2, 0.5) in both.
    count_ours = np.bincount([len(x) for x in ours], minlength=3) / n
    count_theirs = np.bincount([len(x) for x in theirs], minlength=3) / n
    np.testing.assert_allclose(count_ours, count_theirs, atol=0.03)
    np.testing.assert_allclose(count_ours, [0.25, 0.5, 0.25], atol=0.03)

    # Which ops occur: the same 15, each ~1/15 of the applied ops.
    flat_ours = [op for ops in ours for op in ops]
    flat_theirs = [op for ops in theirs for op in ops]
    names = sorted(set(RAND_INCREASING_TRANSFORMS))
    assert sorted({op[0] for op in flat_ours}) == sorted({op[0] for op in flat_theirs}) == names
    freq = lambda ops: np.array([sum(op[0] == name for op in ops) for name in names]) / len(ops)  # noqa: E731
    np.testing.assert_allclose(freq(flat_ours), freq(flat_theirs), atol=0.02)

    # Op arguments (magnitude noise, random sign, clipping at 10) per op, and the interpolations.
    for name in ("Rotate", "ShearX", "TranslateYRel", "ColorIncreasing", "SharpnessIncreasing",
                 "SolarizeIncreasing", "PosterizeIncreasing", "SolarizeAdd"):
        a = [op[1] for op in flat_ours if op[0] == name]
        b = [op[1] for op in flat_theirs if op[0] == name]
        assert stats.ks_2samp(a, b).pvalue > 1e-3, name
        if name == "Rotate":
            assert np.mean(np.array(a) < 0) == pytest.approx(0.5, abs=0.07)
            assert max(np.abs(a)) == pytest.approx(30.0)  # magnitude clipped at 10 -> 30 degrees
    resample = [op[2] for op in flat_ours if op[2] is not None]
    assert np.mean([r == Image.Resampling.BICUBIC for r in resample]) == pytest.approx(0.5, abs=0.05)


# --- RandomResizedCrop and flip ----------------------------------------------------------------


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (640, 201), (97, 131)])
def test_random_resized_crop_box_distribution_matches_timm(size):
    width, height = size
    n = 4000
    random.seed(1)
    blank = Image.new("RGB", size)
    theirs = np.array([RandomResizedCropAndInterpolation.get_params(blank, (0.08, 1.0), (3 / 4, 4 / 3))
                       for _ in range(n)])
    rng = np.random.default_rng(1)
    ours = np.array([sample_resized_crop(width, height, rng) for _ in range(n)])
    for boxes in (ours, theirs):  # (top, left, h, w) inside the image
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
    features = {
        "area": lambda b: b[:, 2] * b[:, 3] / (width * height),
        "aspect": lambda b: b[:, 3] / b[:, 2],
        "centre_x": lambda b: (b[:, 1] + b[:, 3] / 2) / width,
        "centre_y": lambda b: (b[:, 0] + b[:, 2] / 2) / height,
    }
    for feature, fn in features.items():
        assert stats.ks_2samp(fn(ours), fn(theirs)).pvalue > 1e-3, feature


def test_train_transform_flips_half_the_images_and_only_flips():
    image = photo_image("astronaut", (300, 240))
    plain = TrainTransform(random_resized_crop=False, rand_augment=None, hflip=0.0)
    flipping = TrainTransform(random_resized_crop=False, rand_augment=None, hflip=0.5)
    unflipped = plain(image, np.random.default_rng(0))
    mirrored = unflipped[:, ::-1]
    outcomes = []
    for seed in range(2000):
        out = flipping(image, np.random.default_rng(seed))
        is_plain, is_mirror = np.array_equal(out, unflipped), np.array_equal(out, mirrored)
        assert is_plain != is_mirror
        outcomes.append(is_mirror)
    assert np.mean(outcomes) == pytest.approx(0.5, abs=4 * 0.5 / math.sqrt(2000))
    # No-aug path is timm's: resize shorter side to 224 (bilinear for 'random') + centre crop.
    expected = _timm_eval_pixels(image, 224, 1.0, "bilinear", "center")
    np.testing.assert_array_equal(unflipped, expected)


def test_train_transform_crops_the_sampled_box_with_a_random_interpolation():
    image = photo_image("coffee", (500, 333))
    data = encode(image)
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    transform = TrainTransform(rand_augment=None, hflip=0.0, jpeg_draft=False)
    used = set()
    for seed in range(20):
        out = transform(data, np.random.default_rng(seed))
        replay = np.random.default_rng(seed)
        top, left, h, w = sample_resized_crop(500, 333, replay)
        resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(replay.integers(2))]
        used.add(resample)
        expected = decoded.crop((left, top, left + w, top + h)).resize((224, 224), resample)
        np.testing.assert_array_equal(out, np.asarray(expected))
    assert len(used) == 2


def test_jpeg_draft_decodes_large_crops_at_reduced_scale_with_nearly_the_same_pixels():
    data = encode(photo_image("hubble_deep_field"))  # 1000 x 872: crops often span >= 448 px
    exact = TrainTransform(rand_augment=None, hflip=0.0, jpeg_draft=False, interpolation="bicubic")
    draft = TrainTransform(rand_augment=None, hflip=0.0, jpeg_draft=True, interpolation="bicubic")
    reduced, differences = 0, []
    for seed in range(40):
        a = exact(data, np.random.default_rng(seed)).astype(np.float32)
        b = draft(data, np.random.default_rng(seed)).astype(np.float32)
        if not np.array_equal(a, b):
            reduced += 1
            differences.append(np.abs(a - b).mean())
    assert reduced >= 10  # draft decoding did kick in for the big crops ...
    assert max(differences) < 4.0  # ... and changed pixels only by resampling noise (0..255).


def test_train_transform_is_a_function_of_the_generator():
    data = encode(photo_image("rocket", (500, 375)))
    transform = TrainTransform()
    a = transform(data, np.random.default_rng(7))
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, transform(data, np.random.default_rng(7)))
    assert not np.array_equal(a, transform(data, np.random.default_rng(8)))
