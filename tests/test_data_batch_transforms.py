"""Device-side batch transforms: exact normalisation, and mixup/cutmix and random erasing drawing
from timm's distributions (timm's own samplers are run for comparison)."""

from __future__ import annotations

import functools
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from data_fixtures import require
from mambaout_jax.data import (
    IMAGENET_MEAN,
    BatchAugmentation,
    IMAGENET_STD,
    augment_train_batch,
    mixup_cutmix,
    normalize,
    one_hot_targets,
    random_erasing,
)
from mambaout_jax.data.batch_transforms import _group_draws, flip_groups

timm_mixup = require("timm.data.mixup", "timm's Mixup is the reference")
from timm.data.random_erasing import RandomErasing  # noqa: E402


def test_normalize_matches_torchvision_to_tensor_and_normalize():
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    got = np.asarray(jax.jit(normalize, static_argnames="dtype")(images, IMAGENET_MEAN, IMAGENET_STD))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)  # ToTensor
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    expected = x.sub(mean).div(std).permute(0, 2, 3, 1).numpy()  # Normalize
    # XLA multiplies by reciprocals instead of dividing: a few float32 ulps apart, no more.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    half = normalize(images, IMAGENET_MEAN, IMAGENET_STD, dtype=jnp.bfloat16)
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), expected, rtol=2**-8, atol=1e-6)


def test_one_hot_targets_are_timms_smoothed_targets():
    targets = np.asarray(one_hot_targets(jnp.array([3, 0]), 10, label_smoothing=0.1))
    expected = timm_mixup.mixup_target(torch.tensor([3, 0]), 10, lam=1.0, smoothing=0.1).numpy()
    np.testing.assert_allclose(targets, expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)


H = W = 32
NUM_CLASSES = 10
LABELS = jnp.array([1, 4, 7, 9])


def _images(seed: int = 0, batch: int = 4) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, H, W, 3))


@pytest.fixture(scope="module")
def mixed():
    """2000 independent applications of the recipe's mixup/cutmix to one batch."""
    fn = jax.jit(jax.vmap(
        lambda k, x: mixup_cutmix(k, x, LABELS, NUM_CLASSES, return_lam=True), in_axes=(0, None)
    ))
    images = _images()
    out_images, targets, lam = fn(jax.random.split(jax.random.key(42), 2000), images)
    return np.asarray(images), np.asarray(out_images), np.asarray(targets), np.asarray(lam)[:, 0]


def test_mixup_cutmix_targets_are_smoothed_one_hots_mixed_by_lambda(mixed):
    _, _, targets, lam = mixed
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-5)
    smooth = np.asarray(one_hot_targets(LABELS, NUM_CLASSES, 0.1))
    expected = lam[:, None, None] * smooth + (1 - lam[:, None, None]) * smooth[::-1]
    np.testing.assert_allclose(targets, expected, atol=1e-6)


def _classify(images, out, lam):
    """'mixup' if out = lam x + (1 - lam) flip(x); 'cutmix' if every pixel comes from x or
    flip(x) and flip(x) covers exactly a 1 - lam fraction of the image."""
    flipped = images[::-1]
    if np.allclose(out, lam * images + (1 - lam) * flipped, atol=1e-5):
        return "mixup"
    from_flip = np.all(out == flipped, axis=-1) & ~np.all(out == images, axis=-1)
    from_self = np.all(out == images, axis=-1)
    assert np.all(from_flip | from_self)
    assert np.all(from_flip[0] == from_flip), "one box for the whole batch"
    assert from_flip[0].mean() == pytest.approx(1 - lam, abs=1e-6)
    return "cutmix"


