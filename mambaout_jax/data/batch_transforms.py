"""Device-side batch transforms: pure jnp functions for use inside the jitted, sharded train step.

Images cross host -> device as uint8 NHWC (4x less transfer than float32); these functions then
normalise, mix and erase them on the accelerator. All shapes are static: boxes are built as
masks from `iota` comparisons and branches are `jnp.where` selects, so each function traces once.
Randomness comes only from the explicit `key`.

Semantics follow timm (mixup.py, random_erasing.py) as the MambaOut recipe used them, in the order
of timm's default (prefetcher) training path: normalise -> mixup/cutmix -> random erasing, so
erased boxes hold pure noise rather than a mix. `augment_train_batch` chains the three.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

ERASE_MODES = ("pixel", "rand", "const")


@dataclasses.dataclass(frozen=True)
class BatchAugmentation:
    """The recipe's device-side augmentation, timm's settings (``augment_train_batch`` applies it).

    Mixup (``mixup_alpha``) / CutMix (``cutmix_alpha``) with probability ``mix_prob``, CutMix chosen
    with ``switch_prob`` when both are on; label smoothing of the targets; random erasing with
    ``erase_prob`` (``erase_mode``: 'pixel' noise, 'rand' colour, 'const' zeros). 0 turns a part off.
    ``mix_group_size``: how many rows Mixup/CutMix pair among (``flip_groups``); the authors'
    DistributedDataParallel run mixed each GPU's 128 on its own, whatever the GPU count.
    """

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    erase_prob: float = 0.25
    erase_mode: str = "pixel"
    mix_group_size: int = 128  # rows mixed together: the authors' per-GPU batch (8 GPUs x 128)

    def __post_init__(self):
        if not isinstance(self.mix_group_size, int) or self.mix_group_size <= 0:
            raise ValueError(f"mix_group_size must be a positive int, got {self.mix_group_size!r}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("mix_prob", "switch_prob", "label_smoothing", "erase_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.erase_mode not in ERASE_MODES:
            raise ValueError(f"erase_mode must be one of {ERASE_MODES}, got {self.erase_mode!r}")

    @property
    def mixes(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0



def normalize(
    images: jax.Array,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    dtype=jnp.float32,
) -> jax.Array:
    """uint8 [..., H, W, C] -> (x / 255 - mean) / std in `dtype`; mean/std in [0, 1] units.

    Computed in float32 in torchvision's operation order (ToTensor's divide, then Normalize's
    subtract and divide) and then cast. XLA turns the divisions into multiplications by
    reciprocals, so values can differ from PyTorch's in the last few bits (<= 1e-6 absolute).
    """
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return x.astype(dtype)


def one_hot_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """Smoothed one-hot float32 targets as timm's `mixup_target`: off = s / K, on = 1 - s + s / K."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), label_smoothing)


def _box_mask(height: int, width: int, top, bottom, left, right) -> jax.Array:
    """[H, W] bool mask of rows in [top, bottom) and columns in [left, right)."""
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def _erase_one(key, image, *, prob, min_area, max_area, log_aspect, mode, max_attempts):
    height, width, channels = image.shape
    k_apply, k_area, k_aspect, k_top, k_left, k_fill = jax.random.split(key, 6)
    apply = jax.random.uniform(k_apply) < prob
    # timm draws (area, aspect) up to 10 times and keeps the first box that fits strictly inside.
    area = jax.random.uniform(k_area, (max_attempts,), minval=min_area, maxval=max_area)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (max_attempts,), minval=log_aspect[0],
                                        maxval=log_aspect[1]))
    target_area = area * (height * width)
    box_h = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    box_w = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    fits = (box_w < width) & (box_h < height)
    first = jnp.argmax(fits)
    box_h, box_w = box_h[first], box_w[first]
    top = jax.random.randint(k_top, (), 0, height - box_h + 1)
    left = jax.random.randint(k_left, (), 0, width - box_w + 1)
    mask = _box_mask(height, width, top, top + box_h, left, left + box_w) & apply & fits.any()
    if mode == "pixel":
        fill = jax.random.normal(k_fill, image.shape, image.dtype)
    elif mode == "rand":
        fill = jax.random.normal(k_fill, (1, 1, channels), image.dtype)
    else:
        fill = jnp.zeros((1, 1, channels), image.dtype)
    return jnp.where(mask[..., None], fill, image)


