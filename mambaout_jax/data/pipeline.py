"""grain input pipelines: an endless shuffled train stream and a padded, masked eval pass.

Train, per process:
    source -> seed -> shuffle (new order each epoch) -> repeat -> decode + augment (random_map)
    -> this process's slice [process_index::process_count] -> [workers: read threads -> batch,
    skipping corrupt records] -> corrupt-record accounting
The global stream is shuffled by the seed alone and every process takes a stride of it, so the
process slices are disjoint and together cover each epoch. Augmentation randomness comes from
grain's `random_map`, which seeds a Philox generator with (seed, position in the stream), where
position = epoch * len(source) + index: the same example at the same place gets the same
augmentation whatever the worker or process count.

With worker_count 0 or 1, global batch k is exactly stream positions [k*G, (k+1)*G), whatever the
process count. With more workers, which examples form a batch also depends on `worker_count`:
each worker process batches a stride of the process's slice (grain's `mp_prefetch` design, which
keeps whole batches in the workers), so W consecutive batches hold W*B consecutive positions.
Either way a restored iterator continues exactly, given the same worker and process count; the
state says where each worker was.

Eval, per process: indices 0..padded-1 (padded = len(source) rounded up to the global batch) ->
this process's stride -> decode + eval transform, or a zero image with mask=False for padding
and corrupt records -> batch (whole batches per worker) -> accounting.

Batches are dicts of NumPy arrays: image uint8 [B, H, W, 3], label int32 [B] (and mask bool [B]
for eval), B = global_batch_size / process count. From worker processes they arrive as grain
`SharedMemoryArray`s (an ndarray subclass viewing the worker's shared memory, freed when dropped).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from mambaout_jax.data.preprocessing import EvalPreprocessing
from mambaout_jax.data.transforms import ImageDecodeError, TrainTransform

log = logging.getLogger(__name__)

# Batch entry carrying ((key, error), ...) of the corrupt records met while making the batch from
# the workers to the main process, where `_CorruptRecordAccounting` removes it.
_CORRUPT = "_corrupt_records"


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How a pipeline reads and decodes, whatever it computes.

    worker_count: grain worker processes (0: everything in this process). Pixel work is CPU-bound
      Python/PIL, so scale with processes, about one per core.
    read_threads: threads per worker that read and decode ahead (PIL releases the GIL while
      decoding and resizing; more threads mostly help when reads are slow, e.g. remote disks).
    worker_buffer_size: batches each worker prepares ahead.
    strict: raise CorruptRecordError on a bad record instead of skipping (train) or masking (eval)
      and counting it.
    """

    worker_count: int = 0
    read_threads: int = 1
    worker_buffer_size: int = 2
    strict: bool = False

    def __post_init__(self):
        if self.worker_count < 0 or self.read_threads < 1 or self.worker_buffer_size < 1:
            raise ValueError(
                f"worker_count must be >= 0 and read_threads, worker_buffer_size >= 1; got {self}"
            )


class CorruptRecordError(ValueError):
    """Raised in strict mode for a record that can't be read or decoded; names the record."""


@dataclasses.dataclass(frozen=True)
class CorruptRecord:
    """Stands in for an example whose record could not be decoded (non-strict mode)."""

    key: str
    error: str


def _decode_or_report(record: dict, transform, strict: bool, *args):
    """Applies `transform(image, *args)`, turning a bad record into a CorruptRecord or an error."""
    key = str(record.get("key", "?"))
    try:
        if record.get("error") is not None:
            raise ImageDecodeError(record["error"])
        return transform(record["image"], *args)
    except ImageDecodeError as e:
        if strict:
            raise CorruptRecordError(f"Corrupt or unreadable image record {key}: {e}") from e
        return CorruptRecord(key, str(e))


