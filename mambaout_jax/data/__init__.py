"""Input pipeline: sources, timm-exact host transforms, device-side batch transforms, grain.

Host side (grain workers, NumPy/PIL): `tfds_source`, `image_folder_source`, `eval_transform`,
`TrainTransform`, `LoaderOptions`, `make_train_iterator`, `make_eval_iterator`; the one eval
preprocessing resolver `resolve_eval_preprocessing` -> `EvalPreprocessing`. Device side (pure jnp, inside the
jitted step): `normalize`, `mixup_cutmix`, `random_erasing`, `augment_train_batch` with a
`BatchAugmentation`.
Checkpointing the iterator with orbax: `checkpointing.save_args` / `restore_args`.
"""

from mambaout_jax.data.auto_augment import RandAugment
from mambaout_jax.data.batch_transforms import (
    BatchAugmentation,
    augment_train_batch,
    mixup_cutmix,
    normalize,
    one_hot_targets,
    random_erasing,
)
from mambaout_jax.data.checkpointing import DATA_ITERATOR, restore_args, save_args
from mambaout_jax.data.pipeline import (
    CorruptRecordError,
    LoaderOptions,
    PipelineIterator,
    eval_steps,
    make_eval_iterator,
    make_train_iterator,
)
from mambaout_jax.data.preprocessing import EvalPreprocessing, resolve_eval_preprocessing
from mambaout_jax.data.sources import (
    ImageFolderSource,
    TfdsSource,
    image_folder_source,
    tfds_source,
)
from mambaout_jax.data.transforms import (
    IMAGENET_FILL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    TrainTransform,
    decode_rgb,
    eval_transform,
)

__all__ = [
    "BatchAugmentation",
    "DATA_ITERATOR",
    "EvalPreprocessing",
    "LoaderOptions",
    "IMAGENET_FILL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptRecordError",
    "ImageDecodeError",
    "ImageFolderSource",
    "PipelineIterator",
    "RandAugment",
    "TfdsSource",
    "TrainTransform",
    "augment_train_batch",
    "decode_rgb",
    "eval_steps",
    "eval_transform",
    "image_folder_source",
    "make_eval_iterator",
    "make_train_iterator",
    "mixup_cutmix",
    "normalize",
    "one_hot_targets",
    "random_erasing",
    "resolve_eval_preprocessing",
    "restore_args",
    "save_args",
    "tfds_source",
]
