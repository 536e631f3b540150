"""The training run, top to bottom: mesh, data, program, initial state, the loop, checkpoints, evaluation.

``train.py`` parses flags and calls ``train(config, workdir)``; everything a run does is here, in
the order it happens, with each concern in a named piece: ``check_places`` (every place the run
names, local or ``gs://``, checked before anything compiles), ``Preemption`` (SIGTERM, and JAX's
sync point on multi-host slices), ``StepMetrics`` (device metrics fetched together, divergence
checks, the records and the progress line), ``run_evaluation``. Multi-host runs call
``jax.distributed.initialize()`` before this.
"""

from __future__ import annotations

import os
import signal
import time

import jax
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost as ocp_multihost

from mambaout_jax import data as data_lib
from mambaout_jax import storage
from mambaout_jax.convert.run_checkpoint import checkpoint_dir, read_meta
from mambaout_jax.convert.weights import load_weights
from mambaout_jax.data.digits import write_digits_folder
from mambaout_jax.models.factory import build_model
from mambaout_jax.models.params import get_params
from mambaout_jax.models.registry import get_model_spec
from mambaout_jax.train import checkpoint as ckpt_lib
from mambaout_jax.train import mesh as mesh_lib
from mambaout_jax.train import recipe
from mambaout_jax.train.evaluation import EvaluationInterrupted, evaluate
from mambaout_jax.train.metrics import MetricsWriter, format_eta
from mambaout_jax.train.program import TrainProgram, build_program
from mambaout_jax.train.recipe import ConfigError
from mambaout_jax.train.steps import rng_streams


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient: the run stops and keeps its last good checkpoint."""


# ---------------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------------


def make_sources(config):
    """(train source, eval source) for the config's dataset; clear errors for a missing one."""
    d = config.data
    if d.source == "digits":
        root = write_digits_folder(d.cache_dir or None, image_size=d.image_size)
        train = data_lib.image_folder_source(root, "train")
        return train, data_lib.image_folder_source(root, "val", classes=train.classes)
    if not d.dir:
        raise ConfigError(f"config.data.dir is empty: where is the {d.source!r} dataset? (--config.data.dir=...)")
    if not storage.as_path(d.dir, "config.data.dir").is_dir():
        raise ConfigError(f"config.data.dir {d.dir!r} is not a directory")
    if d.source == "folder":
        train = data_lib.image_folder_source(d.dir, d.train_split)
        return train, data_lib.image_folder_source(d.dir, d.eval_split, classes=train.classes)
    if d.source == "tfds":
        return data_lib.tfds_source(d.dir, d.train_split, d.name), data_lib.tfds_source(d.dir, d.eval_split, d.name)
    raise ConfigError(f"config.data.source must be 'tfds', 'folder' or 'digits', got {d.source!r}")


def check_places(config, workdir, resume) -> None:
    """Every place the run names, local or ``gs://``: a bad URL, or a bucket that does not exist or
    refuses access, is an error naming it now, before the mesh, the data or any compilation."""
    storage.check_place("--workdir", workdir, writable=True)
    if resume:
        storage.check_place("--resume", resume)
        if not storage.is_url(resume) and not os.path.exists(resume):
            raise ConfigError(f"--resume {resume}: no checkpoint found in {checkpoint_dir(resume)}")
    if config.init_from:
        storage.check_place("config.init_from", config.init_from)
    if config.data.source != "digits" and config.data.dir:
        storage.check_place("config.data.dir", config.data.dir)


# ---------------------------------------------------------------------------------------------
# Initial state: own checkpoint > --resume > init_from > scratch
# ---------------------------------------------------------------------------------------------


def initial_params(config) -> tuple[dict, str]:
    """Weights to start a new run from: ``init_from`` (PyTorch, Flax or a run) or a fresh init."""
    if config.init_from:
        weights = load_weights(config.init_from, model=config.model, num_classes=config.num_classes)
        return weights.params, f"weights from {config.init_from}"
    # The init stream of the seed; the train steps draw from the other one (steps.rng_streams).
    init_key, _ = rng_streams(config.seed)
    model = build_model(config.model, num_classes=config.num_classes, rngs=nnx.Rngs(init_key), dw_conv_impl="grouped")
    return get_params(model), f"scratch (seed {config.seed})"


