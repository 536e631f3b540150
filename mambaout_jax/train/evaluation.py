"""Accuracy over a whole split, sharded over every device, each example counted exactly once."""

from __future__ import annotations

import time
from typing import Callable

import jax

from mambaout_jax import data as data_lib
from mambaout_jax.data.pipeline import LoaderOptions
from mambaout_jax.train import mesh as mesh_lib
from mambaout_jax.train.program import EvalProgram


class EmptySplitError(ValueError):
    """The split to evaluate holds no examples, so there is no accuracy to report."""


class EvaluationInterrupted(Exception):
    """``should_stop`` said stop (a preemption) between two eval batches."""


def _describe(source) -> str:
    """The split's name for messages: its folder, or its TFDS dataset and split."""
    if getattr(source, "directory", None):
        return repr(source.directory)
    if getattr(source, "name", None):
        return repr(f"{source.name}:{getattr(source, 'split', '?')}")
    return f"(a {type(source).__name__})"


def evaluate(
    program: EvalProgram,
    params,
    source,
    *,
    batch_size: int,
    loader: LoaderOptions = LoaderOptions(),
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Top-1, top-5 and mean loss over ``source``.

    ``should_stop`` is asked before every batch (on every process, the same number of times);
    when it says stop, ``EvaluationInterrupted`` is raised, so a preempted run need not finish a
    whole ImageNet evaluation before it saves.

    The split is padded to whole global batches and the padding masked out, so the counts are
    exact whatever the split size, and every process runs the same number of steps.
    Images are prepared with the program's ``preprocessing`` (resize, crop, normalisation).
    """
    if len(source) == 0:
        raise EmptySplitError(f"nothing to evaluate: the split {_describe(source)} has no examples")
    mesh_lib.check_global_batch(batch_size, program.mesh)
    params = jax.device_put(params, program.param_shardings)
    it = data_lib.make_eval_iterator(
        source, global_batch_size=batch_size, preprocessing=program.preprocessing, loader=loader
    )
    totals = None
    start = time.perf_counter()
    try:
        for _ in range(data_lib.eval_steps(len(source), batch_size)):
            if should_stop is not None and should_stop():
                raise EvaluationInterrupted()
            sums = program.eval_step(params, mesh_lib.global_batch(next(it), program.mesh))
            totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    finally:
        it.close()  # grain's worker processes and read threads end with the pass, on every exit path
    totals = jax.device_get(totals) if totals is not None else {"count": 0}
    elapsed = time.perf_counter() - start
    count = float(totals["count"])
    if count == 0:
        raise EmptySplitError(f"nothing was evaluated: no example of the split {_describe(source)} reached the model")
    return {
        "top1": float(totals["top1_sum"]) / count,
        "top5": float(totals["top5_sum"]) / count,
        "loss": float(totals["loss_sum"]) / count,
        "count": int(count),
        "images_per_sec": count / elapsed,
    }
