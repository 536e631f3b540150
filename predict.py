#!/usr/bin/env python
"""Classify images with MambaOut weights: top-k classes with names and probabilities.

  # The built-in default (python train.py --workdir runs/digits), on images, folders or globs:
  python predict.py --weights runs/digits digit.png more_digits/ 'scans/*.png'
  # A published PyTorch checkpoint, converted on the fly; ImageNet-1k names ship with the package:
  python predict.py --weights mambaout_femto.pth cat.jpg --top 5
  # Published weights by name (downloaded once into the Hugging Face cache):
  python predict.py --pretrained mambaout_femto.in1k cat.jpg
  # Machine-readable: [{"image": path, "top": [{"index": int, "label": str, "prob": float}, ...]}, ...]
  python predict.py --weights mambaout_femto.pth photos/ --json > predictions.json

Each image goes through the weights' own eval preprocessing (a train.py run's config; a file's
variant, or --model's pretrained tag). Unreadable images are named on stderr and skipped; the exit
status is then 1, after every other image has been predicted. Bad weights or flags: status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from mambaout_jax.convert.cli import add_weight_set_flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--weights", help="PyTorch .pth/.bin/.safetensors/.pth.tar, a Flax weight file, or a train.py workdir")
    which.add_argument("--pretrained", metavar="TAG", help="published weights by name, e.g. mambaout_tiny.in1k (its eval settings)")
    add_weight_set_flags(p)
    p.add_argument("--model", help="variant, optionally with timm's pretrained tag (its eval settings); default: from the weights")
    p.add_argument(
        "--classes", metavar="FILE",
        help="class names, one per line in index order ('name' or 'id<TAB>name'); default: the run's dataset "
        "classes, ImageNet's for 1000 or 11821 classes, else the indices",
    )  # fmt: skip
    p.add_argument("--top", type=int, default=5, help="how many classes per image (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--batch-size", type=int, default=32, help="images per device batch (default 32)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--img-size", type=int, help="default: the weights' eval size")
    p.add_argument("--crop-pct", type=float, help="default: the weights' crop_pct")
    p.add_argument("--crop-mode", choices=["center", "squash"], help="default: the weights'")
    args = p.parse_args(argv)
    if args.top <= 0:
        p.error(f"--top must be positive, got {args.top}")
    if args.batch_size <= 0:
        p.error(f"--batch-size must be positive, got {args.batch_size}")
    return args


def format_table(predictions) -> str:
    lines = []
    for prediction in predictions:
        lines.append(prediction.image)
        lines.extend(f"  {s.prob:8.4f}  {s.label}  [{s.index}]" for s in prediction.top)
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mambaout_jax.convert import CheckpointError
    from mambaout_jax.predict import expand_image_paths, load_predictor
    from mambaout_jax.train.recipe import DTYPES

    paths, failures = expand_image_paths(args.images)
    for failure in failures:  # named at once, before the model loads: a typo should not wait for a compile
        print(f"error: {failure.image}: {failure.reason}", file=sys.stderr)
    if not paths:
        print("error: no image to predict", file=sys.stderr)
        return 2
    try:
        predictor = load_predictor(
            args.weights, pretrained=args.pretrained, pretrained_source=args.pretrained_source, ema=args.ema,
            model=args.model, class_names_file=args.classes, image_size=args.img_size,
            crop_pct=args.crop_pct, crop_mode=args.crop_mode, dtype=DTYPES[args.dtype], batch_size=args.batch_size,
        )  # fmt: skip
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"weights: {predictor.loaded.describe()}", file=sys.stderr)
    predictions, unreadable = predictor.predict_files(paths, top_k=args.top)
    for failure in unreadable:
        print(f"error: {failure.image}: {failure.reason}", file=sys.stderr)
    if args.json:
        print(json.dumps([p.to_json() for p in predictions], indent=1))
    elif predictions:
        print(format_table(predictions))
    return 1 if failures or unreadable else 0


if __name__ == "__main__":
    sys.exit(main())
