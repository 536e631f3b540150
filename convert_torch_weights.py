#!/usr/bin/env python
"""Convert MambaOut weights between PyTorch (authors' or timm layout) and this project's Flax format.

  # PyTorch -> Flax (the variant is recognised from the shapes), checked against timm:
  python convert_torch_weights.py mambaout_femto.pth femto.safetensors --verify
  # Flax -> timm-layout .safetensors that timm.create_model(name).load_state_dict(strict=True) accepts:
  python convert_torch_weights.py femto.safetensors femto_timm.safetensors --to-timm
  # Published weights by name (downloaded once into the Hugging Face cache; the tag's class count):
  python convert_torch_weights.py --pretrained mambaout_femto.in1k femto.safetensors
  # A timm training checkpoint (train.py's CheckpointSaver): the raw weights, or with --ema its EMA ones:
  python convert_torch_weights.py output/train/model_best.pth.tar femto_ema.safetensors --ema
  # Either side may be in a bucket:
  python convert_torch_weights.py gs://bucket/mambaout_femto.pth gs://bucket/femto.safetensors

Nothing is written unless the conversion (and --verify, when given) succeeds; errors exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from mambaout_jax import storage
from mambaout_jax.convert import CheckpointError, export_timm_safetensors, flax_to_torch, load_source, save_flax_weights
from mambaout_jax.convert.cli import add_weight_set_flags
from mambaout_jax.convert.verify import verify_against_timm
from mambaout_jax.models import ParamMismatchError, list_models


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", help="weight file (local or gs://): .pth/.pt/.bin/.safetensors/.pth.tar (PyTorch) or one written by this project")
    p.add_argument("out", nargs="?", help="output .safetensors file, local or gs:// (written atomically, only on success)")
    p.add_argument("--pretrained", metavar="TAG", help="published weights instead of src, e.g. mambaout_tiny.in1k (then only out is given)")
    add_weight_set_flags(p)
    p.add_argument("--model", choices=list_models(), help="variant; default: recognised from the shapes")
    p.add_argument("--num-classes", type=int, help="classifier size; default: the checkpoint's; 0 drops it")
    p.add_argument("--to-timm", action="store_true", help="write timm layout instead of this project's format")
    p.add_argument("--verify", action="store_true", help="run timm and Flax on one random batch and compare")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max relative logit error for --verify")
    p.add_argument("--verify-batch", type=int, default=4)
    p.add_argument("--verify-size", type=int, default=224)
    args = p.parse_args(argv)
    if args.pretrained is not None:
        if args.out is not None:
            p.error("with --pretrained TAG give only the output file")
        args.src, args.out = None, args.src
    if args.out is None:
        p.error("give SRC OUT, or --pretrained TAG OUT")
    return args


def missing_verify_dependencies() -> str | None:
    """Why --verify cannot run here (it runs timm, on PyTorch, as the reference), or None."""
    for module in ("torch", "timm"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            return f"{module} cannot be imported ({e})"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.verify:
        problem = missing_verify_dependencies()
        if problem:
            print(
                f"error: --verify compares against timm on PyTorch, but {problem}. Install the torch extra: "
                "pip install -e \".[torch]\" (from this checkout; or pip install 'mambaout-jax[torch]'), "
                "or convert without --verify. Nothing written.",
                file=sys.stderr,
            )
            return 2
    try:
        storage.check_place("output", args.out, writable=True, is_file=True)  # a bad bucket fails before the work, not after
        weights = load_source(
            args.src, args.pretrained, model=args.model, num_classes=args.num_classes, ema=args.ema,
            pretrained_source=args.pretrained_source,
        )  # fmt: skip
    except (CheckpointError, ParamMismatchError, storage.StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, num_classes, params = weights.model, weights.num_classes, weights.params
    print(f"{weights.describe()}, {len(params)} tensors")

    if args.verify:
        # timm loads the round trip of our params (strict), so this checks both directions of the mapping.
        result = verify_against_timm(
            model, num_classes, params, flax_to_torch(params), batch_size=args.verify_batch, image_size=args.verify_size
        )
        print("verify:", json.dumps(result))
        if not result["rel_err"] <= args.tolerance:
            print(f"error: relative logit error {result['rel_err']:.3g} exceeds {args.tolerance:g}; nothing written",
                  file=sys.stderr)
            return 1

    try:
        if args.to_timm:
            export_timm_safetensors(args.out, params, model=model)
        else:
            save_flax_weights(args.out, params, model=model, num_classes=num_classes)
    except (CheckpointError, OSError) as e:
        print(f"error: cannot write {args.out}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({'timm layout' if args.to_timm else 'mambaout_jax format'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
