"""The checkpoints of a ``train.py`` run, as a weight file: their layout and how to read their parameters.

Layout: ``<workdir>/checkpoints/<step>/{state,data_iterator,meta}`` (orbax ``CheckpointManager``
items). ``state`` is the train state (``params``, ``opt_state``, ``ema_params`` when the run keeps
an EMA); ``meta`` records the model, the class count, the class names and the run's config, so a
checkpoint can be evaluated or converted without its config. ``train/checkpoint.py`` writes this
layout; this module only reads it. A workdir may be local or ``gs://``; only *complete* steps are
ever read: on a bucket (or a gcsfuse mount) a step is complete once orbax has written its
``commit_success.txt``, locally once it has been renamed from its temporary name.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mambaout_jax import storage
from mambaout_jax.convert.torch_io import CheckpointError

CHECKPOINTS = "checkpoints"
STATE = "state"
META = "meta"
COMMIT_SUCCESS = "commit_success.txt"  # orbax's marker of a complete step written in place


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    path = storage.as_path(workdir, "workdir")
    return (path if storage.is_gcs(workdir) else path.absolute()) / CHECKPOINTS


def is_complete_step(step_dir: epath.Path, *, commit_file: bool) -> bool:
    """A step folder orbax finished: renamed from its temporary name, or marked by the commit file."""
    if not step_dir.name.isdigit() or not (step_dir / STATE).is_dir():
        return False
    return (step_dir / COMMIT_SUCCESS).exists() if commit_file else True


def find_step_dir(path: str | os.PathLike) -> epath.Path:
    """Accept a workdir, its checkpoints/ folder, or one complete step folder; return the latest complete step."""
    try:
        path = storage.as_path(path, "checkpoint")
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    commit_file = storage.commits_with_file(path)
    if (path / STATE).is_dir():
        if commit_file and not (path / COMMIT_SUCCESS).exists():
            raise CheckpointError(f"{path}: an incomplete checkpoint (its save never finished: no {COMMIT_SUCCESS})")
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    try:
        steps = sorted((int(p.name), p) for p in root.iterdir() if is_complete_step(p, commit_file=commit_file))
    except (FileNotFoundError, NotADirectoryError):
        steps = []
    if not steps:
        raise CheckpointError(
            f"{path}: no training checkpoint found (expected <workdir>/{CHECKPOINTS}/<step>/{STATE})"
        )
    return steps[-1][1]


def read_meta(step_dir: epath.Path) -> dict:
    """The run's record of what it trained (empty for checkpoints written without one)."""
    return ocp.JsonCheckpointHandler().restore(step_dir / META) if (step_dir / META).exists() else {}


def read_run_params(step_dir: epath.Path, *, ema: bool | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """``(weight set, params)`` of one step folder, on the host; only the parameter arrays are read.

    ``ema``: True takes the EMA weights (an error when the run kept none), False the raw ones,
    None the EMA weights when the run kept them (what the run itself evaluated).
    """
    # The item handler directly: a step's items carry no per-item checkpoint metadata file.
    handler = ocp.PyTreeCheckpointHandler()
    tree = handler.metadata(step_dir / STATE)
    tree = getattr(tree, "tree", tree)
    has_ema = bool(tree.get("ema_params"))
    if ema and not has_ema:
        raise CheckpointError(f"{step_dir}: the run kept no EMA weights (config.ema_decay was 0); found: {sorted(tree)}")
    key = "ema_params" if (has_ema if ema is None else ema) else "params"
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = {key: {k: ocp.ArrayRestoreArgs(sharding=cpu) for k in tree[key]}}
    restored = handler.restore(
        step_dir / STATE, args=ocp.args.PyTreeRestore(item=target, restore_args=target, partial_restore=True)
    )
    return key, {k: np.asarray(v) for k, v in restored[key].items()}
