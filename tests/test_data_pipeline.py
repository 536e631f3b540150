"""grain pipelines: determinism, process slicing, exact resume (also through orbax, also with
worker processes), the corrupt-record policy, and eval padding. Sources label each record with
its index, so batches say exactly which examples they hold."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_fixtures import encode, in_memory_source, odd_mode_images, photo_image, write_image_folder
from mambaout_jax.data import (
    CorruptRecordError,
    EvalPreprocessing,
    LoaderOptions,
    TrainTransform,
    eval_steps,
    eval_transform,
    image_folder_source,
    make_eval_iterator,
    make_train_iterator,
    restore_args,
    save_args,
)

GARBAGE = b"\x00not an image at all"
TRUNCATED = encode(photo_image("rocket", (200, 150)))[:2500]

# Small images keep the tests fast; the full augmentation (crop, flip, RandAugment) stays on.
FAST = dict(transform=TrainTransform(image_size=32))


@pytest.fixture(scope="module")
def source():
    return in_memory_source(24)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_have_the_documented_layout(source):
    batch = next(make_train_iterator(source, global_batch_size=8, seed=0, shard=(0, 1), **FAST))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32


def test_same_seed_same_batches_new_order_every_epoch(source):
    def three_epochs(seed):  # 24 examples, 8 per batch
        iterator = make_train_iterator(source, global_batch_size=8, seed=seed, shard=(0, 1), **FAST)
        return _take(iterator, 9)

    first = three_epochs(0)
    _assert_same_batches(first, three_epochs(0))
    assert not np.array_equal(first[0]["label"], three_epochs(1)[0]["label"])

    labels = [np.concatenate([b["label"] for b in first[i : i + 3]]) for i in (0, 3, 6)]
    images = [np.concatenate([b["image"] for b in first[i : i + 3]]) for i in (0, 3, 6)]
    for epoch in labels:
        assert sorted(epoch) == list(range(24))  # each epoch is a permutation of the source
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])
    # An example's augmentation depends on its position in the stream, so it differs per epoch.
    example_5 = [images[e][list(labels[e]).index(5)] for e in range(3)]
    assert not np.array_equal(example_5[0], example_5[1])


def test_process_slices_are_disjoint_cover_the_epoch_and_match_a_single_process(source):
    single = _take(make_train_iterator(source, global_batch_size=12, seed=3, shard=(0, 1), **FAST), 4)
    per_process = [
        _take(make_train_iterator(source, global_batch_size=12, seed=3, shard=(p, 3), **FAST), 4)
        for p in range(3)
    ]
    for process in per_process:
        assert all(b["label"].shape == (4,) for b in process)  # 12 / 3 processes
    for epoch in range(2):
        steps = range(2 * epoch, 2 * epoch + 2)  # 24 examples / 12 per step
        labels = [np.concatenate([per_process[p][s]["label"] for s in steps]) for p in range(3)]
        union = np.concatenate(labels)
        assert sorted(union) == list(range(24)), "process slices must partition the epoch"
    # Step by step, the global batch holds the same examples, equally augmented, whatever the
    # process count: the stream is shuffled by the seed alone and cut into global batches.
    for step in range(4):
        labels = np.concatenate([per_process[p][step]["label"] for p in range(3)])
        images = np.concatenate([per_process[p][step]["image"] for p in range(3)])
        assert sorted(labels) == sorted(single[step]["label"])
        for label, image in zip(labels, images):
            index = list(single[step]["label"]).index(label)
            np.testing.assert_array_equal(image, single[step]["image"][index])


@pytest.mark.parametrize("worker_count", [0, 2])
def test_restoring_iterator_state_reproduces_the_rest_exactly(worker_count):
    source = in_memory_source(30, corrupt={7: GARBAGE})
    def make():
        return make_train_iterator(source, global_batch_size=6, seed=11, shard=(0, 1),
                                   loader=LoaderOptions(worker_count=worker_count), **FAST)

    iterator = make()
    _take(iterator, 7)  # past the end of the first epoch
    state = iterator.get_state()
    count = iterator.corrupt_count
    expected = _take(iterator, 6)
    iterator.close()

    resumed = make()
    resumed.set_state(state)
    assert resumed.corrupt_count == count >= 1
    _assert_same_batches(_take(resumed, 6), expected)
    resumed.close()


def test_orbax_checkpoint_holds_train_state_and_iterator_position(tmp_path, source):
    def make():
        return make_train_iterator(source, global_batch_size=4, seed=5, shard=(0, 1), **FAST)

    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.asarray(10)}
    iterator = make()
    _take(iterator, 10)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(10, args=save_args(iterator, state=ocp.args.StandardSave(state)))
        manager.wait_until_finished()
    expected = _take(iterator, 5)  # what an uninterrupted run sees next

    fresh = make()
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.latest_step() == 10
        abstract = {"params": {"w": jnp.zeros((2, 3))}, "step": jnp.asarray(0)}
        restored = manager.restore(10, args=restore_args(fresh, state=ocp.args.StandardRestore(abstract)))
    np.testing.assert_array_equal(restored.state["params"]["w"], state["params"]["w"])
    assert int(restored.state["step"]) == 10
    assert restored.data_iterator is fresh
    _assert_same_batches(_take(fresh, 5), expected)


@pytest.mark.parametrize("worker_count", [0, 2])
def test_corrupt_records_are_skipped_counted_and_logged_once(caplog, worker_count):
    source = in_memory_source(20, corrupt={3: GARBAGE, 11: TRUNCATED})
    iterator = make_train_iterator(source, global_batch_size=6, seed=0, shard=(0, 1),
                                   loader=LoaderOptions(worker_count=worker_count), **FAST)
    with caplog.at_level(logging.WARNING, logger="mambaout_jax.data.pipeline"):
        batches = _take(iterator, 9)  # 54 good examples: three epochs of 18
    iterator.close()
    labels = np.concatenate([b["label"] for b in batches])
    good = set(range(20)) - {3, 11}
    assert set(labels) == good and 3 not in labels and 11 not in labels
    if worker_count == 0:  # with workers, each batches its own stride of the stream
        assert sorted(labels[:18]) == sorted(good)
    assert all(b["image"].shape == (6, 32, 32, 3) for b in batches)
    assert sorted(iterator.corrupt_keys) == ["record-11", "record-3"]
    assert iterator.corrupt_count >= 4  # seen in two epochs at least ...
    for key in ("record-3", "record-11"):  # ... but logged once
        assert sum(key in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("worker_count", [0, 2])
def test_strict_mode_raises_naming_the_corrupt_record(worker_count):
    source = in_memory_source(12, corrupt={5: GARBAGE})
    iterator = make_train_iterator(source, global_batch_size=4, seed=0, shard=(0, 1),
                                   loader=LoaderOptions(worker_count=worker_count, strict=True), **FAST)
    with pytest.raises(CorruptRecordError, match="record-5"):
        _take(iterator, 3)  # one epoch: record-5 is in it
    iterator.close()


def test_image_folder_with_every_image_mode_and_bad_files_trains(tmp_path):
    files = odd_mode_images()
    files["broken.JPEG"] = TRUNCATED
    files["empty.jpg"] = b""
    write_image_folder(tmp_path / "train", {"cls_a": files, "cls_b": {"ok.jpg": encode(photo_image("coffee"))}})
    source = image_folder_source(tmp_path, "train")
    iterator = make_train_iterator(source, global_batch_size=4, seed=0, shard=(0, 1), **FAST)
    labels = np.concatenate([b["label"] for b in _take(iterator, 4)])
    assert len(labels) == 16 and set(labels) == {0, 1}
    assert sorted(iterator.corrupt_keys) == sorted(str(tmp_path / "train/cls_a" / name)
                                                   for name in ("broken.JPEG", "empty.jpg"))


@pytest.mark.parametrize("process_count, worker_count", [(1, 0), (2, 0), (3, 0), (1, 2)])
def test_eval_pads_to_whole_global_batches_and_counts_each_example_once(process_count, worker_count):
    source = in_memory_source(23, corrupt={4: GARBAGE})
    global_batch = 6
    steps = eval_steps(len(source), global_batch)
    assert steps == 4
    seen = []
    for p in range(process_count):
        iterator = make_eval_iterator(source, global_batch_size=global_batch,
                                      preprocessing=EvalPreprocessing(image_size=32),
                                      shard=(p, process_count), loader=LoaderOptions(worker_count=worker_count))
        batches = list(iterator)
        assert len(batches) == steps  # every process runs the same number of steps
        for batch in batches:
            assert set(batch) == {"image", "label", "mask"}
            assert batch["image"].shape == (global_batch // process_count, 32, 32, 3)
            assert batch["mask"].dtype == np.bool_ and batch["label"].dtype == np.int32
            assert not batch["image"][~batch["mask"]].any()  # padding is blank
            seen.extend(batch["label"][batch["mask"]].tolist())
        assert iterator.corrupt_keys == (["record-4"] if 4 % process_count == p else [])
    assert sorted(seen) == sorted(set(range(23)) - {4})  # once each; the corrupt one masked out


def test_eval_images_are_eval_transform_of_each_record(tmp_path):
    photos = {f"{name}.JPEG": encode(photo_image(name, size))
              for name, size in [("astronaut", (500, 375)), ("chelsea", (333, 500)), ("rocket", (640, 201))]}
    write_image_folder(tmp_path / "val", {"c": photos})
    source = image_folder_source(tmp_path, "val")
    (batch,) = list(make_eval_iterator(source, global_batch_size=3,
                                       preprocessing=EvalPreprocessing(image_size=288, crop_pct=0.95), shard=(0, 1)))
    for i in range(3):
        expected = eval_transform(source[i]["image"], size=288, crop_pct=0.95)
        np.testing.assert_array_equal(batch["image"][i], expected)


def test_eval_strict_mode_raises_and_bad_batch_sizes_are_rejected():
    source = in_memory_source(8, corrupt={2: GARBAGE})
    with pytest.raises(CorruptRecordError, match="record-2"):
        list(make_eval_iterator(source, global_batch_size=4, preprocessing=EvalPreprocessing(image_size=32), shard=(0, 1),
                                loader=LoaderOptions(strict=True)))
    with pytest.raises(ValueError, match="multiple of the process count"):
        make_eval_iterator(source, global_batch_size=5, shard=(0, 2))
    with pytest.raises(ValueError, match="multiple of the process count"):
        make_train_iterator(source, global_batch_size=6, seed=0, shard=(1, 4))
