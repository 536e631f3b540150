"""The authors' ImageNet-1k recipe (their repository's train script), shared by the paper models' configs.

Every field is listed here, so ``--config.<field>=...`` overrides are checked against this set
(the config is locked: a typo is an error, not a silently ignored new key).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
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

    # ---- host augmentation (timm's train transform) ----
    c.aug = ConfigDict()
    c.aug.random_resized_crop = True
    c.aug.scale = (0.08, 1.0)
    c.aug.ratio = (3 / 4, 4 / 3)
    c.aug.interpolation = "random"  # bilinear or bicubic per image
    c.aug.hflip = 0.5
    c.aug.rand_augment = "rand-m9-mstd0.5-inc1"  # '' disables
    c.aug.jpeg_draft = True
    # ---- device augmentation ----
    c.aug.mixup_alpha = 0.8
    c.aug.cutmix_alpha = 1.0
    c.aug.mix_prob = 1.0
    c.aug.switch_prob = 0.5
    c.aug.label_smoothing = 0.1
    c.aug.erase_prob = 0.25

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

    # ---- bookkeeping ----
    c.log_every_steps = 50
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.max_steps = 0  # > 0: stop after this many optimizer steps (smoke tests, benchmarks)
    c.eval_batch_size = 0  # 0: same as batch_size / grad_accum_steps
    return c


def paper_model_config(model: str, drop_path_rate: float) -> ConfigDict:
    c = get_config()
    c.model = model
    c.drop_path_rate = drop_path_rate
    return c
