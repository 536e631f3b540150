"""A run's checkpoints: orbax ``CheckpointManager`` saving train state + data-iterator state together.

The layout (``convert.run_checkpoint``: ``<workdir>/checkpoints/<step>/{state,data_iterator,meta}``)
is read there, so evaluation and conversion need nothing from this layer. Saves are asynchronous
and atomic, so a run killed at any moment restarts from the last *complete* checkpoint: locally
orbax writes a temporary directory and renames it on commit; on a bucket (``gs://``, written
natively through tensorstore) and on a gcsfuse mount it writes the step in place and commits it
with ``commit_success.txt`` (``storage.commits_with_file``), since neither renames a directory
atomically. When to save is decided in one place: the manager's policy (every ``every_steps``
steps), asked through ``should_save``; the trainer adds only the forced saves (preemption, last step).
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from mambaout_jax.convert.run_checkpoint import META, STATE, checkpoint_dir
from mambaout_jax.storage import commits_with_file
from mambaout_jax.data.checkpointing import restore_args, save_args
from mambaout_jax.train.recipe import ConfigError


def atomicity_options(workdir) -> ocp.options.AtomicityOptions:
    """Commit-file mode wherever a directory rename is not atomic (see the module docstring).

    orbax picks it by itself for ``gs://`` URLs; a gcsfuse mount looks local, so it is named here.
    """
    mode = ocp.options.AtomicityMode.COMMIT_FILE if commits_with_file(workdir) else ocp.options.AtomicityMode.AUTO
    return ocp.options.AtomicityOptions(mode=mode)


def _manager(workdir, *, keep: int = 1, every_steps: int = 1, async_save: bool = True, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(every_steps),
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        atomicity_options=atomicity_options(workdir),
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


class RunCheckpoints:
    """The checkpoints of the run in ``workdir``: save, find the latest, restore."""

    def __init__(self, workdir: str | os.PathLike, meta: dict, *, keep: int, every_steps: int):
        self.meta = meta
        self.workdir = workdir
        self._mngr = _manager(workdir, keep=keep, every_steps=every_steps)
        self._saved = self._mngr.latest_step()

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def should_save(self, step: int) -> bool:
        return self._mngr.should_save(step)

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Start saving ``step`` (asynchronously) when the policy says so, or ``force``; whether it started
        (or had been saved already: a step is saved once)."""
        if step == self._saved:
            return True
        items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(self.meta)}
        started = self._mngr.save(step, args=save_args(data_iterator, **items), force=force)
        if started:
            self._saved = step
        return started

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


def restore_from_other_run(workdir: str | os.PathLike, abstract_state, data_iterator, *, check=None) -> tuple[int, Any]:
    """``(step, state)`` of another run's latest checkpoint, opened read-only: nothing is written there.

    ``check(step_dir)`` runs before anything is restored (the trainer compares configs there)."""
    if not checkpoint_dir(workdir).is_dir():
        raise ConfigError(f"--resume {workdir}: no checkpoint found in {checkpoint_dir(workdir)}")
    other = _manager(workdir, async_save=False, read_only=True)
    try:
        step = other.latest_step()
        if step is None:
            raise ConfigError(f"--resume {workdir}: no checkpoint found in {checkpoint_dir(workdir)}")
        if check is not None:
            check(checkpoint_dir(workdir) / str(step))
        return step, restore(other, step, abstract_state, data_iterator)
    finally:
        other.close()
