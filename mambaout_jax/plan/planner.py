"""Plan a training run for a TPU slice from the compiled step, before reserving the slice.

``plan_training`` builds the very ``TrainProgram`` that ``train.py`` runs (``build_program``: same
model graph, optimizer, sharding rules, jitted train and eval steps), compiles it for the slice's
compile-only devices, and derives:

- memory per chip against the HBM the compiler allows, and whether it fits; optionally the largest
  per-chip batch that fits (``search_batch``, a few compiles);
- FLOPs per step from XLA against the analytic count (``model_info``: conv + linear MACs);
- every collective, checked against what the sharding rule implies (``expectations``);
- a roofline estimate of step time, images/s and MFU from the published chip figures (``chips``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from mambaout_jax.models.factory import model_info
from mambaout_jax.plan.collectives import KindSummary, summarize
from mambaout_jax.plan.compile import StepCompile, compile_step, probe_hbm_limit
from mambaout_jax.plan.expectations import CollectiveCheck, check_collectives
from mambaout_jax.plan.topology import Topology, load_topology
from mambaout_jax.train import mesh as mesh_lib
from mambaout_jax.train.program import TrainProgram, build_program
from mambaout_jax.train.recipe import batch_augmentation, eval_batch_size, eval_preprocessing

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k train split: what "epoch time" refers to


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One compiled step: its batch and what the compiler said about it (per chip)."""

    step: str  # 'train' or 'eval'
    global_batch: int
    per_chip_batch: int  # examples per chip per forward pass (micro-batch when accumulating)
    image_size: int
    compiled: StepCompile


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Step time from peak chip figures and XLA's per-chip counts: an optimistic estimate.

    Each resource alone: compute (XLA FLOPs / bf16 peak), HBM traffic (XLA bytes accessed / HBM
    bandwidth), interconnect (bytes each chip sends in ring collectives / its ICI send bandwidth).
    ``step_seconds`` assumes they overlap perfectly and run at peak: the slowest one sets the pace.
    Real steps are slower (MambaOut's depthwise convolutions, norms and GELUs run on the vector
    unit, not the matrix unit); XLA's bytes accessed may also count some traffic the TPU keeps in
    on-chip VMEM, which errs the other way.
    """

    compute_seconds: float
    hbm_seconds: float
    ici_seconds: float
    step_seconds: float
    bound_by: str
    images_per_second_per_chip: float
    images_per_second: float  # whole slice
    mfu: float  # analytic model FLOPs / (step time x peak), at this step time
    epoch_seconds: float  # IMAGENET_TRAIN_IMAGES at images_per_second


@dataclasses.dataclass(frozen=True)
class BatchSearch:
    """Largest per-chip micro-batch that compiles within HBM, and every size tried."""

    largest_fitting: int | None  # None: not even the smallest tried fits
    smallest_not_fitting: int | None  # None: the search stopped at its upper limit
    tried: tuple[tuple[int, bool, int | None], ...]  # (per-chip batch, fits, bytes used or required)


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    params: int
    image_size: int
    compute_dtype: str
    sharding: str
    global_batch: int
    grad_accum_steps: int
    topology: Topology
    hbm_limit: int  # what the compiler allows per chip
    state_bytes_per_chip: int  # params + optimizer state as sharded (before layout padding)
    train: StepPlan
    eval: StepPlan | None
    analytic_train_flops_per_chip: float  # 3 x 2 x MACs x images per chip per step
    xla_train_flops_per_chip: float | None  # per step, accumulation loop counted in full
    collective_summary: dict[str, KindSummary]
    collective_check: CollectiveCheck | None
    roofline: Roofline | None
    batch_search: BatchSearch | None


def abstract_train_batch(program: TrainProgram, global_batch: int, image_size: int) -> dict:
    b = program.batch_sharding
    return {
        "image": jax.ShapeDtypeStruct((global_batch, image_size, image_size, 3), jnp.uint8, sharding=b),
        "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=b),
    }


def abstract_eval_batch(program: TrainProgram, global_batch: int, image_size: int) -> dict:
    b = program.batch_sharding
    return {
        **abstract_train_batch(program, global_batch, image_size),
        "mask": jax.ShapeDtypeStruct((global_batch,), jnp.bool_, sharding=b),
    }


def build_topology_program(config, topology: Topology) -> TrainProgram:
    """``train.py``'s program on the slice's devices: ``build_program`` called as ``train()`` calls it.

    The convolution forms follow the mesh's platform ('auto' -> XLA's grouped depthwise and dense
    convolutions on TPU), not this CPU host's.
    """
    mesh = mesh_lib.make_mesh(topology.devices)
    steps_per_epoch = max(1, IMAGENET_TRAIN_IMAGES // config.batch_size)
    mesh_lib.check_global_batch(eval_batch_size(config), mesh)  # as train() does, before compiling
    return build_program(config, mesh, steps_per_epoch=steps_per_epoch)


def compile_train(program: TrainProgram, topology: Topology) -> StepPlan:
    c = program.config
    size = c.data.image_size
    compiled = compile_step(
        program.train_step, program.abstract_state(), abstract_train_batch(program, c.batch_size, size)
    )
    return StepPlan("train", c.batch_size, program.micro_batch_size // topology.num_chips, size, compiled)


def compile_eval(program: TrainProgram, topology: Topology) -> StepPlan:
    c = program.config
    size = eval_preprocessing(c).image_size
    batch = eval_batch_size(c)
    compiled = compile_step(
        program.eval.eval_step, program.abstract_state().params, abstract_eval_batch(program, batch, size)
    )
    return StepPlan("eval", batch, batch // topology.num_chips, size, compiled)


def state_bytes_per_chip(program: TrainProgram) -> int:
    """Train state (params, optimizer state) bytes on one chip, as the shardings lay it out."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(program.abstract_state())
    )


