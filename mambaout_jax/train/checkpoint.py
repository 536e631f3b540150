"""A run's checkpoints: orbax ``CheckpointManager`` saving train state + data-iterator state together.

The layout (``convert.run_checkpoint``: ``<workdir>/checkpoints/<step>/{state,data_iterator,meta}``)
is read there, so evaluation and conversion need nothing from this layer. Saves are asynchronous
and atomic (orbax writes to a temporary directory and renames on commit), so a run killed at any
moment restarts from the last *complete* checkpoint. When to save is decided in one place: the
manager's policy (every ``every_steps`` steps, and at a multi-host preemption sync point), asked
through ``should_save``; the trainer adds only the forced saves (preemption notice, last step).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from mambaout_jax.convert.run_checkpoint import META, STATE, checkpoint_dir
from mambaout_jax.data.checkpointing import restore_args, save_args
from mambaout_jax.train.recipe import ConfigError


def _manager(workdir, *, keep: int = 1, every_steps: int = 1, async_save: bool = True, read_only: bool = False):
    policy = checkpoint_managers.AnySavePolicy(
        [checkpoint_managers.FixedIntervalPolicy(every_steps), checkpoint_managers.PreemptionCheckpointingPolicy()]
    )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_decision_policy=policy,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


class RunCheckpoints:
    """The checkpoints of the run in ``workdir``: save, find the latest, restore."""

    def __init__(self, workdir: str | os.PathLike, meta: dict, *, keep: int, every_steps: int):
        self.meta = meta
        self._mngr = _manager(workdir, keep=keep, every_steps=every_steps)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def should_save(self, step: int) -> bool:
        return self._mngr.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        return self._mngr.reached_preemption(step)

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Start saving ``step`` (asynchronously) when the policy says so, or ``force``; whether it started."""
        items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(self.meta)}
        return self._mngr.save(step, args=save_args(data_iterator, **items), force=force)

    def restore(self, step: int, abstract_state, data_iterator) -> Any:
        return restore(self._mngr, step, abstract_state, data_iterator)

    def wait_until_finished(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, data_iterator) -> Any:
    """Restore ``step`` into the shardings of ``abstract_state``; ``data_iterator`` is set in place."""
    restored = mngr.restore(
        step,
        args=restore_args(data_iterator, **{STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}),
    )
    return restored[STATE]


def restore_from_other_run(workdir: str | os.PathLike, abstract_state, data_iterator) -> tuple[int, Any]:
    """``(step, state)`` of another run's latest checkpoint, opened read-only: nothing is written there."""
    if not checkpoint_dir(workdir).is_dir():
        raise ConfigError(f"--resume {workdir}: no checkpoint found in {checkpoint_dir(workdir)}")
    other = _manager(workdir, async_save=False, read_only=True)
    try:
        step = other.latest_step()
        if step is None:
            raise ConfigError(f"--resume {workdir}: no checkpoint found in {checkpoint_dir(workdir)}")
        return step, restore(other, step, abstract_state, data_iterator)
    finally:
        other.close()