def check_saved_config(config, step_dir) -> None:
    """The checkpoint's config against this run's (``recipe.check_resume_config``), before restoring."""
    meta = read_meta(step_dir)
    recipe.check_resume_config(
        meta.get("config"), config, saved_process_count=meta.get("process_count"), process_count=jax.process_count()
    )


def restore_or_init(program: TrainProgram, checkpoints: ckpt_lib.RunCheckpoints, train_iter, resume, log):
    """The train state to start from, restoring the data iterator alongside when possible."""
    abstract = program.abstract_state()
    latest = checkpoints.latest_step()
    if latest is not None:
        check_saved_config(program.config, checkpoint_dir(checkpoints.workdir) / str(latest))
        state = checkpoints.restore(latest, abstract, train_iter)
        log(f"resumed from this run's checkpoint at step {latest}")
        return state
    if resume:
        step, state = ckpt_lib.restore_from_other_run(
            resume, abstract, train_iter, check=lambda step_dir: check_saved_config(program.config, step_dir)
        )
        log(f"resumed from {resume} at step {step}")
        return state
    params, origin = initial_params(program.config)
    log(f"starting from {origin}")
    return program.init_state(params)


# ---------------------------------------------------------------------------------------------
# Preemption, step metrics, evaluation
# ---------------------------------------------------------------------------------------------


class Preemption:
    """Whether the run should save and stop now (a preemption notice, SIGTERM).

    Asked once per train step and once per eval batch, so a SIGTERM during compilation is acted
    on when the first step completes, and one during evaluation after the current eval batch,
    never after a whole evaluation. Single process: a SIGTERM handler sets a flag. Multi-host:
    JAX's distributed runtime owns SIGTERM (the preemption notifier that
    ``jax.distributed.initialize`` installs; a Python handler would replace it) and tells every
    host; the hosts agree on the same stopping point through ``reached_preemption_sync_point``,
    whose id must advance in step on every host: the number of times this was asked, identical
    on all hosts since all run the same steps and eval batches. Use as a context manager: the
    previous handler comes back.
    """

    def __init__(self):
        self._multi_host = jax.process_count() > 1
        self._signalled = False
        self._asked = 0
        self._stopping = False
        self._previous = None

    def __enter__(self) -> Preemption:
        if not self._multi_host:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:  # None also when the old handler was not Python's
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, *_) -> None:
        self._signalled = True

    def requested(self) -> bool:
        if not self._stopping:
            if self._multi_host:
                self._asked += 1
                self._stopping = multihost_utils.reached_preemption_sync_point(self._asked)
            else:
                self._stopping = self._signalled
        return self._stopping


# How long a process waits for the others to finish compiling the train step: a slow host's
# compile of a large model can take many minutes longer than the fastest one's.
COMPILE_BARRIER_TIMEOUT_S = 30 * 60


def compiled_on_every_process(train_step, state, batch):
    """Multi-process runs: the train step compiled ahead of its first call, then a barrier.

    The first step's collectives are where the processes first meet, and on CPU clusters Gloo
    gives them 30 s to arrive (not configurable in jax 0.10.2): a process whose compile finishes
    more than 30 s after another's fails the run with ``Gloo context initialization failed:
    DEADLINE_EXCEEDED``. Compiling first and waiting at the distributed runtime's barrier
    (bounded by ``COMPILE_BARRIER_TIMEOUT_S``) makes every process reach that first collective
    together, whatever the platform.
    """
    compiled = train_step.lower(state, batch).compile()
    ocp_multihost.sync_global_processes("mambaout_train_step_compiled", timeout=COMPILE_BARRIER_TIMEOUT_S)
    return compiled


