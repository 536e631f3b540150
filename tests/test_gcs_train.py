"""train.py and eval.py with every output in a bucket, as a TPU pod runs them: the default job with
``--workdir gs://...`` killed (SIGKILL, mid-save) or preempted (SIGTERM) and restarted with the same
command, against a real GCS server on 127.0.0.1 (tests/gcs_emulator.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest

from conftest import ROOT
from gcs_emulator import BUCKET, Fault, faults, gcs  # noqa: F401  (fixtures)
from mambaout_jax import storage
from mambaout_jax.convert.run_checkpoint import COMMIT_SUCCESS, find_step_dir
from test_train_run import SHORT, run_env, train_cmd  # noqa: F401  (run_env: a fixture)


def url(*parts: str) -> str:
    return "/".join([f"gs://{BUCKET}", *parts])


def env_for(run_env, gcs, devices: int = 1) -> dict:
    return {**run_env, **gcs.env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def records(workdir_url: str, kind: str = "train") -> list[dict]:
    storage.configure_clients()
    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
    path = workdir_url.removeprefix("gs://") + "/metrics.jsonl"
    if not fs.exists(path):
        return []
    return [r for r in map(json.loads, fs.cat(path).decode().splitlines()) if r["kind"] == kind]


def losses_by_step(workdir_url: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(workdir_url)}


def run(env, workdir_url, *flags, timeout=900):
    return subprocess.run(train_cmd(workdir_url, *flags), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def wait_until(condition, proc, what: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}) waiting for {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.3)
    raise TimeoutError(what)


@pytest.fixture(scope="module")
def uninterrupted(run_env, gcs):
    workdir = url("runs", "uninterrupted")
    r = run(env_for(run_env, gcs), workdir, *SHORT)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir, json.loads(r.stdout.strip().splitlines()[-1])


def test_kill_9_during_a_save_keeps_the_previous_checkpoint_and_the_restart_resumes_exactly(run_env, gcs, faults, uninterrupted):
    """The run is killed while step 20's commit file is held by the proxy: step 20's arrays are in
    the bucket but the step is not committed, so the same command resumes from step 10."""
    reference = losses_by_step(uninterrupted[0])
    assert sorted(reference) == list(range(1, 67))
    workdir = url("runs", "killed")
    held = faults.inject(Fault("POST", f"runs/killed/checkpoints/20/{COMMIT_SUCCESS}", status=None))
    env = env_for(run_env, gcs)
    proc = subprocess.Popen(train_cmd(workdir, *SHORT), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        wait_until(lambda: held.hits == 1 and max(losses_by_step(workdir), default=0) >= 25, proc, "a held commit at step 25")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    objects = gcs.list_objects(BUCKET, "runs/killed/checkpoints/20/")
    assert any("/state/" in name for name in objects) and f"runs/killed/checkpoints/20/{COMMIT_SUCCESS}" not in objects
    assert find_step_dir(workdir).name == "10"
    faults.reset()

    r = run(env, workdir, *SHORT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from this run's checkpoint at step 10" in r.stderr
    resumed = losses_by_step(workdir)
    assert sorted(resumed) == list(range(1, 67))
    assert resumed == reference  # exact, not approximate


def test_sigterm_saves_to_the_bucket_exits_0_and_resumes_exactly_and_eval_py_reads_the_run(run_env, gcs, faults, uninterrupted):
    workdir = url("runs", "preempted")
    env = env_for(run_env, gcs)
    proc = subprocess.Popen(train_cmd(workdir, *SHORT), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_until(lambda: max(losses_by_step(workdir), default=0) >= 15, proc, "step 15")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["preempted"] is True
    step = result["step"]
    assert f"runs/preempted/checkpoints/{step}/{COMMIT_SUCCESS}" in gcs.list_objects(BUCKET, f"runs/preempted/checkpoints/{step}/")
    assert max(losses_by_step(workdir)) == step  # the metrics up to the save are in the bucket

    r = run(env, workdir, *SHORT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from this run's checkpoint at step {step}" in r.stderr
    assert losses_by_step(workdir) == losses_by_step(uninterrupted[0])
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert final["top1"] == uninterrupted[1]["top1"]

    out_url = url("runs", "preempted", "eval.json")
    e = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"--weights={workdir}", "--source=digits", "--batch-size=71",
         f"--out={out_url}"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert e.returncode == 0, e.stderr[-3000:]
    evaluated = json.loads(e.stdout.strip().splitlines()[-1])
    assert evaluated["count"] == 355 and evaluated["top1"] == final["top1"]
    storage.configure_clients()
    assert json.loads(fsspec.filesystem("gs").cat(out_url))["top1"] == final["top1"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--workdir=gs://no-such-bucket/run"], "--workdir 'gs://no-such-bucket/run': the bucket 'no-such-bucket' does not exist"),
        (["--workdir=gs://forbidden-bucket/run"], "the bucket 'forbidden-bucket' refuses access"),
        ([f"--config.init_from=gs://no-such-bucket/w.pth"], "config.init_from 'gs://no-such-bucket/w.pth': the bucket 'no-such-bucket' does not exist"),
        (["--resume=gs://no-such-bucket/run"], "--resume 'gs://no-such-bucket/run': the bucket 'no-such-bucket' does not exist"),
    ],
)
def test_a_bucket_that_is_missing_or_refuses_access_is_named_before_compiling(run_env, gcs, faults, tmp_path, flags, message):
    faults.inject(Fault("*", r"/b/forbidden-bucket(/|\?|$)", status=403, times=1000))
    r = run(env_for(run_env, gcs), url("runs", "never"), *flags, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert message in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "first step done" not in r.stderr
    assert "devices x" not in r.stderr  # stopped before the mesh, the data and the program
