"""The built-in default: a small MambaOut on scikit-learn's handwritten digits, on any laptop.

No download: the digits ship inside scikit-learn and are written once as an image folder (the
ImageNet layout) into a cache, then trained through the same grain pipeline and sharded step as
ImageNet. On the project's 2-core CPU it finishes in about 30 s at ~99% held-out top-1 (the test asks >= 90%).
"""

from mambaout_jax.data import digits
from mambaout_jax.train.recipe import recipe_config


def get_config():
    c = recipe_config()
    c.model = "test_mambaout"
    c.num_classes = 10
    c.drop_path_rate = 0.0
    c.compute_dtype = "float32"

    c.data.source = "digits"
    c.data.image_size = digits.IMAGE_SIZE
    c.data.eval_image_size = digits.IMAGE_SIZE
    c.data.eval_crop_pct = digits.EVAL_CROP_PCT
    c.data.worker_count = 0
    c.data.eval_split = "val"

    # Digits are not mirror-symmetric and are tiny: a mild crop jitter, nothing else.
    c.aug.scale = (0.6, 1.0)
    c.aug.ratio = (0.85, 1.18)
    c.aug.interpolation = "bilinear"
    c.aug.hflip = 0.0
    c.aug.rand_augment = ""
    c.aug.jpeg_draft = False
    c.aug.mixup_alpha = 0.0
    c.aug.cutmix_alpha = 0.0
    c.aug.label_smoothing = 0.1
    c.aug.erase_prob = 0.0

    c.batch_size = 64
    c.epochs = 30
    c.warmup_epochs = 2
    c.cooldown_epochs = 0
    c.lr = 2e-3
    c.warmup_lr = 1e-5
    c.min_lr = 1e-5
    c.log_every_steps = 20
    c.checkpoint_every_steps = 200
    c.eval_every_epochs = 5
    return c
