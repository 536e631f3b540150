"""Checkpoints of a run: orbax ``CheckpointManager`` saving train state + data-iterator state together.

Layout: ``<workdir>/checkpoints/<step>/{state,data_iterator,meta}``. Saves are asynchronous and
atomic (orbax writes to a temporary directory and renames on commit), so a run killed at any moment
restarts from the last *complete* checkpoint. ``meta`` records the model and class count so a
checkpoint can be evaluated or converted without its config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mambaout_jax.data.checkpointing import restore_args, save_args

STATE = "state"
META = "meta"


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def make_manager(workdir: str | os.PathLike, *, keep: int, interval_steps: int, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=interval_steps,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict, *, force: bool = False) -> bool:
    """Save (if the interval says so, or ``force``); returns whether a save started."""
    return mngr.save(
        step,
        args=save_args(data_iterator, **{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}),
        force=force,
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iterator) -> tuple[Any, dict]:
    """Restore ``step`` into the shardings of ``abstract_state``; ``data_iterator`` is set in place."""
    restored = mngr.restore(
        step,
        args=restore_args(
            data_iterator, **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
        ),
    )
    return restored[STATE], restored[META]


def _find_step_dir(path: Path) -> Path:
    """Accept a workdir, its checkpoints/ folder, or one step folder; return the step folder."""
    if (path / STATE).is_dir():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted((int(p.name), p) for p in root.iterdir() if p.name.isdigit() and (p / STATE).is_dir())
    if not steps:
        raise FileNotFoundError(f"{path}: no training checkpoint found (expected <workdir>/checkpoints/<step>/state)")
    return steps[-1][1]


def load_params_from_run(
    path: str | os.PathLike, *, model: str | None = None, num_classes: int | None = None, use_ema: bool = True
) -> tuple[str, int, dict[str, np.ndarray]]:
    """Parameters of a ``train.py`` checkpoint as ``(model, num_classes, params)``, on the host.

    Prefers the EMA weights when the run kept them. Only the parameter arrays are read.
    """
    from mambaout_jax.convert.torch_io import CheckpointError

    try:
        step_dir = _find_step_dir(Path(path))
    except (FileNotFoundError, NotADirectoryError) as e:
        raise CheckpointError(str(e)) from None
    meta = ocp.JsonCheckpointHandler().restore(step_dir / META) if (step_dir / META).exists() else {}
    saved_model, saved_classes = meta.get("model"), meta.get("num_classes")
    if not saved_model and model is None:
        raise CheckpointError(
            f"{step_dir}: the checkpoint records no model name (no {META}/ item with a 'model' entry); "
            "pass the variant it was trained as: --model NAME (model=NAME)"
        )
    if model is not None:
        from mambaout_jax.models.registry import get_model_spec

        model = get_model_spec(model).name  # timm's name.tag form names the same weights
    if model is not None and saved_model and model != saved_model:
        raise CheckpointError(f"{step_dir}: holds {saved_model} weights, not {model}")
    if saved_classes is not None and num_classes not in (None, saved_classes):
        raise CheckpointError(
            f"{step_dir}: was trained with {saved_classes} classes, but num_classes={num_classes} was asked for"
        )
    model = saved_model or model
    # The item handler directly: a step's items carry no per-item checkpoint metadata file.
    handler = ocp.PyTreeCheckpointHandler()
    tree = handler.metadata(step_dir / STATE)
    tree = getattr(tree, "tree", tree)
    key = "ema_params" if use_ema and tree.get("ema_params") else "params"
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    target = {key: {k: ocp.ArrayRestoreArgs(sharding=cpu) for k in tree[key]}}
    restored = handler.restore(
        step_dir / STATE, args=ocp.args.PyTreeRestore(item=target, restore_args=target, partial_restore=True)
    )
    params = {k: np.asarray(v) for k, v in restored[key].items()}
    if saved_classes is None:  # no meta: the classifier's shape says it (0: no classifier)
        head = params.get("head/fc/kernel")
        saved_classes = int(head.shape[-1]) if head is not None else 0
        if num_classes not in (None, saved_classes):
            raise CheckpointError(
                f"{step_dir}: has a {saved_classes}-class classifier, but num_classes={num_classes} was asked for"
            )
        # The variant is the caller's word, not the checkpoint's: check it holds that model's weights.
        from mambaout_jax.models.factory import model_param_shapes
        from mambaout_jax.models.params import describe_mismatch

        problem = describe_mismatch(model_param_shapes(model, saved_classes), {k: v.shape for k, v in params.items()})
        if problem:
            raise CheckpointError(f"{step_dir}: does not hold {model} weights:\n{problem}")
    return model, int(saved_classes), params
