"""Saving the data iterator with the train state in one orbax checkpoint step.

grain ships an orbax handler for its iterators (`grain.checkpoint.CheckpointSave/Restore`); these
helpers put the iterator under one fixed item name next to the caller's items, so that every
checkpoint holds the exact position of the input stream and a resumed run sees the batches an
uninterrupted run would have. Each process writes its own `process_<i>-of-<n>.json`.

    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=3))
    mngr.save(step, args=save_args(train_iterator, state=ocp.args.StandardSave(state)))
    ...
    restored = mngr.restore(step, args=restore_args(
        train_iterator, state=ocp.args.StandardRestore(abstract_state)))
    state = restored.state  # and train_iterator now continues where the saved one stopped

The iterator item is saved synchronously inside `mngr.save` (grain's handler is not an async
one), so the saved position is the one at the moment of the call even with async checkpointing.
"""

from __future__ import annotations

import grain
import orbax.checkpoint as ocp

DATA_ITERATOR = "data_iterator"


def save_args(data_iterator: grain.DatasetIterator, **items: ocp.args.CheckpointArgs):
    """`ocp.args.Composite` saving `data_iterator` under DATA_ITERATOR plus the given items."""
    return ocp.args.Composite(
        **{DATA_ITERATOR: grain.checkpoint.CheckpointSave(data_iterator)}, **items
    )


def restore_args(data_iterator: grain.DatasetIterator, **items: ocp.args.CheckpointArgs):
    """`ocp.args.Composite` restoring into `data_iterator` (in place) plus the given items.

    `data_iterator` must come from the same pipeline configuration (source, seed, batch size,
    worker and process counts) as the saved one.
    """
    return ocp.args.Composite(
        **{DATA_ITERATOR: grain.checkpoint.CheckpointRestore(data_iterator)}, **items
    )