class StepMetrics:
    """The train step's device metrics, fetched from the devices a log interval at a time.

    ``record`` keeps each step's metrics on the device (no per-step sync); ``drain`` fetches them
    together, stops the run on the first non-finite step, and writes the logged steps' records
    (``metrics.jsonl``, TensorBoard) and the progress line. Timing starts after the first step,
    which is mostly compilation.
    """

    def __init__(self, writer: MetricsWriter, config, *, steps_per_epoch: int, total_steps: int):
        self.writer = writer
        self.log_every = config.log_every_steps
        self.batch_size = config.batch_size
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.last_good_checkpoint: int | None = None
        self._pending: list[tuple[int, dict]] = []
        self._timer: tuple[float, int] | None = None  # (time, step) of the last drain

    def record(self, step: int, metrics: dict) -> None:
        self._pending.append((step, metrics))

    def start_timing(self, step: int) -> None:
        self._timer = (time.perf_counter(), step)

    def due(self, step: int) -> bool:
        return step % self.log_every == 0

    def drain(self, step: int, workdir) -> None:
        steps = [s for s, _ in self._pending]
        fetched = list(zip(steps, jax.device_get([m for _, m in self._pending])))
        self._pending = []
        for s, m in fetched:
            if not m["finite"]:
                raise TrainingDiverged(
                    f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step {s}; stopping. "
                    f"The last good checkpoint is step {self.last_good_checkpoint} in {checkpoint_dir(workdir)}"
                )
        timing = self._timing(step)
        for s, m in fetched:
            if s % self.log_every == 0 or s == step:
                values = {k: m[k] for k in ("loss", "lr", "grad_norm", "param_norm")}
                self.writer.write("train", s, {**values, **timing, "epoch": s / self.steps_per_epoch})
        if fetched:
            self._progress(step, fetched[-1][1], timing)
        self.writer.flush()

    def _timing(self, step: int) -> dict:
        if self._timer is None or step <= self._timer[1]:
            return {}
        now = time.perf_counter()
        step_time = (now - self._timer[0]) / (step - self._timer[1])
        self._timer = (now, step)
        return {"step_time": step_time, "images_per_sec": self.batch_size / step_time}

    def _progress(self, step: int, last: dict, timing: dict) -> None:
        speed = ""
        if timing:
            eta = format_eta((self.total_steps - step) * timing["step_time"])
            speed = f"{timing['images_per_sec']:.1f} img/s ETA {eta}"
        self.writer.progress(
            f"step {step}/{self.total_steps} epoch {step / self.steps_per_epoch:.2f} loss {float(last['loss']):.4f} "
            f"lr {float(last['lr']):.2e} |g| {float(last['grad_norm']):.3f} {speed}"
        )


def run_evaluation(program: TrainProgram, state, eval_source, config, writer: MetricsWriter, step: int, preemption) -> dict:
    """Accuracy of the current weights (the EMA when the run keeps one) on the eval split, logged.

    Raises ``EvaluationInterrupted`` when a preemption is requested between two eval batches.
    """
    params = state.ema_params if state.ema_params is not None else state.params
    writer.message(f"evaluating step {step} on {len(eval_source)} examples")
    result = evaluate(
        program.eval, params, eval_source, batch_size=recipe.eval_batch_size(config),
        loader=recipe.loader_options(config), should_stop=preemption.requested,
    )  # fmt: skip
    result["step"] = step
    writer.write("eval", step, result)
    writer.flush()
    writer.message(f"eval @ step {step}: top1 {result['top1']:.4f}  top5 {result['top5']:.4f}  loss {result['loss']:.4f}")
    return result


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def train(config, workdir: str | os.PathLike, *, resume: str | None = None) -> dict:
    """Train (or continue training) ``config`` in ``workdir`` (local or ``gs://``); returns the final
    eval metrics, or ``{"preempted": True, "step": N}`` after saving step N on a preemption."""
    t_start = time.time()
    check_places(config, workdir, resume)
    with Preemption() as preemption:  # from the start: a SIGTERM during compilation is not lost
        return _run(config, workdir, resume, preemption, t_start)


