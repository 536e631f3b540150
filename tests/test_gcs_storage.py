"""Cloud Storage in the library, against a real GCS server on 127.0.0.1 (tests/gcs_emulator.py):
weights in and out of a bucket, checkpoints (commit file, retried 503s, gcsfuse mounts), metrics,
TFDS ArrayRecord read from a bucket, errors naming the bucket, and no traffic beyond loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import fsspec
import grain
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import convert_torch_weights
import mambaout_jax
from conftest import ROOT
from data_fixtures import TRAIN_WNIDS, build_tfds_imagenet, encode, synthetic_image
from gcs_emulator import BUCKET, Fault, faults, gcs  # noqa: F401  (fixtures)
from mambaout_jax import storage
from mambaout_jax.convert import CheckpointError, load_weights
from mambaout_jax.convert.run_checkpoint import COMMIT_SUCCESS, find_step_dir
from mambaout_jax.data import tfds_source
from mambaout_jax.models.params import get_params
from mambaout_jax.train.checkpoint import RunCheckpoints
from mambaout_jax.train.metrics import MetricsWriter
from torch_reference import random_timm_model

NAME = "test_mambaout"


def gs(*parts: str) -> str:
    return "/".join([f"gs://{BUCKET}", *parts])


def bucket_fs():
    """gcsfs as the library configures it (anonymous on the emulator)."""
    storage.configure_clients()
    return fsspec.filesystem("gs")


def upload(local: Path, url: str) -> None:
    bucket_fs().put_file(str(local), url)


# ---- paths (no server needed) ----------------------------------------------------------------


def test_local_paths_stay_local_and_other_schemes_are_refused(tmp_path):
    assert os.fspath(storage.as_path("runs/a")) == "runs/a"  # relative stays relative
    assert os.fspath(storage.as_path(tmp_path / "x")) == str(tmp_path / "x")
    assert not storage.commits_with_file(tmp_path, mount_table=tmp_path / "no-table")
    with pytest.raises(storage.StorageError, match=r"--workdir 's3://b/run': s3:// is not supported"):
        storage.as_path("s3://b/run", "--workdir")
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.as_path("gs:///run", "--workdir")


def test_a_gcsfuse_mount_is_recognised_from_the_mount_table(tmp_path):
    table = tmp_path / "mounts"
    table.write_text(
        "proc /proc proc rw 0 0\n"
        f"my-bucket {tmp_path}/gcs\\040mount fuse.gcsfuse rw,nosuid,nodev,relatime,user_id=0 0 0\n"
        f"tmpfs {tmp_path}/gcs\\040mount/scratch tmpfs rw 0 0\n"
    )
    mount = storage.gcsfuse_mount(tmp_path / "gcs mount" / "run", mount_table=table)
    assert mount is not None and (mount.source, mount.mount_point) == ("my-bucket", f"{tmp_path}/gcs mount")
    assert storage.gcsfuse_mount(tmp_path / "gcs mount" / "scratch" / "x", mount_table=table) is None  # deeper mount wins
    assert storage.gcsfuse_mount(tmp_path / "elsewhere", mount_table=table) is None
    assert storage.commits_with_file(tmp_path / "gcs mount" / "run", mount_table=table)


# ---- weights ---------------------------------------------------------------------------------


def test_converter_reads_and_writes_buckets_and_create_model_loads_from_one(gcs, tmp_path):
    tm = random_timm_model(NAME, num_classes=10, seed=5)
    torch.save({"model": tm.state_dict()}, tmp_path / "start.pth")
    upload(tmp_path / "start.pth", gs("weights", "start.pth"))

    assert convert_torch_weights.main([gs("weights", "start.pth"), gs("weights", "flax.safetensors")]) == 0
    assert convert_torch_weights.main([gs("weights", "flax.safetensors"), gs("weights", "timm.safetensors"), "--to-timm"]) == 0

    local = load_weights(tmp_path / "start.pth")
    from_bucket = mambaout_jax.create_model(NAME, pretrained=gs("weights", "flax.safetensors"))
    params = {k: np.asarray(v) for k, v in get_params(from_bucket).items()}
    assert sorted(params) == sorted(local.params)
    assert all(np.array_equal(params[k], local.params[k]) for k in params)
    back = load_weights(gs("weights", "timm.safetensors"))  # timm layout, read from the bucket
    assert all(np.array_equal(back.params[k], local.params[k]) for k in local.params)
    assert not [n for n in gcs.list_objects(BUCKET, "weights/") if n.endswith(".tmp")]


def test_a_failed_conversion_leaves_no_object(gcs, tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"\x80not a pickle")
    upload(tmp_path / "junk.pth", gs("junk", "junk.pth"))
    assert convert_torch_weights.main([gs("junk", "junk.pth"), gs("junk", "out.safetensors")]) == 2
    assert gcs.list_objects(BUCKET, "junk/") == ["junk/junk.pth"]


def test_a_missing_or_forbidden_bucket_is_named(gcs, faults):
    with pytest.raises(CheckpointError, match="the bucket 'no-such-bucket' does not exist"):
        load_weights("gs://no-such-bucket/weights.pth")
    faults.inject(Fault("*", r"/b/forbidden-bucket(/|\?|$)", status=403, times=100))
    with pytest.raises(storage.StorageError, match="--workdir 'gs://forbidden-bucket/run': the bucket 'forbidden-bucket' refuses access"):
        storage.check_place("--workdir", "gs://forbidden-bucket/run", writable=True)
    # Readable but not writable: the write probe is what finds it.
    faults.inject(Fault("POST", rf"/upload/storage/v1/b/{BUCKET}/o", status=403, times=100))  # every upload
    storage.check_place("--resume", gs("readonly", "run"))
    with pytest.raises(storage.StorageError, match=f"the bucket '{BUCKET}' refuses access"):
        storage.check_place("--workdir", gs("readonly", "run"), writable=True)


# ---- checkpoints -----------------------------------------------------------------------------


def tiny_state(seed: int):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(64, 8)), jnp.float32), "b": {"c": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}}


def data_iterator():
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    next(it), next(it)
    return it


def assert_same(a, b):
    assert np.array_equal(np.asarray(a["w"]), np.asarray(b["w"])) and np.array_equal(np.asarray(a["b"]["c"]), np.asarray(b["b"]["c"]))


def test_checkpoints_on_a_bucket_commit_with_a_file_and_survive_transient_503s(gcs, faults):
    workdir = gs("ckpt503")
    checkpoints = RunCheckpoints(workdir, {"model": NAME}, keep=2, every_steps=1)
    state, it = tiny_state(0), data_iterator()
    checkpoints.save(1, state, it, force=True)
    checkpoints.wait_until_finished()
    # The next save meets three 503s from tensorstore's and gcsfs's writes alike; both retry.
    injected = faults.inject(Fault("POST", r"/upload/storage/v1/b/.*ckpt503/checkpoints/2", status=503, times=3))
    state2 = tiny_state(1)
    checkpoints.save(2, state2, it, force=True)
    checkpoints.close()
    assert injected.hits == 3
    assert sum(1 for _, url, status in faults.requests if status == 503) == 3
    objects = gcs.list_objects(BUCKET, "ckpt503/checkpoints/2/")
    assert "ckpt503/checkpoints/2/" + COMMIT_SUCCESS in objects
    assert not [n for n in gcs.list_objects(BUCKET, "ckpt503/") if "orbax-checkpoint-tmp" in n]  # nothing renamed

    reopened = RunCheckpoints(workdir, {}, keep=2, every_steps=1)
    try:
        assert reopened.latest_step() == 2
        restored = reopened.restore(2, jax_abstract(state2), data_iterator())
    finally:
        reopened.close()
    assert_same(restored, state2)
    assert find_step_dir(workdir).name == "2"


def jax_abstract(state):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_a_step_whose_save_never_finished_is_never_read(gcs, faults):
    """While a step's commit file cannot be written, the step is invisible: readers see the previous one."""
    workdir = gs("unfinished")
    checkpoints = RunCheckpoints(workdir, {"model": NAME}, keep=3, every_steps=1)
    it = data_iterator()
    checkpoints.save(1, tiny_state(0), it, force=True)
    checkpoints.wait_until_finished()
    held = faults.inject(Fault("POST", rf"unfinished/checkpoints/2/{COMMIT_SUCCESS}", status=None))
    checkpoints.save(2, tiny_state(1), it, force=True)
    deadline = time.monotonic() + 60
    while held.hits == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.hits == 1, "the commit file was never written"
    try:
        assert any(n.startswith("unfinished/checkpoints/2/state/") for n in gcs.list_objects(BUCKET, "unfinished/"))
        assert find_step_dir(workdir).name == "1"
        with pytest.raises(CheckpointError, match="incomplete checkpoint"):
            find_step_dir(gs("unfinished", "checkpoints", "2"))
        other = RunCheckpoints(workdir, {}, keep=3, every_steps=1)
        assert other.latest_step() == 1
        other._mngr.close()
    finally:
        faults.reset()  # the held request is answered 503; orbax retries it and the save completes
        checkpoints.close()
    assert find_step_dir(workdir).name == "2"


