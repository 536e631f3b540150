"""train.py and eval.py end to end, as a user runs them: default job, preemption, multi-process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

# A short version of the default digits run: 3 epochs of 22 steps, a checkpoint every 10 steps,
# every step's loss logged.
SHORT = ["--config.epochs=3", "--config.checkpoint_every_steps=10", "--config.log_every_steps=1",
         "--config.eval_every_epochs=100"]  # fmt: skip


@pytest.fixture(scope="session")
def run_env(tmp_path_factory):
    """Environment of every subprocess: one shared persistent compilation cache and data cache."""
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg_cache"))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("XLA_FLAGS", None)
    return env


def train_cmd(workdir, *flags):
    return [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", *flags]


def run_train(env, workdir, *flags, devices=1, timeout=900):
    env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run(train_cmd(workdir, *flags), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def records(workdir, kind="train"):
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def losses_by_step(workdir) -> dict[int, float]:
    """The loss of every logged step; when a resumed run logged a step again, its later value."""
    return {r["step"]: r["loss"] for r in records(workdir)}


def wait_for_step(workdir, step, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in records(workdir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="session")
def uninterrupted(run_env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    r = run_train(run_env, workdir, *SHORT)
    assert r.returncode == 0, r.stderr
    return workdir


def test_default_job_reaches_90_percent_on_held_out_digits(run_env, tmp_path):
    """The README's main job: `python train.py --workdir DIR`, no config, no download."""
    start = time.time()
    r = run_train(run_env, tmp_path / "run")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["top1"] >= 0.90, result
    assert result["count"] == 355  # every held-out digit exactly once
    train, evals = records(tmp_path / "run"), records(tmp_path / "run", "eval")
    assert train and all({"step", "loss", "lr", "grad_norm"} <= set(r) for r in train)
    assert evals and all({"step", "top1", "top5", "loss"} <= set(r) for r in evals)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    print(f"default job: {time.time() - start:.0f}s, top1 {result['top1']:.4f}")