def _run(config, workdir, resume, preemption: Preemption, t_start: float) -> dict:
    # ---- Mesh and data ----
    mesh = mesh_lib.make_mesh()
    mesh_lib.check_global_batch(config.batch_size, mesh, config.grad_accum_steps)
    mesh_lib.check_global_batch(recipe.eval_batch_size(config), mesh)
    train_source, eval_source = make_sources(config)
    classes = tuple(getattr(train_source, "classes", ()))
    if classes and len(classes) != config.num_classes:
        raise ConfigError(f"the dataset has {len(classes)} classes but config.num_classes={config.num_classes}")
    steps_per_epoch = len(train_source) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"the train split has {len(train_source)} examples, fewer than one batch ({config.batch_size})")

    # ---- Program: model, optimizer, shardings, jitted steps ----
    program = build_program(config, mesh, steps_per_epoch=steps_per_epoch)
    total_steps = program.total_steps if config.max_steps <= 0 else min(config.max_steps, program.total_steps)
    writer = MetricsWriter(workdir, total_steps=total_steps)
    writer.message(
        f"{config.model}: {len(train_source)} train / {len(eval_source)} eval examples, "
        f"{mesh.devices.size} devices x {jax.process_count()} processes, global batch {config.batch_size} "
        f"(x{config.grad_accum_steps} accumulation), {steps_per_epoch} steps/epoch, {total_steps} steps"
    )
    mount = storage.gcsfuse_mount(workdir)
    if mount is not None:
        writer.message(
            f"--workdir is on a gcsfuse mount of {mount.source!r} ({mount.mount_point}): checkpoints are written in place "
            f"and committed with commit_success.txt; --workdir gs://{mount.source}/... writes the bucket directly, faster"
        )

    # ---- Initial state and checkpoints ----
    train_iter = data_lib.make_train_iterator(
        train_source, global_batch_size=config.batch_size, seed=config.seed,
        transform=recipe.host_augmentation(config), loader=recipe.loader_options(config),
    )  # fmt: skip
    meta = {
        "model": get_model_spec(config.model).name,
        "num_classes": config.num_classes,
        "classes": list(classes),
        "config": config.to_json(),
        "process_count": jax.process_count(),
    }
    checkpoints = ckpt_lib.RunCheckpoints(workdir, meta, keep=config.keep_checkpoints, every_steps=config.checkpoint_every_steps)
    metrics = None
    try:
        state = restore_or_init(program, checkpoints, train_iter, resume, writer.message)
        step = int(jax.device_get(state.step))
        metrics = StepMetrics(writer, config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
        metrics.last_good_checkpoint = checkpoints.latest_step()

        def eval_due(s: int) -> bool:
            return s > 0 and s % steps_per_epoch == 0 and (s // steps_per_epoch) % config.eval_every_epochs == 0

        def stop(s: int, during: str = "") -> dict:
            checkpoints.save(s, state, train_iter, force=True)  # a no-op when step s is saved already
            checkpoints.wait_until_finished()
            writer.message(f"preemption signal{during}: saved step {s}, exiting")
            return {"preempted": True, "step": s}

        # ---- Train loop ----
        first_step_seconds = None
        result = {}
        # A run stopped (or killed) at an evaluation boundary evaluates that step first.
        if checkpoints.latest_step() == step and eval_due(step) and step < total_steps:
            try:
                result = run_evaluation(program, state, eval_source, config, writer, step, preemption)
            except EvaluationInterrupted:
                return stop(step, " during evaluation")
        train_step = program.train_step
        while step < total_steps:
            batch = mesh_lib.global_batch(next(train_iter), mesh)
            if first_step_seconds is None and jax.process_count() > 1:
                train_step = compiled_on_every_process(program.train_step, state, batch)
            state, step_metrics = train_step(state, batch)
            step += 1
            metrics.record(step, step_metrics)
            if first_step_seconds is None:
                jax.block_until_ready(step_metrics)
                first_step_seconds = time.time() - t_start
                writer.message(f"first step done {first_step_seconds:.1f}s after start (compilation included)")
                metrics.start_timing(step)

            end_of_epoch = step % steps_per_epoch == 0
            stopping = preemption.requested()
            last = step == total_steps
            save = stopping or last or checkpoints.should_save(step)
            if save or end_of_epoch or metrics.due(step):
                metrics.drain(step, workdir)  # before saving: a diverged state is never checkpointed
            if save and checkpoints.save(step, state, train_iter, force=stopping or last):
                metrics.last_good_checkpoint = step
            if stopping:
                return stop(step)
            if eval_due(step):
                try:
                    result = run_evaluation(program, state, eval_source, config, writer, step, preemption)
                except EvaluationInterrupted:
                    return stop(step, " during evaluation")
        if result.get("step") != step:
            try:
                result = run_evaluation(program, state, eval_source, config, writer, step, preemption)
            except EvaluationInterrupted:
                return stop(step, " during evaluation")
        result["first_step_seconds"] = first_step_seconds
        return result
    finally:
        train_iter.close()  # grain's worker processes end with the run, whatever ended it
        checkpoints.close()
        writer.close()
