"""The weight-choice flags every program that loads weights shares (eval.py, predict.py,
convert_torch_weights.py, the demo, the parity report): where ``--pretrained`` downloads from and
which weight set of a training checkpoint ``--ema`` picks. One definition, so they read the same
and mean the same in every program (``load_weights`` / ``load_pretrained`` take them as is)."""

from __future__ import annotations

import argparse

from mambaout_jax.convert.pretrained import PRETRAINED_SOURCES


def add_weight_set_flags(parser: argparse.ArgumentParser) -> None:
    """``--pretrained-source {hub,release}`` and ``--ema`` / ``--no-ema`` (default: None, the
    file's own default weight set)."""
    parser.add_argument("--pretrained-source", choices=PRETRAINED_SOURCES, default="hub",
                        help="for --pretrained: hub, timm's files on the Hugging Face Hub; release, the authors' GitHub release")  # fmt: skip
    parser.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=None,
        help="--ema: the EMA weights of a training checkpoint (or run); --no-ema: the raw ones; default: the raw "
        "ones of a timm checkpoint (as timm's validate.py), a run's EMA ones when it kept them",
    )  # fmt: skip
