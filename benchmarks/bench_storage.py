#!/usr/bin/env python
"""Local disk vs a Cloud Storage emulator on 127.0.0.1: a tiny checkpoint's save and restore, and
TFDS ArrayRecord reads. For orientation only: the emulator is not Cloud Storage (no network
latency, no server-side throughput limits, one local process), so the bucket numbers are a floor
on the client-side cost, not a prediction of what a TPU VM sees against a real bucket.

  python benchmarks/bench_storage.py [--repeats 5] [--records 600]

Both sides run in this one process, alternating, so the machine's noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import gcs_emulator  # noqa: E402  (the tests' emulator: fake-gcs-server behind a pass-through proxy)


def start_emulator(root: Path):
    emulator = gcs_emulator.GcsEmulator(root)
    closed = gcs_emulator.ClosedPort()
    os.environ.update(gcs_emulator.loopback_env(emulator.url, closed.port))
    emulator.create_bucket(gcs_emulator.BUCKET)
    return emulator, closed


def tiny_train_state():
    """The test_mambaout model's parameters and two optimizer moments: a small real checkpoint."""
    import jax.numpy as jnp

    from mambaout_jax.models.factory import build_model
    from mambaout_jax.models.params import get_params

    params = {k: jnp.asarray(v) for k, v in get_params(build_model("test_mambaout", num_classes=10)).items()}
    return {"params": params, "mu": {k: v * 0.5 for k, v in params.items()}, "nu": {k: v * v for k, v in params.items()}}


def bench_checkpoint(workdir: str, state, repeats: int) -> dict:
    import grain
    import jax

    from mambaout_jax.train.checkpoint import RunCheckpoints

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    saves, restores = [], []
    for step in range(1, repeats + 1):
        it = iter(grain.MapDataset.range(10).to_iter_dataset())
        checkpoints = RunCheckpoints(workdir, {"model": "test_mambaout"}, keep=2, every_steps=1)
        t = time.perf_counter()
        checkpoints.save(step, state, it, force=True)
        checkpoints.wait_until_finished()
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        checkpoints.restore(step, abstract, it)
        restores.append(time.perf_counter() - t)
        checkpoints.close()
    return {"save_s": statistics.median(saves), "restore_s": statistics.median(restores)}


def bench_tfds(data_dir: str, records: int) -> dict:
    import numpy as np

    from mambaout_jax.data import tfds_source

    t = time.perf_counter()
    source = tfds_source(data_dir, "train")
    opened = time.perf_counter() - t
    order = np.random.default_rng(0).permutation(len(source))[:records]
    t = time.perf_counter()
    size = sum(len(source[int(i)]["image"]) for i in order)
    elapsed = time.perf_counter() - t
    return {"open_s": opened, "records_per_s": len(order) / elapsed, "MB_per_s": size / elapsed / 1e6}


def build_dataset(root: Path, per_class: int) -> Path:
    from data_fixtures import TRAIN_WNIDS, build_tfds_imagenet, encode, synthetic_image

    train = {w: [encode(synthetic_image(500, 375, 100 * c + j)) for j in range(per_class)] for c, w in enumerate(TRAIN_WNIDS)}
    return build_tfds_imagenet(root, train, [encode(synthetic_image(500, 375, 9999))])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--records", type=int, default=600, help="random-order records read from each copy")
    args = p.parse_args(argv)
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "gcs").mkdir()
        emulator, closed = start_emulator(tmp / "gcs")
        try:
            import fsspec

            from mambaout_jax import storage

            state = tiny_train_state()
            size_mb = sum(v.nbytes for tree in state.values() for v in tree.values()) / 1e6
            local = bench_checkpoint(str(tmp / "run"), state, args.repeats)
            bucket = bench_checkpoint(f"gs://{gcs_emulator.BUCKET}/run", state, args.repeats)
            data_dir = build_dataset(tmp / "imagenet", per_class=max(1, args.records // 3))
            storage.configure_clients()
            fsspec.filesystem("gs").put(str(data_dir / "imagenet2012"), f"{gcs_emulator.BUCKET}/tfds/", recursive=True)
            tfds_local = bench_tfds(str(data_dir), args.records)
            tfds_bucket = bench_tfds(f"gs://{gcs_emulator.BUCKET}/tfds", args.records)
        finally:
            emulator.stop()
            closed.close()
    report = {
        "checkpoint_MB": round(size_mb, 2),
        "checkpoint_local": local,
        "checkpoint_emulator": bucket,
        "save_ratio_emulator_over_local": bucket["save_s"] / local["save_s"],
        "restore_ratio_emulator_over_local": bucket["restore_s"] / local["restore_s"],
        "tfds_local": tfds_local,
        "tfds_emulator": tfds_bucket,
        "tfds_read_ratio_local_over_emulator": tfds_local["records_per_s"] / tfds_bucket["records_per_s"],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
