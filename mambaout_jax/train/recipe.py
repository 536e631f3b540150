"""The run config: every field ``train()`` reads, with the authors' ImageNet-1k recipe as the values,
and the readers that turn a config into the typed settings the library takes.

A config file under ``configs/`` starts from ``recipe_config()`` and changes what its recipe
changes; ``--config.<field>=...`` overrides are checked against this set (the config is locked: a
typo is an error, not a silently ignored new key). Each reader below is the one place where config
fields become a library object, so a field is spelled out once.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp
from ml_collections import ConfigDict

from mambaout_jax.data.batch_transforms import BatchAugmentation
from mambaout_jax.data.pipeline import LoaderOptions
from mambaout_jax.data.preprocessing import EvalPreprocessing, resolve_eval_preprocessing
from mambaout_jax.data.transforms import TrainTransform
from mambaout_jax.models.inference import resolve_micro_batch

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A config value that cannot work; raised before anything compiles."""


def recipe_config() -> ConfigDict:
    """The authors' ImageNet-1k recipe (their repository's train script), every field listed."""
    c = ConfigDict()
    c.seed = 42

    # ---- model ----
    c.model = "mambaout_tiny"
    c.num_classes = 1000
    c.drop_path_rate = 0.2
    c.compute_dtype = "bfloat16"  # parameters are always float32
    c.dw_conv_impl = "auto"  # depthwise conv: 'grouped', 'shift' or 'auto' (by backend)
    c.init_from = ""  # PyTorch or Flax weights to start from (when there is no checkpoint to resume)

    # ---- data ----
    c.data = ConfigDict()
    c.data.source = "tfds"  # 'tfds' (imagenet2012 in ArrayRecord format) or 'folder' (root/{train,val}/<class>/)
    c.data.name = "imagenet2012"  # TFDS dataset name
    c.data.dir = ""  # TFDS data_dir or image-folder root
    c.data.train_split = "train"
    c.data.eval_split = "validation"  # 'val' for an image folder
    c.data.image_size = 224
    c.data.eval_image_size = 0  # 0: the model's eval input size
    c.data.eval_crop_pct = 0.0  # 0: the model's crop_pct
    c.data.worker_count = 8  # grain worker processes per host (~1 per core; see benchmarks/RESULTS.md)
    c.data.read_threads = 1
    c.data.strict = False  # True: a corrupt record stops the run instead of being skipped and counted
    c.data.cache_dir = ""  # only for the built-in digits dataset

    # ---- host augmentation (timm's train transform; the fields of data.TrainTransform) ----
    c.aug = ConfigDict()
    c.aug.random_resized_crop = True
    c.aug.scale = (0.08, 1.0)
    c.aug.ratio = (3 / 4, 4 / 3)
    c.aug.interpolation = "random"  # bilinear or bicubic per image
    c.aug.hflip = 0.5
    c.aug.rand_augment = "rand-m9-mstd0.5-inc1"  # '' disables
    c.aug.jpeg_draft = True
    # ---- device augmentation (the fields of data.BatchAugmentation) ----
    c.aug.mixup_alpha = 0.8
    c.aug.cutmix_alpha = 1.0
    c.aug.mix_prob = 1.0
    c.aug.switch_prob = 0.5
    c.aug.label_smoothing = 0.1
    c.aug.erase_prob = 0.25
    # Mixup/CutMix pair rows within groups of this many (strided over the global micro-batch), the
    # authors' per-GPU batch: the same mixing on any slice. The micro-batch must divide by it.
    c.aug.mix_group_size = 128

    # ---- optimisation ----
    c.batch_size = 4096  # global, over all devices and accumulation steps
    c.grad_accum_steps = 1  # the PyTorch repo's --grad-accum-steps (8 GPUs x 128 x 4 = 4096)
    c.epochs = 300
    c.warmup_epochs = 20
    c.cooldown_epochs = 10
    c.lr = 4e-3
    c.warmup_lr = 1e-6
    c.min_lr = 1e-5
    c.weight_decay = 0.05  # not applied to 1-D parameters (norms, biases, layer scale)
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.grad_clip_norm = 0.0  # 0: none (the recipe)
    c.ema_decay = 0.0  # 0: no EMA of weights (the recipe); e.g. 0.9998 to keep one
    c.sharding = "data_parallel"  # or 'fsdp' (shard parameters and optimizer state over 'data')
    # Rows per device per gradient piece: 'auto' (8 on CPU, where it keeps activations in cache;
    # the whole micro-batch elsewhere), 'none', or a number. Changes only float32 summation order.
    c.micro_batch = "auto"

    # ---- bookkeeping ----
    c.log_every_steps = 50
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.max_steps = 0  # > 0: stop after this many optimizer steps (smoke tests, benchmarks)
    c.eval_batch_size = 0  # 0: same as batch_size / grad_accum_steps
    # Resuming compares the checkpoint's config with this one (``check_resume_config``): fields
    # named here (comma-separated, e.g. 'data.dir,aug.erase_prob'; 'data' for all of data.*) may differ.
    c.resume_allow_changes = ""
    return c