def test_a_gcsfuse_workdir_commits_with_a_file_and_ignores_an_unfinished_step(tmp_path, monkeypatch):
    bucket_mount = tmp_path / "mnt"
    bucket_mount.mkdir()
    table = tmp_path / "mounts"
    table.write_text(f"my-bucket {bucket_mount} fuse.gcsfuse rw,nosuid,nodev 0 0\n")
    monkeypatch.setenv(storage.mounts.MOUNT_TABLE_ENV, str(table))
    workdir = bucket_mount / "run"
    checkpoints = RunCheckpoints(workdir, {"model": NAME}, keep=3, every_steps=1)
    it = data_iterator()
    checkpoints.save(1, tiny_state(0), it, force=True)
    checkpoints.close()
    step1 = workdir / "checkpoints" / "1"
    assert (step1 / COMMIT_SUCCESS).exists()
    # An interrupted save of step 2 as orbax leaves it in commit-file mode: in place, unmarked.
    shutil.copytree(step1, workdir / "checkpoints" / "2")
    (workdir / "checkpoints" / "2" / COMMIT_SUCCESS).unlink()
    assert find_step_dir(workdir).name == "1"
    reopened = RunCheckpoints(workdir, {}, keep=3, every_steps=1)
    assert reopened.latest_step() == 1
    reopened.close()
    # The same folder without the mount-table entry is an ordinary local one (rename commits).
    monkeypatch.setenv(storage.mounts.MOUNT_TABLE_ENV, str(tmp_path / "empty"))
    (tmp_path / "empty").write_text("")
    assert find_step_dir(workdir).name == "2"


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics_in_a_bucket_are_uploaded_at_each_flush_and_a_resumed_run_continues_them(gcs):
    workdir = gs("metrics-run")
    fs = bucket_fs()
    writer = MetricsWriter(workdir, total_steps=10)
    writer.write("train", 1, {"loss": 2.5})
    writer.flush()
    assert [json.loads(line)["step"] for line in fs.cat(f"{BUCKET}/metrics-run/metrics.jsonl").decode().splitlines()] == [1]
    events = [n for n in gcs.list_objects(BUCKET, "metrics-run/tensorboard/") if "tfevents" in n]
    assert len(events) == 1
    writer.write("train", 2, {"loss": 2.0})  # not flushed: what a SIGKILL loses, at most one interval
    assert len(fs.cat(f"{BUCKET}/metrics-run/metrics.jsonl").decode().splitlines()) == 1
    writer.close()  # the end of a run (also reached after SIGTERM) uploads the rest

    resumed = MetricsWriter(workdir, total_steps=10)
    resumed.write("train", 3, {"loss": 1.5})
    resumed.close()
    fs.invalidate_cache()
    lines = fs.cat(f"{BUCKET}/metrics-run/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    tb_objects = [n for n in gcs.list_objects(BUCKET, "metrics-run/tensorboard/") if "tfevents" in n]
    assert len(tb_objects) >= 2  # the resumed run adds its event file next to the first


# ---- data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_in_bucket(gcs, tmp_path_factory):
    train = {wnid: [encode(synthetic_image(96, 72, 10 * c + j)) for j in range(8)] for c, wnid in enumerate(TRAIN_WNIDS)}
    val = [encode(synthetic_image(80, 64, 100 + j)) for j in range(4)]
    data_dir = build_tfds_imagenet(tmp_path_factory.mktemp("imagenet"), train, val)
    bucket_fs().put(str(data_dir / "imagenet2012"), f"{BUCKET}/tfds/", recursive=True)
    return data_dir


def test_tfds_arrayrecord_is_read_straight_from_a_bucket(gcs, tfds_in_bucket):
    local, remote = tfds_source(tfds_in_bucket, "train"), tfds_source(gs("tfds"), "train")
    assert len(remote) == len(local) == 8 * len(TRAIN_WNIDS)
    assert remote.classes == local.classes
    for i in range(len(local)):
        a, b = local[i], remote[i]
        assert a["image"] == b["image"] and a["label"] == b["label"] and "error" not in b


# ---- network safety --------------------------------------------------------------------------

EXERCISE = textwrap.dedent(
    """
    import sys
    import grain, jax, jax.numpy as jnp
    from mambaout_jax import storage
    from mambaout_jax.convert import load_weights, CheckpointError
    from mambaout_jax.data import tfds_source
    from mambaout_jax.train.checkpoint import RunCheckpoints
    from mambaout_jax.train.metrics import MetricsWriter
    def tiny_state(seed):
        return {"w": jnp.full((64, 8), float(seed))}
    def data_iterator():
        return iter(grain.MapDataset.range(10).to_iter_dataset())
    def jax_abstract(state):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    bucket = sys.argv[1]
    storage.check_place("--workdir", f"gs://{bucket}/safety", writable=True)
    c = RunCheckpoints(f"gs://{bucket}/safety", {"model": "x"}, keep=1, every_steps=1)
    c.save(1, tiny_state(0), data_iterator(), force=True); c.close()
    c = RunCheckpoints(f"gs://{bucket}/safety", {}, keep=1, every_steps=1)
    c.restore(1, jax_abstract(tiny_state(0)), data_iterator()); c.close()
    w = MetricsWriter(f"gs://{bucket}/safety", total_steps=1); w.write("train", 1, {"loss": 1.0}); w.close()
    s = tfds_source(f"gs://{bucket}/tfds", "train"); [s[i] for i in range(3)]
    try:
        load_weights("gs://no-such-bucket/w.pth")
    except CheckpointError:
        pass
    print("exercised")
    """
)


def test_every_client_talks_to_loopback_only(gcs, tfds_in_bucket, tmp_path):
    """strace sees every connect() of every thread, Python or C++ (gcsfs, tensorstore, array_record's
    google-cloud-cpp, DNS): all must go to 127.0.0.1, and the emulator must be among them."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is needed for the network-safety test: apt-get install -y strace")
    log = tmp_path / "connects"
    env = {**os.environ, **gcs.env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [strace, "-f", "-qq", "-e", "trace=connect", "-o", str(log), sys.executable, "-c", EXERCISE, BUCKET],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0 and "exercised" in r.stdout, r.stderr[-3000:]
    inet = [line for line in log.read_text().splitlines() if "AF_INET" in line]
    outside = [line for line in inet if 'inet_addr("127.0.0.1")' not in line and 'inet_pton(AF_INET6, "::1"' not in line]
    assert not outside, "connections beyond loopback:\n" + "\n".join(outside[:20])
    proxy_port = gcs.url.rsplit(":", 1)[1]
    assert any(f"htons({proxy_port})" in line for line in inet), "the trace saw no traffic to the emulator"