def test_mixup_cutmix_switches_half_the_time_with_timms_lambda_distributions(mixed):
    images, out, _, lam = mixed
    kinds = np.array([_classify(images, o, l) for o, l in zip(out, lam)])
    assert np.mean(kinds == "cutmix") == pytest.approx(0.5, abs=4 * 0.5 / math.sqrt(len(kinds)))

    # Mixup: lam ~ Beta(0.8, 0.8) (here and, with more samples, in the next test).
    assert stats.kstest(lam[kinds == "mixup"], stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
    # CutMix: lam ~ Beta(1, 1), then corrected to the clipped box as in timm.
    np.random.seed(0)
    timm_lam = [
        timm_mixup.cutmix_bbox_and_lam((4, 3, H, W), np.random.beta(1.0, 1.0), correct_lam=True)[1]
        for _ in range(4000)
    ]
    assert stats.ks_2samp(lam[kinds == "cutmix"], timm_lam).pvalue > 1e-3


def test_mixup_lambda_is_beta_of_mixup_alpha():
    # Beta(0.8, 0.8) is within 0.033 of uniform in CDF: 20000 draws tell them apart.
    draw = jax.jit(jax.vmap(lambda k: mixup_cutmix(
        k, jnp.zeros((2, 1, 1, 1)), LABELS[:2], NUM_CLASSES, cutmix_alpha=0.0, return_lam=True)[2]))
    lam = np.asarray(draw(jax.random.split(jax.random.key(5), 20000)))[:, 0]
    assert stats.kstest(lam, stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
    assert stats.kstest(lam, stats.uniform().cdf).pvalue < 1e-6


def test_mixup_cutmix_off_and_cutmix_only():
    images = _images()
    never = mixup_cutmix(jax.random.key(0), images, LABELS, NUM_CLASSES, prob=0.0)
    np.testing.assert_array_equal(never[0], images)
    np.testing.assert_allclose(never[1], one_hot_targets(LABELS, NUM_CLASSES, 0.1), atol=1e-7)
    cutmix_only = jax.jit(jax.vmap(lambda k: mixup_cutmix(
        k, images, LABELS, NUM_CLASSES, mixup_alpha=0.0, return_lam=True)))
    out, _, lam = cutmix_only(jax.random.split(jax.random.key(1), 20))
    for o, l in zip(np.asarray(out), np.asarray(lam)[:, 0]):
        assert _classify(np.asarray(images), o, l) == "cutmix"


def test_mixup_groups_are_strided_mix_only_within_themselves_with_their_own_lambda():
    images = _images(batch=8)
    labels = jnp.arange(8)
    out, targets, lam = mixup_cutmix(jax.random.key(3), images, labels, NUM_CLASSES,
                                     group_size=4, return_lam=True)
    assert lam.shape == (2,) and lam[0] != lam[1]
    # Group 0 is rows 0, 2, 4, 6 (strided): its output doesn't depend on group 1's images, and its
    # targets only on its own labels, each row paired with its mirror in the group (0-6, 2-4).
    other = images.at[1::2].set(0.0)
    out_other, _ = mixup_cutmix(jax.random.key(3), other, labels, NUM_CLASSES, group_size=4)
    np.testing.assert_array_equal(out[0::2], out_other[0::2])
    t = np.asarray(targets)
    assert np.all(t[0::2][:, 1::2] == t[0, 9])  # only smoothing mass on group 1's labels
    assert t[0, 6] > t[0, 9] and t[2, 4] > t[2, 9]
    np.testing.assert_array_equal(flip_groups(jnp.arange(8), 4), [6, 7, 4, 5, 2, 3, 0, 1])
    with pytest.raises(ValueError, match="groups of 3"):
        mixup_cutmix(jax.random.key(3), images, labels, NUM_CLASSES, group_size=3)


def test_mixing_a_batch_equals_mixing_each_accumulation_split_of_it():
    """Micro-batch j of k (rows j, j + k, ...) holds whole strided groups: mixing it alone with the
    groups' own keys gives its rows of the whole batch's mix, for every k dividing the groups."""
    images = _images(batch=16)
    labels = jnp.arange(16) % NUM_CLASSES
    whole, t_whole = mixup_cutmix(jax.random.key(5), images, labels, NUM_CLASSES, group_size=4)
    for k in (2, 4):
        for j in range(k):
            draws = jax.vmap(lambda g: jax.random.fold_in(jax.random.key(5), g))(jnp.arange(j, 4, k))
            part = mixup_cutmix_with_group_keys(draws, images[j::k], labels[j::k])
            np.testing.assert_array_equal(part[0], whole[j::k])
            np.testing.assert_array_equal(part[1], t_whole[j::k])


def mixup_cutmix_with_group_keys(group_keys, images, labels):
    """The reference: timm's per-group mix written out, each strided group on its own."""
    n = group_keys.shape[0]
    out, targets = images, one_hot_targets(labels, NUM_CLASSES, 0.1)
    out_t = targets
    for g in range(n):
        lam, box, cutmix, apply = _group_draws(
            group_keys[g], H, W, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, correct_lam=True
        )
        x, t = images[g::n], targets[g::n]
        mixed = jnp.where(cutmix, jnp.where(box[..., None], x[::-1], x), x * lam + x[::-1] * (1 - lam))
        out = out.at[g::n].set(jnp.where(apply | cutmix, mixed, x))
        out_t = out_t.at[g::n].set(t * lam + t[::-1] * (1 - lam))
    return out, out_t


@pytest.fixture(scope="module")
def erased():
    """The recipe's random erasing applied to 6000 all-zero 32x32 images."""
    zeros = jnp.zeros((6000, H, W, 3))
    out = jax.jit(random_erasing)(jax.random.key(0), zeros)
    return np.asarray(out)


def _boxes(out: np.ndarray) -> list[tuple[int, int] | None]:
    """(height, width) of the erased box of each image, checking it is one filled rectangle."""
    boxes = []
    for image in out:
        touched = np.any(image != 0, axis=-1)
        if not touched.any():
            boxes.append(None)
            continue
        rows, cols = np.flatnonzero(touched.any(1)), np.flatnonzero(touched.any(0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert touched.sum() == h * w, "erased region is not a single filled box"
        boxes.append((h, w))
    return boxes


def _timm_erased_boxes(n: int) -> list[tuple[int, int] | None]:
    random.seed(0)
    torch.manual_seed(0)
    eraser = RandomErasing(0.25, mode="pixel", device="cpu")
    out = eraser(torch.zeros(n, 3, H, W)).permute(0, 2, 3, 1).numpy()
    return _boxes(out)


def test_random_erasing_matches_timms_probability_and_box_distribution(erased):
    ours, theirs = _boxes(erased), _timm_erased_boxes(6000)
    rate = np.mean([b is not None for b in ours])
    assert rate == pytest.approx(0.25, abs=4 * math.sqrt(0.25 * 0.75 / len(ours)))
    assert rate == pytest.approx(np.mean([b is not None for b in theirs]), abs=0.03)
    ours_hw = np.array([b for b in ours if b is not None], np.float64)
    theirs_hw = np.array([b for b in theirs if b is not None], np.float64)
    for boxes in (ours_hw, theirs_hw):  # strictly inside the image, up to nearly its full side
        assert boxes.max() < H and boxes.max() >= H - 3
    for name, fn in {"area": lambda b: b[:, 0] * b[:, 1], "aspect": lambda b: b[:, 0] / b[:, 1],
                     "height": lambda b: b[:, 0]}.items():
        assert stats.ks_2samp(fn(ours_hw), fn(theirs_hw)).pvalue > 1e-3, name
    noise = erased[erased != 0]
    assert abs(noise.mean()) < 0.02 and noise.std() == pytest.approx(1.0, abs=0.02)


def test_augment_train_batch_compiles_once_and_returns_the_requested_dtype():
    # The recipe's settings are Python constants bound before jit, as a train step does.
    config = dict(num_classes=NUM_CLASSES, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=jnp.bfloat16)
    fn = jax.jit(functools.partial(augment_train_batch, augmentation=BatchAugmentation(mix_group_size=4), **config))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, H, W, 3), np.uint8))
    a, ta = fn(jax.random.key(0), images, LABELS)
    b, tb = fn(jax.random.key(1), images, LABELS)
    assert fn._cache_size() == 1
    assert a.dtype == jnp.bfloat16 and a.shape == (4, H, W, 3) and ta.shape == (4, NUM_CLASSES)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(tb).sum(-1), 1.0, atol=1e-5)
    off = jax.jit(functools.partial(
        augment_train_batch, augmentation=BatchAugmentation(mixup_alpha=0.0, cutmix_alpha=0.0, erase_prob=0.0), **config
    ))
    plain, targets = off(jax.random.key(0), images, LABELS)
    np.testing.assert_array_equal(plain, normalize(images, IMAGENET_MEAN, IMAGENET_STD, dtype=jnp.bfloat16))
    np.testing.assert_allclose(targets, one_hot_targets(LABELS, NUM_CLASSES, 0.1), atol=1e-7)