def paper_model_config(model: str, drop_path_rate: float) -> ConfigDict:
    """The recipe for one of the paper's models, which differ only in their drop path rate."""
    c = recipe_config()
    c.model = model
    c.drop_path_rate = drop_path_rate
    return c


# ---------------------------------------------------------------------------------------------
# Readers: config -> library settings
# ---------------------------------------------------------------------------------------------


def _fields_of(cls, node: ConfigDict, **given) -> Any:
    """``cls(**given, **{every other field of cls that node has})``."""
    names = {f.name for f in dataclasses.fields(cls)} - set(given)
    values = {name: node[name] for name in names if name in node}
    for name in ("scale", "ratio"):  # ml_collections turns tuples given on the command line into lists
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return cls(**given, **values)


def host_augmentation(config) -> TrainTransform:
    """The host-side train transform (grain workers): ``config.aug``'s TrainTransform fields."""
    try:
        return _fields_of(TrainTransform, config.aug, image_size=config.data.image_size)
    except ValueError as e:
        raise ConfigError(f"config.aug: {e}") from None


def batch_augmentation(config) -> BatchAugmentation:
    """The device-side augmentation (inside the train step): ``config.aug``'s BatchAugmentation fields."""
    try:
        return _fields_of(BatchAugmentation, config.aug)
    except ValueError as e:
        raise ConfigError(f"config.aug: {e}") from None


def loader_options(config) -> LoaderOptions:
    """How grain reads and decodes: ``config.data``'s LoaderOptions fields."""
    return _fields_of(LoaderOptions, config.data)


def eval_preprocessing(config) -> EvalPreprocessing:
    """The model's eval preprocessing with the config's overrides (0 = the model's own value)."""
    return resolve_eval_preprocessing(
        config.model, image_size=config.data.eval_image_size or None, crop_pct=config.data.eval_crop_pct or None
    )


def compute_dtype(config) -> Any:
    if config.compute_dtype not in DTYPES:
        raise ConfigError(f"compute_dtype must be one of {sorted(DTYPES)}, got {config.compute_dtype!r}")
    return DTYPES[config.compute_dtype]


def micro_batch(config, platform: str) -> int | None:
    """Rows per device per gradient piece (``steps.make_train_step``) on ``platform``."""
    value = str(config.micro_batch).strip().lower()
    if value in ("auto", "none"):
        return resolve_micro_batch(value if value == "auto" else None, platform)
    if not value.isdigit() or int(value) <= 0:
        raise ConfigError(f"micro_batch must be 'auto', 'none' or a positive number, got {config.micro_batch!r}")
    return int(value)


def check_mix_groups(augmentation: BatchAugmentation, micro_batch_size: int) -> None:
    """Mixup/CutMix groups must tile the global micro-batch (``batch_transforms.flip_groups``)."""
    g = augmentation.mix_group_size
    if augmentation.mixes and micro_batch_size % g:
        raise ConfigError(
            f"the global micro-batch ({micro_batch_size} = batch_size / grad_accum_steps) does not split into "
            f"Mixup/CutMix groups of config.aug.mix_group_size={g}; choose a batch size that is a multiple of "
            f"{g} x grad_accum_steps, or another group size"
        )


# What a resumed run may not change silently: the fields that decide the data stream (which
# examples, in which order, augmented how, on how many hosts) or the maths of the step.
RESUME_GUARDED = (
    "model", "num_classes", "drop_path_rate", "compute_dtype", "batch_size", "grad_accum_steps", "seed", "sharding",
    "data", "aug",
)  # fmt: skip


def _flat(node, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def check_resume_config(saved_json: str | None, config, *, saved_process_count: int | None, process_count: int) -> None:
    """ConfigError listing every guarded field (``RESUME_GUARDED``, and the process count) in which
    ``config`` differs from the checkpoint's config, unless ``config.resume_allow_changes`` names it."""
    if not saved_json:
        return  # a checkpoint from before configs were saved: nothing to compare
    saved, current = _flat(json.loads(saved_json)), _flat(json.loads(config.to_json()))
    guarded = lambda f: any(f == g or f.startswith(g + ".") for g in RESUME_GUARDED)  # noqa: E731
    allowed = {a.strip() for a in str(config.resume_allow_changes).split(",") if a.strip()}
    ok = lambda f: any(f == a or f.startswith(a + ".") for a in allowed)  # noqa: E731
    changed = [
        f"{f}: {saved.get(f, '(absent)')!r} -> {current.get(f, '(absent)')!r}"
        for f in sorted(set(saved) | set(current))
        if guarded(f) and saved.get(f) != current.get(f) and not ok(f)
    ]
    if saved_process_count is not None and saved_process_count != process_count and not ok("process_count"):
        changed.append(f"process_count: {saved_process_count} -> {process_count}")
    if changed:
        raise ConfigError(
            "the checkpoint was written with a different data stream or maths; changed: " + "; ".join(changed)
            + ". If intended, name them in --config.resume_allow_changes="
            + ",".join(c.split(":")[0] for c in changed)
        )


def eval_batch_size(config) -> int:
    """The global eval batch: ``eval_batch_size``, else one training micro-batch."""
    return config.eval_batch_size or config.batch_size // config.grad_accum_steps
