"""grain's worker processes end with each evaluation and with the run, however the run ends."""

from __future__ import annotations

import time

import psutil
import pytest

from mambaout_jax.train import mesh as mesh_lib
from mambaout_jax.train.evaluation import evaluate
from mambaout_jax.train.program import build_eval_program
from mambaout_jax.train.recipe import loader_options
from mambaout_jax.train.trainer import TrainingDiverged, initial_params, make_sources, train
from test_recipe_resume import config


def _worker(p: psutil.Process) -> bool:
    """A live child that is not multiprocessing's resource tracker (one per process, started by the
    first shared-memory batch and meant to outlive it)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())
    except psutil.NoSuchProcess:
        return False


def children() -> set[int]:
    """Live worker processes under this test process (zombies reaped by a short wait)."""
    deadline = time.monotonic() + 10
    while True:
        alive = {p.pid for p in psutil.Process().children(recursive=True) if _worker(p)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_evaluation_and_runs_leave_no_grain_workers_behind(tmp_path):
    before = children()
    c = config(**{"data.worker_count": 2})
    _, eval_source = make_sources(c)
    program = build_eval_program(c.model, c.num_classes, mesh_lib.make_mesh())

    params, _ = initial_params(c)
    during = []

    def should_stop():  # asked before every eval batch: count the workers while they run
        during.append(len([p for p in psutil.Process().children(recursive=True) if _worker(p)]))
        return False

    result = evaluate(program, params, eval_source, batch_size=64, loader=loader_options(c), should_stop=should_stop)
    assert result["count"] == len(eval_source)
    assert max(during) > len(before), during  # grain's workers really ran
    left = children() - before
    assert not left, ("an evaluation left worker processes", [psutil.Process(p).cmdline() for p in left])

    train(c, tmp_path / "run")  # trains, evaluates at the end
    assert children() == before, "a finished run left worker processes"

    with pytest.raises(TrainingDiverged):
        train(config(lr=1e30, warmup_epochs=0, max_steps=6, **{"data.worker_count": 2}), tmp_path / "diverged")
    assert children() == before, "a diverged run left worker processes"
