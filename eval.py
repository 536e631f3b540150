#!/usr/bin/env python
"""Evaluate MambaOut weights on ImageNet val (TFDS or image folder), sharded over every device.

  # A published PyTorch checkpoint, converted on the fly, with the model's own eval settings:
  python eval.py --weights mambaout_tiny.pth --data-dir /data/tfds
  # timm's test size (288, crop_pct 1.0):
  python eval.py --weights mambaout_tiny.pth --data-dir /data/tfds --img-size 288 --crop-pct 1.0
  # A pretrained tag's own eval settings (here 384 px, squash crop):
  python eval.py --weights base_plus_384.pth --model mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k --data-dir /data/tfds
  # A train.py run (its latest checkpoint; EMA weights when it kept them), on an image folder:
  python eval.py --weights runs/tiny --source folder --data-dir /data/imagenet --split val
  # Published weights by name (downloaded once into the Hugging Face cache), with the tag's eval settings:
  python eval.py --pretrained mambaout_tiny.in1k --data-dir /data/tfds
  # A timm training checkpoint (the authors' train.py): its EMA weights (default: the raw ones, as timm's validate.py):
  python eval.py --weights output/train/model_best.pth.tar --ema --data-dir /data/tfds
  # Everything in a bucket: the run, the TFDS dataset and the results:
  python eval.py --weights gs://bucket/runs/tiny --data-dir gs://bucket/tfds --out gs://bucket/runs/tiny/eval.json

Counts are exact: the split is padded to whole batches and the padding masked out.
"""

from __future__ import annotations

import argparse
import json
import sys

from mambaout_jax.convert.cli import add_weight_set_flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--weights", help="PyTorch .pth/.bin/.safetensors/.pth.tar, a Flax weight file, or a train.py workdir (local or gs://)")
    which.add_argument("--pretrained", metavar="TAG", help="published weights by name, e.g. mambaout_tiny.in1k (its eval settings)")
    add_weight_set_flags(p)
    p.add_argument(
        "--model",
        help="variant, optionally with timm's pretrained tag, whose eval settings are then used "
        "(e.g. mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k: 384 px, squash); default: from the weights",
    )
    p.add_argument("--num-classes", type=int, help="default: the checkpoint's")
    p.add_argument("--source", choices=["tfds", "folder", "digits"], default="tfds")
    p.add_argument("--data-dir", help="TFDS data_dir (local or gs://) or image-folder root (local)")
    p.add_argument("--dataset", default="imagenet2012", help="TFDS dataset name")
    p.add_argument("--split", default=None, help="default: 'validation' (tfds) or 'val' (folder)")
    p.add_argument(
        "--img-size", type=int,
        help="default: the model's input size (e.g. 224; timm's test size is 288); 32 for --source digits",
    )  # fmt: skip
    p.add_argument("--crop-pct", type=float, help="default: the model's crop_pct (1.0 for --source digits)")
    p.add_argument(
        "--crop-mode", choices=["center", "squash"],
        help="center: resize the short side, center crop; squash: resize both sides (ignores the aspect ratio); "
        "default: the model's",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=0, help="global batch; default 32 per device")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--workers", type=int, default=0, help="grain worker processes for decoding")
    p.add_argument("--out", help="also write the results as JSON here (local or gs://; written atomically)")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    return p.parse_args(argv)


def eval_preprocessing(args, model: str):
    """The eval transform: the flags, else the source's own size (digits), else the model's (or its tag's)."""
    from mambaout_jax.data import digits, resolve_eval_preprocessing

    native = dict(image_size=digits.IMAGE_SIZE, crop_pct=digits.EVAL_CROP_PCT) if args.source == "digits" else {}
    return resolve_eval_preprocessing(
        model,
        image_size=args.img_size or native.get("image_size"),
        crop_pct=args.crop_pct or native.get("crop_pct"),
        crop_mode=args.crop_mode,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    from absl import flags

    if args.distributed:
        jax.distributed.initialize()
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; this CLI uses argparse
        flags.FLAGS.mark_as_parsed()
    from mambaout_jax import data as data_lib
    from mambaout_jax.convert import CheckpointError, load_pretrained, load_weights
    from mambaout_jax import storage
    from mambaout_jax.data.digits import write_digits_folder
    from mambaout_jax.models.registry import get_model_spec
    from mambaout_jax.train.evaluation import evaluate
    from mambaout_jax.train.mesh import ShardingConfigError, make_mesh
    from mambaout_jax.train.program import build_eval_program
    from mambaout_jax.train.recipe import DTYPES

    try:
        if args.out:
            storage.check_place("--out", args.out, writable=True, is_file=True)  # before the evaluation, not after it
        if args.model:
            get_model_spec(args.model)  # an unknown name or tag fails before any file is read
        if args.num_classes == 0:
            raise ValueError(
                "--num-classes 0 drops the classifier (the model returns pre-logits features), leaving no "
                "accuracy to measure; leave --num-classes out to evaluate with the checkpoint's classifier"
            )
        if args.pretrained:
            weights = load_pretrained(args.pretrained, source=args.pretrained_source, num_classes=args.num_classes, ema=args.ema)
            if args.model and get_model_spec(args.model).name != weights.model:
                raise ValueError(f"--pretrained {args.pretrained} holds {weights.model} weights, not {args.model}")
        else:
            weights = load_weights(args.weights, model=args.model, num_classes=args.num_classes, ema=args.ema)
        if jax.process_index() == 0:
            print(f"weights: {weights.describe()}", file=sys.stderr)
        if weights.num_classes == 0:
            raise CheckpointError(
                f"{args.weights}: has no classifier (num_classes=0: a backbone / pre-logits export), so there is "
                "no accuracy to measure; evaluate weights that include their classification head"
            )
        # The name as given keeps timm's pretrained tag, and with it the tag's eval settings
        # (the weights only record the variant).
        preprocessing = eval_preprocessing(args, args.model or weights.tag or weights.model)
        if args.source == "digits":
            root = write_digits_folder(image_size=preprocessing.image_size)
            source = data_lib.image_folder_source(root, args.split or "val")
        elif not args.data_dir:
            raise ValueError(f"--data-dir is required for --source {args.source}")
        elif args.source == "folder":
            source = data_lib.image_folder_source(args.data_dir, args.split or "val")
        else:
            source = data_lib.tfds_source(args.data_dir, args.split or "validation", args.dataset)
        mesh = make_mesh()
        batch_size = args.batch_size or 32 * mesh.devices.size
        program = build_eval_program(
            weights.model, weights.num_classes, mesh, preprocessing=preprocessing, compute_dtype=DTYPES[args.dtype]
        )
        result = evaluate(
            program, weights.params, source, batch_size=batch_size, loader=data_lib.LoaderOptions(args.workers)
        )
    except (CheckpointError, ShardingConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = args.split or ("validation" if args.source == "tfds" else "val")
    settings = {k: getattr(preprocessing, k) for k in ("image_size", "crop_pct", "interpolation", "crop_mode")}
    result.update(
        model=args.model or weights.tag or weights.model, weights=str(args.weights or weights.source),
        weight_set=weights.weight_set, source=args.source, split=split, **settings,
    )  # fmt: skip
    if jax.process_index() == 0:
        print(json.dumps(result))
        if args.out:
            storage.write_text(args.out, json.dumps(result, indent=2) + "\n", "--out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