class _TrainExample:
    """random_map transform: record + per-position Generator -> {"image", "label"}."""

    def __init__(self, transform: TrainTransform, strict: bool):
        self.transform, self.strict = transform, strict

    def __call__(self, record: dict, rng: np.random.Generator):
        image = _decode_or_report(record, self.transform, self.strict, rng)
        if isinstance(image, CorruptRecord):
            return image
        return {"image": image, "label": np.int32(record["label"])}


class _EvalExample:
    """map transform: padded index -> {"image", "label", "mask"}; padding has mask False."""

    def __init__(self, source, preprocessing: EvalPreprocessing, strict: bool):
        self.source, self.preprocessing, self.strict = source, preprocessing, strict

    def _padding(self):
        size = self.preprocessing.image_size
        return {
            "image": np.zeros((size, size, 3), np.uint8),
            "label": np.int32(0),
            "mask": np.bool_(False),
        }

    def __call__(self, index: int):
        if index >= len(self.source):
            return self._padding()
        record = self.source[index]
        image = _decode_or_report(record, self.preprocessing.transform, self.strict)
        if isinstance(image, CorruptRecord):
            return {**self._padding(), _CORRUPT: image}
        return {"image": image, "label": np.int32(record["label"]), "mask": np.bool_(True)}


def _stack(
    examples: Sequence[dict], corrupt: Sequence[CorruptRecord] = (), *, shared_memory: bool = False
) -> dict:
    """Stacks examples into a batch dict and lists the corrupt records met on the way.

    With `shared_memory`, arrays are stacked straight into shared memory, which grain then passes
    from the worker to the main process without another copy of the batch.
    """
    corrupt = list(corrupt) + [e[_CORRUPT] for e in examples if _CORRUPT in e]
    batch = {}
    for key in examples[0]:
        if key == _CORRUPT:
            continue
        values = [e[key] for e in examples]
        out = None
        if shared_memory:
            first = np.asarray(values[0])
            out = grain.multiprocessing.SharedMemoryArray((len(values), *first.shape), first.dtype)
        batch[key] = np.stack(values, out=out)
    batch[_CORRUPT] = tuple((c.key, c.error) for c in corrupt)
    return batch


class _BatchSkippingCorrupt(grain.IterDataset):
    """Batches `batch_size` good examples, passing over CorruptRecords but remembering them.

    It sits below mp_prefetch, in each worker. It holds nothing between batches, so its state is
    its parent's and a restore lands exactly on a batch boundary.
    """

    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._shared_memory = False

    def enable_shared_memory_output(self) -> None:
        """Called by grain's mp_prefetch (base.SupportsSharedMemoryOutput): batch into shm."""
        self._shared_memory = True

    def __iter__(self):
        return _BatchSkippingCorruptIterator(
            self._parent.__iter__(), self._batch_size, self._shared_memory
        )

    def __str__(self):
        return f"_BatchSkippingCorrupt(batch_size={self._batch_size})"


class _BatchSkippingCorruptIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int, shared_memory: bool):
        super().__init__(parent)
        self._batch_size = batch_size
        self._shared_memory = shared_memory

    def __next__(self) -> dict:
        examples, corrupt = [], []
        while len(examples) < self._batch_size:
            example = next(self._parent)
            if isinstance(example, CorruptRecord):
                corrupt.append(example)
            else:
                examples.append(example)
        return _stack(examples, corrupt, shared_memory=self._shared_memory)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _CorruptRecordAccounting(grain.IterDataset):
    """Main-process end of the pipeline: strips the corrupt-record list off each batch, counts the
    records and logs each key once (per iterator)."""

    def __iter__(self):
        return PipelineIterator(self._parent.__iter__())