def random_erasing(
    key: jax.Array,
    images: jax.Array,
    *,
    prob: float = 0.25,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    mode: str = "pixel",
    max_attempts: int = 10,
) -> jax.Array:
    """timm's RandomErasing (one box, `max_count=1`) on a normalised float batch [B, H, W, C].

    Each image independently, with probability `prob`: draw area ~ U(min_area, max_area) x H x W
    and aspect ~ log-U(min_aspect, max_aspect) up to `max_attempts` times, take the first box
    strictly smaller than the image, place it uniformly, fill it with per-pixel N(0, 1) noise
    ('pixel'), one N(0, 1) colour per channel ('rand') or zeros ('const'). If no attempt fits,
    the image is left alone, as in timm.
    """
    if mode not in ERASE_MODES:
        raise ValueError(f"mode must be one of {ERASE_MODES}, got {mode!r}")
    max_aspect = max_aspect or 1.0 / min_aspect
    keys = jax.random.split(key, images.shape[0])
    erase = lambda k, x: _erase_one(  # noqa: E731
        k, x, prob=prob, min_area=min_area, max_area=max_area,
        log_aspect=(math.log(min_aspect), math.log(max_aspect)), mode=mode,
        max_attempts=max_attempts,
    )
    return jax.vmap(erase)(keys, images)


