"""The training run, top to bottom: data, program, initial state, loop, checkpoints, evaluation.

``train.py`` parses flags and calls ``train(config, workdir)``; everything a run does is here, in
the order it happens. Multi-host runs call ``jax.distributed.initialize()`` before this.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import jax

from mambaout_jax import data as data_lib
from mambaout_jax.data.digits import write_digits_folder
from mambaout_jax.models.registry import get_model_spec
from mambaout_jax.train import checkpoint as ckpt_lib
from mambaout_jax.train import mesh as mesh_lib
from mambaout_jax.train.metrics import MetricsWriter, format_eta
from mambaout_jax.train.evaluation import evaluate
from mambaout_jax.train.program import ConfigError, TrainProgram, build_program, eval_settings


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
    check_local_path("config.data.dir", d.dir)
    if not os.path.isdir(d.dir):
        raise ConfigError(f"config.data.dir {d.dir!r} is not a directory")
    if d.source == "folder":
        train = data_lib.image_folder_source(d.dir, d.train_split)
        return train, data_lib.image_folder_source(d.dir, d.eval_split, classes=train.classes)
    if d.source == "tfds":
        return data_lib.tfds_source(d.dir, d.train_split, d.name), data_lib.tfds_source(d.dir, d.eval_split, d.name)
    raise ConfigError(f"config.data.source must be 'tfds', 'folder' or 'digits', got {d.source!r}")


def check_local_path(what: str, path: str | os.PathLike) -> None:
    """Data and workdirs are file-system paths; a bucket is read through a mount on every host."""
    if "://" in str(path):
        raise ConfigError(
            f"{what} {str(path)!r} is a URL; give a file-system path that every host sees: mount the bucket "
            f"on each host (Cloud Storage FUSE: gcsfuse --implicit-dirs BUCKET /gcs/BUCKET) and pass /gcs/BUCKET/..."
        )


def make_train_iterator(config, source):
    a = config.aug
    return data_lib.make_train_iterator(
        source,
        global_batch_size=config.batch_size,
        seed=config.seed,
        image_size=config.data.image_size,
        random_resized_crop=a.random_resized_crop,
        scale=tuple(a.scale),
        ratio=tuple(a.ratio),
        interpolation=a.interpolation,
        hflip=a.hflip,
        rand_augment=a.rand_augment or None,
        jpeg_draft=a.jpeg_draft,
        worker_count=config.data.worker_count,
        read_threads=config.data.read_threads,
        strict=config.data.strict,
    )


def eval_batch_size(config) -> int:
    return config.eval_batch_size or config.batch_size // config.grad_accum_steps


# ---------------------------------------------------------------------------------------------
# Initial state: own checkpoint > --resume > init_from > scratch
# ---------------------------------------------------------------------------------------------


def initial_params(config) -> tuple[dict, str]:
    """Weights to start a new run from: ``init_from`` (PyTorch, Flax or a run) or a fresh init."""
    if config.init_from:
        from mambaout_jax.convert import load_pretrained

        _, _, params = load_pretrained(config.init_from, model=config.model, num_classes=config.num_classes)
        return params, f"weights from {config.init_from}"
    from mambaout_jax.models.factory import create_model
    from mambaout_jax.models.params import get_params

    model = create_model(config.model, num_classes=config.num_classes, seed=config.seed, dw_conv_impl="grouped")
    return get_params(model), f"scratch (seed {config.seed})"


def restore_or_init(program: TrainProgram, mngr, train_iter, resume: str | None, log):
    """Returns the train state to start from, restoring the data iterator alongside when possible."""
    abstract = program.abstract_state()
    latest = mngr.latest_step()
    if latest is not None:
        state, _ = ckpt_lib.restore(mngr, latest, abstract, train_iter)
        log(f"resumed from this run's checkpoint at step {latest}")
        return state
    if resume:
        if not ckpt_lib.checkpoint_dir(resume).is_dir():  # checked first: the manager would create it
            raise ConfigError(f"--resume {resume}: no checkpoint found in {ckpt_lib.checkpoint_dir(resume)}")
        other = ckpt_lib.make_manager(resume, keep=1, interval_steps=1, async_save=False)
        try:
            step = other.latest_step()
            if step is None:
                raise ConfigError(f"--resume {resume}: no checkpoint found in {ckpt_lib.checkpoint_dir(resume)}")
            state, _ = ckpt_lib.restore(other, step, abstract, train_iter)
        finally:
            other.close()
        log(f"resumed from {resume} at step {step}")
        return state
    params, origin = initial_params(program.config)
    log(f"starting from {origin}")
    return program.init_state(params)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def train(config, workdir: str | os.PathLike, *, resume: str | None = None) -> dict:
    """Train (or continue training) ``config`` in ``workdir``; returns the final eval metrics."""
    check_local_path("--workdir", workdir)
    if resume:
        check_local_path("--resume", resume)
    if config.init_from:
        check_local_path("config.init_from", config.init_from)
    workdir = Path(workdir)
    t_start = time.time()

    # ---- Mesh and data ----
    mesh = mesh_lib.make_mesh()
    mesh_lib.check_global_batch(config.batch_size, mesh, config.grad_accum_steps)
    mesh_lib.check_global_batch(eval_batch_size(config), mesh)
    train_source, eval_source = make_sources(config)
    num_classes = len(getattr(train_source, "classes", ())) or config.num_classes
    if num_classes != config.num_classes:
        raise ConfigError(
            f"the dataset has {num_classes} classes but config.num_classes={config.num_classes}"
        )
    steps_per_epoch = len(train_source) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"the train split has {len(train_source)} examples, fewer than one batch ({config.batch_size})")

    # ---- Program: model, optimizer, shardings, jitted steps ----
    program = build_program(config, mesh, steps_per_epoch=steps_per_epoch)
    total_steps = program.total_steps if config.max_steps <= 0 else min(config.max_steps, program.total_steps)
    writer = MetricsWriter(workdir, total_steps=total_steps)
    log = writer.message
    log(
        f"{config.model}: {len(train_source)} train / {len(eval_source)} eval examples, "
        f"{mesh.devices.size} devices x {jax.process_count()} processes, global batch {config.batch_size} "
        f"(x{config.grad_accum_steps} accumulation), {steps_per_epoch} steps/epoch, {total_steps} steps"
    )

    # ---- Initial state and checkpoints ----
    train_iter = make_train_iterator(config, train_source)
    mngr = ckpt_lib.make_manager(workdir, keep=config.keep_checkpoints, interval_steps=config.checkpoint_every_steps)
    state = restore_or_init(program, mngr, train_iter, resume, log)
    step = int(jax.device_get(state.step))
    meta = {"model": get_model_spec(config.model).name, "num_classes": config.num_classes, "config": config.to_json()}
    eval_cfg = eval_settings(config)

    def run_eval(at_step: int) -> dict:
        params = state.ema_params if state.ema_params is not None else state.params
        result = evaluate(
            program.eval, params, eval_source, batch_size=eval_batch_size(config), settings=eval_cfg,
            worker_count=config.data.worker_count, strict=config.data.strict,
        )  # fmt: skip
        result["step"] = at_step
        writer.write("eval", at_step, result)
        log(f"eval @ step {at_step}: top1 {result['top1']:.4f}  top5 {result['top5']:.4f}  loss {result['loss']:.4f}")
        return result

    # ---- Preemption: SIGTERM saves and exits cleanly ----
    # Multi-host, JAX's distributed runtime owns SIGTERM (its preemption notifier, installed by
    # jax.distributed.initialize) and every host stops at the same step through its sync point; a
    # Python handler would replace the notifier's, so one is installed only for a single process.
    multi_host = jax.process_count() > 1
    preempted = {"flag": False}
    previous_handler = None if multi_host else signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))

    def should_stop(at_step: int) -> bool:
        if multi_host:
            return mngr.reached_preemption(at_step)
        return preempted["flag"]

    # ---- Train loop ----
    pending: list[dict] = []  # device metrics since the last log; fetched together (no per-step sync)
    last_good_checkpoint = mngr.latest_step()
    t_log, steps_at_log, first_step_time = time.perf_counter(), step, None
    result = {}
    try:
        while step < total_steps:
            batch = mesh_lib.global_batch(next(train_iter), mesh)
            state, metrics = program.train_step(state, batch)
            step += 1
            if first_step_time is None:
                jax.block_until_ready(metrics)
                first_step_time = time.time() - t_start
                log(f"first step done {first_step_time:.1f}s after start (compilation included)")
                t_log, steps_at_log = time.perf_counter(), step
            pending.append(metrics)

            end_of_epoch = step % steps_per_epoch == 0
            stop = should_stop(step)
            want_save = stop or step == total_steps or step % config.checkpoint_every_steps == 0
            if step % config.log_every_steps == 0 or want_save or end_of_epoch:
                fetched = list(zip(range(step - len(pending) + 1, step + 1), jax.device_get(pending)))
                pending = []
                for s, m in fetched:
                    if not m["finite"]:
                        raise TrainingDiverged(
                            f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at step {s}; stopping. "
                            f"The last good checkpoint is step {last_good_checkpoint} in {ckpt_lib.checkpoint_dir(workdir)}"
                        )
                now = time.perf_counter()
                # Step 1's time is mostly compilation: timing starts after it.
                timing = {}
                if step > steps_at_log:
                    step_time = (now - t_log) / (step - steps_at_log)
                    timing = {"step_time": step_time, "images_per_sec": config.batch_size / step_time}
                t_log, steps_at_log = now, step
                for s, m in fetched:
                    if s % config.log_every_steps == 0 or s == step:
                        values = {k: m[k] for k in ("loss", "lr", "grad_norm", "param_norm")}
                        writer.write("train", s, {**values, **timing, "epoch": s / steps_per_epoch})
                last = fetched[-1][1]
                speed = (
                    f"{timing['images_per_sec']:.1f} img/s ETA {format_eta((total_steps - step) * timing['step_time'])}"
                    if timing else ""
                )
                writer.progress(
                    f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} loss {float(last['loss']):.4f} "
                    f"lr {float(last['lr']):.2e} |g| {float(last['grad_norm']):.3f} {speed}"
                )
            if want_save:
                ckpt_lib.save(mngr, step, state, train_iter, meta, force=stop or step == total_steps)
                if mngr.latest_step() == step:
                    last_good_checkpoint = step
            if stop:
                mngr.wait_until_finished()
                log(f"preemption signal: saved step {step}, exiting")
                return {"preempted": True, "step": step}
            if end_of_epoch and (step // steps_per_epoch) % config.eval_every_epochs == 0:
                result = run_eval(step)
        if result.get("step") != step:
            result = run_eval(step)
        result["first_step_seconds"] = first_step_time
        return result
    finally:
        if previous_handler is not None:  # None also when the old handler was not Python's
            signal.signal(signal.SIGTERM, previous_handler)
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