class PipelineIterator(grain.DatasetIterator):
    """The iterator `make_train_iterator`/`make_eval_iterator` return.

    A grain DatasetIterator, so grain's orbax handler checkpoints it (see checkpointing.py). It
    also counts the corrupt records skipped (train) or masked out (eval): `corrupt_count`, and
    `corrupt_keys`, the distinct record keys in first-seen order. The count is part of the saved
    state; the keys are not.
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.corrupt_count = 0
        self.corrupt_keys: list[str] = []
        self._seen: set[str] = set()

    def __next__(self) -> dict:
        batch = dict(next(self._parent))
        for key, error in batch.pop(_CORRUPT, ()):
            self.corrupt_count += 1
            if key not in self._seen:
                self._seen.add(key)
                self.corrupt_keys.append(key)
                log.warning("Skipping corrupt image record %s: %s", key, error)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "corrupt_count": self.corrupt_count}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.corrupt_count = int(state["corrupt_count"])


def _process_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        import jax

        return jax.process_index(), jax.process_count()
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard must be (process_index, process_count) with 0 <= index < count, "
                         f"got {shard}")
    return index, count


def _per_process_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of the process "
            f"count {process_count}"
        )
    return global_batch_size // process_count


def _finish(ds, loader: LoaderOptions) -> PipelineIterator:
    if loader.worker_count > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=loader.worker_count, per_worker_buffer_size=loader.worker_buffer_size
            )
        )
    return iter(_CorruptRecordAccounting(ds))


def make_train_iterator(
    source: Sequence[dict],
    *,
    global_batch_size: int,
    seed: int,
    transform: TrainTransform = TrainTransform(),
    loader: LoaderOptions = LoaderOptions(),
    shard: tuple[int, int] | None = None,
) -> PipelineIterator:
    """Endless iterator of this process's train batches {"image", "label"} (see module doc).

    transform: the host augmentation (timm's train transform; the recipe's by default).
    loader: worker processes, read threads, strictness (see `LoaderOptions`).
    shard: (process_index, process_count); defaults to jax.process_index()/process_count().

    Save/restore its position with `checkpointing.save_args`/`restore_args` (or get_state /
    set_state); a restored iterator must be built with the same arguments.
    """
    process_index, process_count = _process_shard(shard)
    batch_size = _per_process_batch(global_batch_size, process_count)
    if len(source) < global_batch_size:
        raise ValueError(f"source has {len(source)} records, fewer than one global batch "
                         f"({global_batch_size})")
    ds = grain.MapDataset.source(source).seed(seed)
    ds = ds.shuffle().repeat()
    ds = ds.random_map(_TrainExample(transform, loader.strict))
    ds = ds[process_index::process_count]
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=loader.read_threads, prefetch_buffer_size=batch_size)
    )
    ds = _BatchSkippingCorrupt(ds, batch_size)
    return _finish(ds, loader)


def eval_steps(num_examples: int, global_batch_size: int) -> int:
    """Number of eval batches every process runs: the split padded to whole global batches."""
    return math.ceil(num_examples / global_batch_size)


def make_eval_iterator(
    source: Sequence[dict],
    *,
    global_batch_size: int,
    preprocessing: EvalPreprocessing = EvalPreprocessing(),
    loader: LoaderOptions = LoaderOptions(),
    shard: tuple[int, int] | None = None,
) -> PipelineIterator:
    """One pass over `source`: `eval_steps(len(source), global_batch_size)` batches per process,
    {"image", "label", "mask"}; each record appears once across all processes with mask True.

    Each image is `preprocessing.transform`ed (timm's eval transform for the model's pretrained
    config, see `preprocessing.resolve_eval_preprocessing`). A corrupt record becomes a masked zero
    image (counted and logged) so every process still runs the same number of steps.
    """
    process_index, process_count = _process_shard(shard)
    batch_size = _per_process_batch(global_batch_size, process_count)
    padded = eval_steps(len(source), global_batch_size) * global_batch_size
    example = _EvalExample(source, preprocessing, loader.strict)
    ds = grain.MapDataset.range(padded)[process_index::process_count]
    ds = ds.map(example).batch(batch_size, drop_remainder=True, batch_fn=_stack)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=loader.read_threads, prefetch_buffer_size=2))
    return _finish(ds, loader)