def _group_draws(key, height, width, *, mixup_alpha, cutmix_alpha, prob, switch_prob, correct_lam):
    """timm's `Mixup._params_per_batch` + `rand_bbox` for one group: (lam, box [H, W], cutmix, apply)."""
    k_prob, k_switch, k_mixup, k_cutmix, k_y, k_x = jax.random.split(key, 6)
    apply = jax.random.uniform(k_prob) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    lam_cutmix = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)

    # timm's rand_bbox: a box of side sqrt(1 - lam) x image side, centre uniform over the image,
    # clipped at the borders; correct_lam then sets lam to the uncovered fraction.
    cut_ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut_ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * cut_ratio).astype(jnp.int32)
    centre_y = jax.random.randint(k_y, (), 0, height)
    centre_x = jax.random.randint(k_x, (), 0, width)
    top = jnp.clip(centre_y - cut_h // 2, 0, height)
    bottom = jnp.clip(centre_y + (cut_h + 1) // 2, 0, height)
    left = jnp.clip(centre_x - cut_w // 2, 0, width)
    right = jnp.clip(centre_x + (cut_w + 1) // 2, 0, width)
    box = _box_mask(height, width, top, bottom, left, right)
    lam_box = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    cutmix = use_cutmix & apply
    if correct_lam:
        lam = jnp.where(cutmix, lam_box, lam)
    return lam, box, cutmix, apply


def mix_groups(batch: int, group_size: int | None) -> int:
    """The number of Mixup/CutMix groups of ``group_size`` in ``batch`` rows (None: one group)."""
    group_size = group_size or batch
    if group_size <= 0 or batch % group_size:
        raise ValueError(f"a batch of {batch} does not split into Mixup/CutMix groups of {group_size}")
    return batch // group_size


def flip_groups(x: jax.Array, group_size: int | None = None) -> jax.Array:
    """Each row's Mixup/CutMix partner: the batch with every group reversed within itself.

    Groups are strided: with n = batch / group_size groups, group g is rows g, g + n, g + 2n, ...
    (member m is row g + m n) and member m is paired with member group_size - 1 - m, as timm's
    ``x.flip(0)`` pairs a GPU's batch. A reshape and a reverse, so under sharding XLA moves whole
    device blocks (a collective-permute) rather than gathering the batch. Strided groups make the
    pairing the same for every accumulation split: micro-batch j of ``grad_accum_steps`` k (rows
    j, j + k, ...) holds whole groups (g = j mod k) whenever k divides n.
    """
    n = mix_groups(x.shape[0], group_size)
    return x.reshape((x.shape[0] // n, n) + x.shape[1:])[::-1].reshape(x.shape)


def mixup_cutmix(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    num_classes: int,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    label_smoothing: float = 0.1,
    correct_lam: bool = True,
    group_size: int | None = None,
    partners: jax.Array | None = None,
    return_lam: bool = False,
):
    """timm's Mixup/CutMix in batch mode: returns (images, soft targets [B, num_classes]).

    With probability `prob` a group is mixed with itself reversed, by CutMix (probability
    `switch_prob`, lam ~ Beta(cutmix_alpha), box area 1 - lam, lam then corrected to the clipped
    box) or by Mixup (lam ~ Beta(mixup_alpha)). Targets are label-smoothed one-hots mixed with the
    same lam, so each row sums to 1.

    `group_size` (None: the whole batch) cuts the batch into strided groups (``flip_groups``), each
    with its own draws from ``fold_in(key, g)``: timm mixed each GPU's batch (128 in the authors'
    run) on its own. `partners` is ``flip_groups(images, group_size)`` when the caller has it
    already (``augment_train_batch`` moves the uint8 images, 4x fewer bytes than float32). Set
    `return_lam` to also get the per-group lambdas, shape [groups].
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("mixup_cutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
    batch, height, width = images.shape[:3]
    n = mix_groups(batch, group_size)
    draw = lambda g: _group_draws(  # noqa: E731
        jax.random.fold_in(key, g), height, width, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob,
        switch_prob=switch_prob, correct_lam=correct_lam,
    )  # fmt: skip
    lam, box, cutmix, apply = jax.vmap(draw)(jnp.arange(n))
    rows = lambda a: jnp.tile(a, (batch // n,) + (1,) * (a.ndim - 1))  # noqa: E731  row r: group r % n
    lam_r, box_r, cutmix_r, apply_r = rows(lam), rows(box), rows(cutmix), rows(apply)
    targets = one_hot_targets(labels, num_classes, label_smoothing)
    flipped = flip_groups(images, group_size) if partners is None else partners.astype(images.dtype)
    lam_x = lam_r[:, None, None, None]
    mixed = images * lam_x + flipped * (1.0 - lam_x)
    cut = jnp.where(box_r[..., None], flipped, images)
    images = jnp.where(cutmix_r[:, None, None, None], cut, jnp.where(apply_r[:, None, None, None], mixed, images))
    targets = targets * lam_r[:, None] + flip_groups(targets, group_size) * (1.0 - lam_r[:, None])
    return (images, targets, lam) if return_lam else (images, targets)


def augment_train_batch(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    augmentation: BatchAugmentation = BatchAugmentation(),
    *,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """The recipe's device-side augmentation: uint8 batch -> (normalised images, soft targets).

    normalise -> mixup/cutmix (skipped if both alphas or mix_prob are 0) -> random erasing
    (skipped if erase_prob is 0); work is done in float32 and the images cast to `dtype` at the end.
    Mixup/CutMix pair rows within strided groups of ``augmentation.mix_group_size``
    (``flip_groups``); erasing draws one key per row. So for a given batch and key, every row's
    result is the same however the batch is later split over devices or accumulation steps.
    """
    a = augmentation
    k_mix, k_erase = jax.random.split(key)
    x = normalize(images, mean, std, dtype=jnp.float32)
    if a.mixes:
        partners = normalize(flip_groups(images, a.mix_group_size), mean, std, dtype=jnp.float32)
        x, targets = mixup_cutmix(
            k_mix, x, labels, num_classes, mixup_alpha=a.mixup_alpha, cutmix_alpha=a.cutmix_alpha,
            prob=a.mix_prob, switch_prob=a.switch_prob, label_smoothing=a.label_smoothing,
            group_size=a.mix_group_size, partners=partners,
        )  # fmt: skip
    else:
        targets = one_hot_targets(labels, num_classes, a.label_smoothing)
    if a.erase_prob > 0:
        x = random_erasing(k_erase, x, prob=a.erase_prob, mode=a.erase_mode)
    return x.astype(dtype), targets