def with_per_chip_batch(config, per_chip: int, num_chips: int):
    """The config with ``per_chip`` examples per chip per micro-step (accumulation unchanged)."""
    c = copy.deepcopy(config)
    c.batch_size = per_chip * num_chips * config.grad_accum_steps
    if c.eval_batch_size:
        c.eval_batch_size = per_chip * num_chips
    return c


def search_largest_batch(
    fits_at: Callable[[int], tuple[bool, int | None]],
    start: int,
    hbm_limit: int,
    *,
    max_batch: int = 1 << 16,
    precision: float = 1 / 16,
) -> BatchSearch:
    """Largest per-chip batch ``b`` in [1, max_batch] with ``fits_at(b)`` true, in few calls.

    Each call is a compile (minutes at 224px), so this is not a plain bisection: ``fits_at(b)``
    returns ``(fits, bytes)`` -- the memory used when it fits, the memory the compiler asked for
    when it refused -- and memory grows about linearly with the batch (activations). The next size
    tried is where the line through the two nearest points reaches ``hbm_limit``; once the answer is
    bracketed that guess is kept strictly inside the bracket, and a guess that fails to halve the
    bracket is followed by a bisection step, so the search never does worse than bisection. It stops
    when the bracket is within ``precision`` of the answer (and at least 1).
    """
    tried: dict[int, tuple[bool, int | None]] = {}

    def probe(b: int) -> bool:
        if b not in tried:
            tried[b] = fits_at(b)
        return tried[b][0]

    def crossing(a: int, b: int) -> float | None:
        """Batch at which the line through the points a and b reaches the limit."""
        (_, ma), (_, mb) = tried[a], tried[b]
        if ma is None or mb is None or a == b or mb == ma:
            return None
        slope = (mb - ma) / (b - a)
        return a + (hbm_limit - ma) / slope if slope > 0 else None

    def step(b: int) -> int:
        return max(1, int(b * precision))

    b = max(1, min(start, max_batch))
    probe(b)
    # 1. Bracket the answer. From one point, assume memory proportional to the batch (an
    #    underestimate of the answer: part of the memory is fixed); from two, follow their line,
    #    overshooting a little; never more than 32x per move.
    while True:
        fitting = sorted(x for x, (ok, _) in tried.items() if ok)
        failing = sorted(x for x, (ok, _) in tried.items() if not ok)
        if fitting and failing and fitting[-1] < failing[0]:
            break
        if not failing:  # everything fits so far: go up
            lo = fitting[-1]
            if lo >= max_batch:
                return _search_result(tried)
            guess = crossing(fitting[-2], lo) if len(fitting) > 1 else _proportional(lo, tried[lo][1], hbm_limit)
            b = min(max_batch, lo * 32, max(lo + step(lo), int(guess * 1.1) if guess else lo * 2))
        else:  # everything fails so far: go down
            hi = failing[0]
            if hi == 1:
                return _search_result(tried)
            guess = crossing(hi, failing[1]) if len(failing) > 1 else _proportional(hi, tried[hi][1], hbm_limit)
            b = max(1, hi // 32, min(hi - 1, int(guess * 0.9) if guess else hi // 2))
        if b in tried:  # memory not monotone in the batch: stop with what is known
            return _search_result(tried)
        probe(b)
    # 2. Narrow the bracket [lo fits, hi does not]: a guess on the line, then one precision step
    #    past it to close the bracket from the other side; bisect after a round that did not halve it.
    lo, hi = fitting[-1], failing[0]
    bisect = False
    while hi - lo > step(lo):
        width = hi - lo
        guess = None if bisect else crossing(lo, hi)
        b = min(hi - 1, max(lo + 1, int(guess))) if guess is not None else (lo + hi) // 2
        if probe(b):
            lo = b
            confirm = lo + step(lo)
        else:
            hi = b
            confirm = hi - step(lo)
        if not bisect and hi - lo > step(lo) and lo < confirm < hi:
            if probe(confirm):
                lo = confirm
            else:
                hi = confirm
        bisect = (hi - lo) * 2 > width
    return _search_result(tried)


def _proportional(b: int, used: int | None, hbm_limit: int) -> float | None:
    return b * hbm_limit / used if used else None


def _search_result(tried: dict[int, tuple[bool, int | None]]) -> BatchSearch:
    fitting = [b for b, (ok, _) in tried.items() if ok]
    largest = max(fitting) if fitting else None
    above = [b for b, (ok, _) in tried.items() if not ok and (largest is None or b > largest)]
    return BatchSearch(
        largest_fitting=largest,
        smallest_not_fitting=min(above) if above else None,
        tried=tuple((b, ok, used) for b, (ok, used) in sorted(tried.items())),
    )


def analytic_train_flops(model: str, num_classes: int, image_size: int) -> float:
    """FLOPs of one training example: forward (2 x MACs, conv + linear) plus backward (2x forward)."""
    return 3 * 2 * model_info(model, image_size=image_size, num_classes=num_classes)["macs"]


def roofline(
    topology: Topology, flops: float, bytes_accessed: float, wire_bytes: float, images_per_step: int,
    model_flops_per_step: float,
) -> Roofline:
    """The roofline step time of one step from per-chip XLA figures (see ``Roofline``)."""
    chip = topology.chip
    times = {
        "compute": flops / chip.bf16_flops,
        "HBM": bytes_accessed / chip.hbm_bandwidth,
        "ICI": wire_bytes / chip.ici_send_bandwidth,
    }
    bound_by = max(times, key=times.get)
    step = times[bound_by]
    per_chip = images_per_step / topology.num_chips / step
    return Roofline(
        compute_seconds=times["compute"],
        hbm_seconds=times["HBM"],
        ici_seconds=times["ICI"],
        step_seconds=step,
        bound_by=bound_by,
        images_per_second_per_chip=per_chip,
        images_per_second=per_chip * topology.num_chips,
        mfu=model_flops_per_step / topology.num_chips / (step * chip.bf16_flops),
        epoch_seconds=IMAGENET_TRAIN_IMAGES / (per_chip * topology.num_chips),
    )


def plan_training(
    config,
    topology: Topology | str,
    *,
    search_batch: bool = False,
    include_eval: bool = True,
    max_batch: int = 1 << 16,
    log: Callable[[str], None] = lambda message: None,
) -> Plan:
    """Compile ``train.py``'s steps for ``topology`` and plan from them (see the module docstring).

    Raises the project's ConfigError / ShardingConfigError for a config that cannot run on the
    slice (e.g. a global batch that does not divide by the chip count) and TopologyError for a
    topology it cannot describe; a step that does not fit is a result (``train.compiled.fits``),
    not an exception.
    """
    if isinstance(topology, str):
        topology = load_topology(topology)
    program = build_topology_program(config, topology)  # validates before any compile
    hbm_limit = probe_hbm_limit(topology.devices)

    log(f"compiling the train step for {topology.name} ({topology.num_chips} chips) ...")
    train = compile_train(program, topology)
    log(f"  {_verdict(train)} ({train.compiled.compile_seconds:.0f} s)")

    accum = config.grad_accum_steps
    analytic = analytic_train_flops(config.model, config.num_classes, config.data.image_size)
    analytic_per_chip = analytic * config.batch_size / topology.num_chips
    xla_flops = check = estimate = None
    summary: dict[str, KindSummary] = {}
    if train.compiled.fits:
        c = train.compiled
        # XLA's cost analysis counts a while-loop body once; the accumulation loop runs `accum`
        # times. Scaling the whole count overstates the once-per-step optimizer update by
        # (accum - 1)x, a fraction of a percent at realistic batch sizes.
        xla_flops = c.flops * accum
        summary = summarize(c.collectives, topology.num_chips)
        # The train step reduces float32 gradients whatever the compute dtype (steps.make_train_step):
        # the data-parallel all-reduce must be 4 bytes x params (within the check's 1%).
        mix = batch_augmentation(config).mixes
        s = config.data.image_size
        mix_bytes = config.batch_size // topology.num_chips * (s * s * 3 + 4 * config.num_classes) if mix else 0
        check = check_collectives(c.collectives, program.model_shapes, program.param_shardings, 4, mix_bytes)
        wire = sum(s.wire_bytes for s in summary.values())
        estimate = roofline(
            topology, xla_flops, c.bytes_accessed * accum, wire, config.batch_size, analytic * config.batch_size
        )

    evaluation = None
    if include_eval:
        log("compiling the eval step ...")
        evaluation = compile_eval(program, topology)
        log(f"  {_verdict(evaluation)} ({evaluation.compiled.compile_seconds:.0f} s)")

    search = None
    if search_batch:
        def fits_at(per_chip: int) -> tuple[bool, int | None]:
            bigger = build_topology_program(with_per_chip_batch(config, per_chip, topology.num_chips), topology)
            step = compile_train(bigger, topology).compiled
            used = step.memory.peak if step.fits else step.required_bytes
            verdict = "fits" if step.fits else "does not fit"
            memory = "?" if used is None else f"{used / 2**30:.2f} GiB"
            log(f"  per-chip batch {per_chip}: {verdict} ({memory}, {step.compile_seconds:.0f} s)")
            return step.fits, used

        log("searching the largest per-chip batch that fits ...")
        done = train.compiled  # the configured batch is compiled already
        known = {train.per_chip_batch: (done.fits, done.memory.peak if done.fits else done.required_bytes)}
        search = search_largest_batch(
            lambda b: known[b] if b in known else fits_at(b), train.per_chip_batch, hbm_limit, max_batch=max_batch
        )

    return Plan(
        model=config.model,
        params=sum(math.prod(s) for s in program.model_shapes.values()),
        image_size=config.data.image_size,
        compute_dtype=config.compute_dtype,
        sharding=config.sharding if isinstance(config.sharding, str) else "custom rules",
        global_batch=config.batch_size,
        grad_accum_steps=accum,
        topology=topology,
        hbm_limit=hbm_limit,
        state_bytes_per_chip=state_bytes_per_chip(program),
        train=train,
        eval=evaluation,
        analytic_train_flops_per_chip=analytic_per_chip,
        xla_train_flops_per_chip=xla_flops,
        collective_summary=summary,
        collective_check=check,
        roofline=estimate,
        batch_search=search,
    )


def _verdict(step: StepPlan) -> str:
    return "fits" if step.compiled.fits else "does not fit"