def test_kill_9_mid_run_then_restart_gives_identical_losses(run_env, uninterrupted, tmp_path):
    reference = losses_by_step(uninterrupted)
    assert sorted(reference) == list(range(1, 67))
    workdir = tmp_path / "killed"
    env = dict(run_env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(train_cmd(workdir, *SHORT), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    wait_for_step(workdir, 27, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses_by_step(workdir))
    r = run_train(run_env, workdir, *SHORT)
    assert r.returncode == 0, r.stderr
    assert "resumed from this run's checkpoint at step" in r.stderr
    resumed = losses_by_step(workdir)
    assert sorted(resumed) == list(range(1, 67))
    assert resumed == reference, f"killed at step {killed_at}"  # exact, not approximate


def test_sigterm_saves_and_exits_cleanly_then_resumes_exactly(run_env, uninterrupted, tmp_path):
    workdir = tmp_path / "preempted"
    env = dict(run_env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen(train_cmd(workdir, *SHORT), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for_step(workdir, 15, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["preempted"] is True
    assert (workdir / "checkpoints" / str(result["step"]) / "state").is_dir()
    r = run_train(run_env, workdir, *SHORT)
    assert r.returncode == 0, r.stderr
    assert f"resumed from this run's checkpoint at step {result['step']}" in r.stderr
    assert losses_by_step(workdir) == losses_by_step(uninterrupted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_jax_distributed_match_one_process(run_env, tmp_path):
    """2 processes x 4 CPU devices joined by jax.distributed (gloo collectives) vs 1 x 8 devices.

    Same global batch and mesh size; each process feeds its half of every batch. Losses agree to
    fp32 reduction-order rounding (1e-5 relative).
    """
    flags = ["--config.max_steps=6", "--config.log_every_steps=1", "--config.checkpoint_every_steps=3"]
    single = run_train(run_env, tmp_path / "one", *flags, devices=8)
    assert single.returncode == 0, single.stderr
    port = _free_port()
    env = dict(run_env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [
        subprocess.Popen(
            train_cmd(tmp_path / "two", *flags, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                      "--num_processes=2", f"--process_id={i}"),
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert "8 devices x 2 processes" in outs[0][1]
    one, two = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "6" / "state").is_dir()


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(run_env, tmp_path):
    workdir = tmp_path / "diverged"
    r = run_train(run_env, workdir, "--config.lr=1e30", "--config.warmup_epochs=0",
                  "--config.checkpoint_every_steps=1", "--config.max_steps=20")  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert "non-finite loss" in r.stderr and "The last good checkpoint is step" in r.stderr
    assert "Traceback" not in r.stderr
    bad_step = int(r.stderr.split("at step ")[1].split(";")[0])
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < bad_step
    from mambaout_jax.convert import load_weights

    params = load_weights(workdir).params
    assert all(np.isfinite(v).all() for v in params.values())


@pytest.mark.parametrize(
    "flags,devices,message",
    [
        (["--config.batch_size=60"], 8, r"global batch \(60\) must divide by the number of devices \(8\)"),
        (["--config.model=mambaout_huge"], 1, "unknown model 'mambaout_huge'"),
        (["--config.data.source=folder", "--config.data.dir=/no/such/dir"], 1, "/no/such/dir"),
        (["--config.batchsize=64"], 1, "batchsize"),
        (["--config=/no/such/config.py"], 1, "could not load --config"),
        (["--config.data.source=tfds", "--config.data.dir=s3://bucket/tfds"], 1, "s3:// is not supported"),
        (["--workdir=hdfs://cluster/run"], 1, "--workdir 'hdfs://cluster/run': hdfs:// is not supported"),
        (["--resume=/nonexistent_mambaout_run"], 1, "--resume /nonexistent_mambaout_run: no checkpoint found"),
        (["--resume=s3://bucket/run"], 1, "--resume 's3://bucket/run': s3:// is not supported"),
    ],
)
def test_bad_config_is_a_clear_error_before_compiling(run_env, tmp_path, flags, devices, message):
    import re

    r = run_train(run_env, tmp_path / "bad", *flags, devices=devices, timeout=300)
    assert r.returncode != 0
    assert re.search(message, r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists() or not any((tmp_path / "bad" / "checkpoints").iterdir())
    assert not Path("/nonexistent_mambaout_run").exists()  # a mistyped --resume is not created


def test_init_from_pytorch_weights_and_eval_py_agree(run_env, tmp_path):
    """init_from a timm checkpoint: with lr 0 the trained weights stay the converted ones, and
    eval.py gives the same accuracy on the run and on the .pth it started from."""
    import torch

    from mambaout_jax.convert import convert_state_dict, load_weights
    from torch_reference import random_timm_model, state_dict_numpy

    tm = random_timm_model("test_mambaout", num_classes=10, seed=2)
    torch.save({"model": tm.state_dict()}, tmp_path / "start.pth")
    r = run_train(run_env, tmp_path / "run", f"--config.init_from={tmp_path / 'start.pth'}", "--config.lr=0",
                  "--config.warmup_lr=0", "--config.min_lr=0", "--config.max_steps=2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"starting from weights from {tmp_path / 'start.pth'}" in r.stderr
    _, _, expected = convert_state_dict(state_dict_numpy(tm))
    trained = load_weights(tmp_path / "run").params
    assert all(np.array_equal(trained[k], expected[k]) for k in expected)

    def eval_py(weights):
        out = subprocess.run(
            [sys.executable, str(ROOT / "eval.py"), f"--weights={weights}", "--source=digits", "--img-size=32",
             "--crop-pct=1.0", "--batch-size=64"],
            env=run_env, capture_output=True, text=True, timeout=300, cwd=ROOT,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    a, b = eval_py(tmp_path / "run"), eval_py(tmp_path / "start.pth")
    assert a["count"] == b["count"] == 355
    assert a["top1"] == b["top1"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def read_stderr_until(proc, marker: str, timeout: float = 600) -> list[str]:
    """Lines of ``proc``'s stderr up to the first containing ``marker`` (bounded by ``timeout``)."""
    import selectors

    lines, deadline = [], time.time() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while time.time() < deadline:
            if not sel.select(timeout=1):
                continue
            line = proc.stderr.readline()
            if not line:
                raise AssertionError(f"training exited ({proc.wait()}) before {marker!r}:\n{''.join(lines)[-3000:]}")
            lines.append(line)
            if marker in line:
                return lines
    raise TimeoutError(marker)


# How long after a SIGTERM a run must have saved and exited, for the tiny runs below: the current
# eval batch or (during compilation) the first step, then one checkpoint. On ImageNet the same
# boundaries apply: one eval batch, or compilation plus one train step, never a whole evaluation.
SAVE_AFTER_SIGTERM_S = 60


def test_sigterm_during_evaluation_saves_at_the_next_eval_batch_and_the_resumed_run_evaluates_first(
    run_env, uninterrupted, tmp_path
):
    workdir = tmp_path / "preempted_in_eval"
    flags = [*SHORT, "--config.eval_every_epochs=1", "--config.eval_batch_size=8"]  # 45 eval batches
    env = dict(run_env, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    # The SIGTERM comes from inside the first evaluation's third batch (see the helper): sent from
    # here after its log line, it raced the 45 small batches and, on a loaded machine, lost.
    cmd = [sys.executable, str(ROOT / "tests" / "sigterm_at_eval_batch.py"), "3", *train_cmd(workdir, *flags)[1:]]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    exited = time.time()
    err = r.stderr
    assert err.index("evaluating step 22 ") < err.index("sigterm sent at ")
    signalled = float(err.split("sigterm sent at ")[1].split()[0])
    assert "preemption signal during evaluation: saved step 22, exiting" in err
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"preempted": True, "step": 22}
    assert exited - signalled < SAVE_AFTER_SIGTERM_S, f"saved {exited - signalled:.0f}s after SIGTERM"
    assert not records(workdir, "eval")  # the evaluation was cut short, not recorded
    assert (workdir / "checkpoints" / "22" / "state").is_dir()

    r = run_train(run_env, workdir, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.index("resumed from this run's checkpoint at step 22") < r.stderr.index("evaluating step 22 ")
    assert [e["step"] for e in records(workdir, "eval")] == [22, 44, 66]
    assert losses_by_step(workdir) == losses_by_step(uninterrupted)


def test_sigterm_during_compilation_saves_after_the_first_step(run_env, tmp_path):
    workdir = tmp_path / "preempted_in_compile"
    env = dict(run_env, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_COMPILATION_CACHE_DIR="")
    proc = subprocess.Popen(train_cmd(workdir, *SHORT), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines = read_stderr_until(proc, "starting from scratch")  # the next thing is the first step's compilation
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    elapsed = time.time() - signalled
    assert proc.returncode == 0, err[-3000:]
    assert not any("first step done" in line for line in lines)  # the signal arrived before the first step ended
    assert json.loads(out.strip().splitlines()[-1]) == {"preempted": True, "step": 1}
    assert elapsed < SAVE_AFTER_SIGTERM_S, f"saved {elapsed:.0f}s after SIGTERM"
    assert (workdir / "checkpoints" / "1" / "state").is_dir()


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both_and_resumes_exactly(run_env, tmp_path):
    """Two processes joined by jax.distributed; the preemption notice reaches one of them (as a
    maintenance event reaches one TPU VM of a slice). JAX's notifier tells the other, both stop at
    the same sync point, save one checkpoint together and exit 0; the same command resumes it."""
    flags = ["--config.max_steps=24", "--config.log_every_steps=1", "--config.checkpoint_every_steps=100",
             "--config.eval_every_epochs=100"]  # fmt: skip
    env = dict(run_env, XLA_FLAGS="--xla_force_host_platform_device_count=4")

    def start(workdir):
        port = _free_port()
        return [
            subprocess.Popen(
                train_cmd(workdir, *flags, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                          "--num_processes=2", f"--process_id={i}"),
                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            for i in range(2)
        ]

    def finish(procs):
        outs = [p.communicate(timeout=900) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        return outs

    finish(start(tmp_path / "reference"))
    procs = start(tmp_path / "preempted")
    wait_for_step(tmp_path / "preempted", 6, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    outs = finish(procs)
    result = json.loads(outs[0][0].strip().splitlines()[-1])  # process 0 reports for the run
    assert result["preempted"] is True and result["step"] < 24
    saved = sorted(int(p.name) for p in (tmp_path / "preempted" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [result["step"]]
    # Each process wrote its own data-iterator position into that one step.
    step_dir = tmp_path / "preempted" / "checkpoints" / str(saved[0])
    assert sorted(p.name for p in (step_dir / "data_iterator").glob("process_*")) == ["process_0-of-2.json", "process_1-of-2.json"]

    finish(start(tmp_path / "preempted"))
    assert losses_by_step(tmp_path / "preempted") == losses_by_step(tmp_path / "reference")
