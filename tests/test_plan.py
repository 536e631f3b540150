"""TPU planning without a TPU: train.py's step compiled for pod slices by libtpu on this CPU.

The compiling tests run the planner's command line in subprocesses (libtpu's compile-only TPU
client stays out of this process, whose JAX has 8 simulated CPU devices), two at a time, once per
module; each test then reads the plans they wrote. femto at 32px keeps a compile at ~20-30 s on
two cores: the model graph, optimizer, shardings and collectives are the real ones, only the
activations are small.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mambaout_jax.models.factory import model_info, model_param_shapes
from mambaout_jax.plan.collectives import Array, Collective, parse_collectives, summarize
from mambaout_jax.plan.expectations import TOLERANCE, check_collectives
from mambaout_jax.plan.planner import search_largest_batch
from mambaout_jax.plan.topology import KNOWN_FORMS, TopologyError, parse_topology_name
from mambaout_jax.train.mesh import partition_spec, resolve_rules

ROOT = Path(__file__).resolve().parents[1]
FEMTO_PARAMS = model_info("mambaout_femto")["params"]
GiB = 2**30

SMALL_FEMTO = [
    "--config", "configs/mambaout_femto.py", "--config.data.image_size=32", "--config.data.eval_image_size=32",
    "--config.aug.mix_group_size=4",  # the recipe's 128 needs micro-batches of 128 x k; these are 16-64
]
PLANS = {
    # name: (topology, extra flags)
    "v5e_2x2": ("v5e:2x2", ["--config.batch_size=32"]),  # with the eval step
    "v4_2x2x1": ("v4:2x2x1", ["--config.batch_size=32", "--noeval", "--search-batch", "--max-batch=16"]),
    "v5e_4x4_multihost": ("v5e:4x4", ["--config.batch_size=64", "--noeval"]),
    "v5e_2x2_accum": ("v5e:2x2", ["--config.batch_size=64", "--config.grad_accum_steps=2", "--noeval"]),
    "v5e_2x2_fsdp": ("v5e:2x2", ["--config.batch_size=32", "--config.sharding=fsdp", "--noeval"]),
    # from 4x4 up the v5e compiler writes the gradients' reduce-scatters as all-reduce + slice
    "v5e_4x4_fsdp": ("v5e:4x4", ["--config.batch_size=64", "--config.sharding=fsdp", "--noeval"]),
    # 262,144 images of 32px per chip: ~50 GiB of activations on a 16 GiB chip
    "v5e_2x2_too_big": ("v5e:2x2", ["--config.batch_size=1048576", "--noeval"]),
}
DATA_PARALLEL = ("v5e_2x2", "v4_2x2x1", "v5e_4x4_multihost", "v5e_2x2_accum")


def run_planner(*args: str, json_path: Path | None = None) -> subprocess.CompletedProcess:
    # The CLI's own defaults; no compilation cache (each TPU program here compiles once).
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    cmd = [sys.executable, "-m", "mambaout_jax.plan", *args] + (["--json", str(json_path)] if json_path else [])
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, dict]:
    """Every plan of PLANS: {'returncode', 'stdout', 'stderr', 'json'}, compiled two at a time."""
    out_dir = tmp_path_factory.mktemp("plans")

    def one(name: str) -> tuple[str, dict]:
        topology, extra = PLANS[name]
        path = out_dir / f"{name}.json"
        proc = run_planner(*SMALL_FEMTO, "--topology", topology, *extra, json_path=path)
        plan = json.loads(path.read_text()) if path.exists() else None
        return name, {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, "json": plan}

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as pool:
        return dict(pool.map(one, PLANS))


def ok_plan(plans: dict, name: str) -> dict:
    result = plans[name]
    assert result["returncode"] == 0, f"{name}: exit {result['returncode']}\n{result['stderr'][-3000:]}"
    return result["json"]


# ---------------------------------------------------------------------------------------------
# Compiling for slices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, chips, processes, kind, hbm_gib",
    [
        ("v5e_2x2", 4, 1, "TPU v5 lite", 15.75),
        ("v4_2x2x1", 4, 1, "TPU v4", 30.75),  # megacore: one device per chip, as JAX shows a v4
        ("v5e_4x4_multihost", 16, 4, "TPU v5 lite", 15.75),
    ],
)
def test_femto_train_step_compiles_for_single_and_multi_host_slices(plans, name, chips, processes, kind, hbm_gib):
    plan = ok_plan(plans, name)
    topo = plan["topology"]
    assert (topo["chips"], topo["processes"], topo["chip"]["device_kind"]) == (chips, processes, kind)
    train = plan["train"]["compiled"]
    assert train["fits"] and train["compiler_message"] == ""
    assert plan["train"]["per_chip_batch"] * chips == plan["global_batch"]
    assert plan["hbm_limit"] == pytest.approx(hbm_gib * GiB, rel=1e-3)  # the compiler's own limit
    # the state must be on the chip: arguments hold at least the train state as sharded
    assert train["memory"]["arguments"] >= plan["state_bytes_per_chip"] > 3 * FEMTO_PARAMS * 4 * 0.99
    assert train["memory"]["arguments"] < train["memory"]["peak"] < plan["hbm_limit"]
    # XLA's FLOPs are per chip and close to 3 x 2 x MACs (conv + linear) per image
    assert 0.9 < plan["xla_train_flops_per_chip"] / plan["analytic_train_flops_per_chip"] < 1.5
    r = plan["roofline"]
    assert r["step_seconds"] == max(r["compute_seconds"], r["hbm_seconds"], r["ici_seconds"]) > 0
    assert r["images_per_second"] == pytest.approx(plan["global_batch"] / r["step_seconds"])


def test_batch_search_compiles_larger_batches_of_the_same_program(plans):
    plan = ok_plan(plans, "v4_2x2x1")
    search = plan["batch_search"]
    (b0, fits0, peak0), (b1, fits1, peak1) = search["tried"]  # the configured 8 per chip, then the limit
    assert (b0, b1, fits0, fits1) == (8, 16, True, True) and peak1 > peak0
    assert peak0 == plan["train"]["compiled"]["memory"]["peak"]
    assert (search["largest_fitting"], search["smallest_not_fitting"]) == (16, None)
    assert "upper limit (--max-batch)" in plans["v4_2x2x1"]["stdout"]


def test_eval_step_compiles_with_the_train_step(plans):
    plan = ok_plan(plans, "v5e_2x2")
    assert plan["eval"]["compiled"]["fits"] and plan["eval"]["image_size"] == 32
    assert plan["eval"]["compiled"]["memory"]["peak"] < plan["train"]["compiled"]["memory"]["peak"]
    assert ok_plan(plans, "v4_2x2x1")["eval"] is None  # --noeval


@pytest.mark.parametrize("name", DATA_PARALLEL)
def test_data_parallel_step_only_all_reduces_the_gradients_once(plans, name):
    """The rule: the non-scalar all-reduced elements equal the parameter count within TOLERANCE
    (1%), in float32 (bytes = params x 4 within 1%, under bf16 compute: steps.make_train_step
    reduces float32 gradients), and no other collective moves more than a scalar but Mixup/CutMix's
    partner exchange (collective-permute / all-to-all of at most the chip's uint8 images and
    float32 targets). Scalar all-reduces (loss; mixup's Beta rejection sampler) are expected."""
    plan = ok_plan(plans, name)
    collectives = plan["train"]["compiled"]["collectives"]
    tensors = [c for c in collectives if any(a["shape"] for a in c["arrays"]) and c["kind"] == "all-reduce"]
    exchange = [c for c in collectives if c["kind"] in ("collective-permute", "all-to-all")]
    others = [c for c in collectives if c not in tensors and c not in exchange]
    assert all(c["bytes"] <= 16 for c in others), others  # scalars only
    assert sum(c["bytes"] * c["executions"] for c in exchange) <= 64 * (32 * 32 * 3 + 4 * 1000)  # <= 64 rows per chip
    assert {a["dtype"] for c in tensors for a in c["arrays"] if a["shape"]} == {"f32"}
    elements = sum(a_elements(a) * c["executions"] for c in tensors for a in c["arrays"] if a["shape"])
    nbytes = sum(c["bytes"] * c["executions"] for c in tensors)
    assert abs(elements - FEMTO_PARAMS) <= TOLERANCE * FEMTO_PARAMS, (elements, FEMTO_PARAMS)
    assert 4 * FEMTO_PARAMS * (1 - TOLERANCE) <= nbytes <= 4 * FEMTO_PARAMS * (1 + TOLERANCE)
    check = plan["collective_check"]
    assert check["ok"] and check["rule"] == "data parallel", check


def a_elements(array: dict) -> int:
    n = 1
    for d in array["shape"]:
        n *= d
    return n


def test_gradient_accumulation_all_reduces_once_per_step_and_counts_every_micro_step(plans):
    plan = ok_plan(plans, "v5e_2x2_accum")
    collectives = plan["train"]["compiled"]["collectives"]
    gradients = [c for c in collectives if c["elements"] > 1000 and c["kind"] == "all-reduce"]
    assert len(gradients) == 1 and gradients[0]["executions"] == 1  # hoisted out of the accumulation loop
    loss = [c for c in collectives if c["elements"] == 1 and not c["in_unknown_loop"]]
    # The loss: summed locally, reduced once per step (XLA's combiner may fold it into the gradients' all-reduce).
    assert all(c["executions"] == 1 for c in loss)
    # FLOPs of both micro-steps: about the same as one step over the same images
    assert 0.9 < plan["xla_train_flops_per_chip"] / plan["analytic_train_flops_per_chip"] < 1.5
    assert plan["train"]["per_chip_batch"] == 64 // 2 // 4


def test_fsdp_cuts_per_chip_parameter_and_optimizer_memory_by_about_the_chip_count(plans):
    dp, fsdp = ok_plan(plans, "v5e_2x2"), ok_plan(plans, "v5e_2x2_fsdp")
    chips = fsdp["topology"]["chips"]
    batch_bytes = fsdp["train"]["per_chip_batch"] * (32 * 32 * 3 + 4)  # uint8 images + int32 labels

    def state_bytes(plan):  # compiled: arguments are the train state shard plus the batch shard
        return plan["train"]["compiled"]["memory"]["arguments"] - batch_bytes

    assert state_bytes(dp) >= 3 * FEMTO_PARAMS * 4  # params + Adam's two moments, replicated
    assert state_bytes(dp) / state_bytes(fsdp) > 0.8 * chips, (state_bytes(dp), state_bytes(fsdp))
    assert dp["state_bytes_per_chip"] / fsdp["state_bytes_per_chip"] > 0.9 * chips  # before layout padding
    check = fsdp["collective_check"]
    assert check["ok"] and check["rule"] == "sharded (fsdp)", check
    kinds = fsdp["collective_summary"]
    assert kinds["all-reduce"]["elements"] < 0.5 * FEMTO_PARAMS  # the gradients are not all-reduced in full ...
    assert kinds["all-gather"]["elements"] > 0.5 * FEMTO_PARAMS  # ... most weights are gathered where used


def test_fsdp_on_a_4x4_slice_is_checked_through_the_compilers_all_reduce_form_of_reduce_scatter(plans):
    """On v5e:4x4 every sharded gradient's reduce-scatter comes out of the TPU compiler as an
    all-reduce whose result each chip only dynamic-slices. The planner must see that as the
    reduce-scatter it is (not as replicated gradients) and still say which arrays are reduced whole."""
    plan = ok_plan(plans, "v5e_4x4_fsdp")
    chips = plan["topology"]["chips"]
    rules = resolve_rules("fsdp")
    shapes = model_param_shapes("mambaout_femto")
    sharded = sum(math.prod(s) for p, s in shapes.items() if partition_spec(p, s, rules, chips) != PartitionSpec())
    assert 0.9 * FEMTO_PARAMS < sharded < FEMTO_PARAMS
    by_role = {"scatter": 0, "gather": 0, "": 0}
    for c in plan["train"]["compiled"]["collectives"]:
        if c["kind"] == "all-reduce":
            assert len(c["roles"]) == len(c["arrays"])
            for a, role in zip(c["arrays"], c["roles"]):
                if a["shape"]:
                    by_role[role] += a_elements(a) * c["executions"]
        else:
            assert c["roles"] == []
    reduce_scatter = plan["collective_summary"].get("reduce-scatter", {"elements": 0})["elements"]
    assert by_role["scatter"] + reduce_scatter == sharded  # every sharded gradient is scattered, once
    assert by_role["scatter"] > 0.9 * sharded  # ... almost all of it in the all-reduce form
    assert by_role[""] == FEMTO_PARAMS - sharded  # the replicated ones (norm scales, biases) reduced whole
    check = plan["collective_check"]
    assert check["ok"] and check["rule"] == "sharded (fsdp)", check
    written_as = f"{by_role['scatter']:,} elements are reduce-scatters written as all-reduce + dynamic-slice"
    assert written_as in check["found"]


def test_batch_that_cannot_fit_is_reported_with_the_compilers_numbers(plans):
    result = plans["v5e_2x2_too_big"]
    assert result["returncode"] == 1, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"]
    train = result["json"]["train"]["compiled"]
    assert train["fits"] is False and train["memory"] is None
    assert train["available_bytes"] == pytest.approx(15.75 * GiB, rel=1e-3)
    assert train["required_bytes"] > 2 * train["available_bytes"]
    assert "DOES NOT FIT" in result["stdout"] and "15.75 GiB available per chip" in result["stdout"]
    assert "RESOURCE_EXHAUSTED" in result["stdout"]


def test_a_bad_model_field_is_a_clear_error():
    result = run_planner(*SMALL_FEMTO, "--topology", "v5e:2x2", "--config.model=mambaout_huge")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown model 'mambaout_huge'" in result.stderr


def test_global_batch_not_divisible_by_the_chip_count_is_the_projects_error():
    result = run_planner(*SMALL_FEMTO, "--topology", "v5e:4x4", "--config.batch_size=4100")
    assert result.returncode == 2
    assert "must divide by the number of devices (16)" in result.stderr and "batch_size=4096" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_topology_is_a_clear_error_listing_the_known_forms():
    result = run_planner(*SMALL_FEMTO, "--topology", "v9:4x4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown TPU generation in 'v9:4x4'" in result.stderr
    for form in ("v5e:16x16", "v4:2x2x4", "v5p:4x4x4", "v6e:16x16", "v4-32", "v5e-256", "v5p-128", "v6e-256"):
        assert form in result.stderr


# ---------------------------------------------------------------------------------------------
# Topology names (no libtpu needed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("v5e:16x16", ("v5e", "16x16")),
        ("v5e-256", ("v5e", "16x16")),
        ("v5litepod-16", ("v5e", "4x4")),
        ("v4-32", ("v4", "2x2x4")),  # v4 types count TensorCores: 32 cores = 16 chips
        ("v5p-128", ("v5p", "4x4x4")),
        ("V6E-256", ("v6e", "16x16")),
        ("v4:4x4x8", ("v4", "4x4x8")),
    ],
)
def test_topology_and_accelerator_type_names(name, expected):
    assert parse_topology_name(name) == expected


@pytest.mark.parametrize(
    "name, message",
    [
        ("v9:4x4", "unknown TPU generation"),
        ("v3-8", "unknown TPU generation"),
        ("tpu", "cannot read TPU topology"),
        ("v5e-3", "no default slice shape for 'v5e-3'"),
        ("v4-33", "no default slice shape"),
        ("v5e:2x2x1", "v5e slices are 2-D"),
        ("v5p:4x4", "v5p slices are 3-D"),
    ],
)
def test_bad_topology_names_say_what_is_accepted(name, message):
    with pytest.raises(TopologyError, match=message) as e:
        parse_topology_name(name)
    assert "no default slice shape" in str(e.value) or KNOWN_FORMS in str(e.value)


# ---------------------------------------------------------------------------------------------
# Reading collectives from HLO text
# ---------------------------------------------------------------------------------------------

# The module line and the reducer every collective below applies.
HLO_HEAD = """\
HloModule jit_step, entry_computation_layout={()->()}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%a, %b)
}
"""

SYNTHETIC_HLO = HLO_HEAD + """
%rs_wrapped (p: f32[64,8]) -> f32[64,2] {
  %p = f32[64,8]{1,0} parameter(0)
  ROOT %reduce-scatter.3 = f32[64,2]{1,0:T(8,128)} reduce-scatter(%p), channel_id=7, replica_groups=[2,4]<=[8], dimensions={1}, to_apply=%add
}

%body (param: (s32[], bf16[1024])) -> (s32[], bf16[1024]) {
  %param = (s32[], bf16[1024]{0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%param), index=0
  %gte.1 = bf16[1024]{0} get-tuple-element(%param), index=1
  %all-reduce.9 = bf16[1024]{0:T(1024)(128)(2,1)} all-reduce(%gte.1), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  ROOT %tuple.2 = (s32[], bf16[1024]{0}) tuple(%gte.0, %all-reduce.9)
}

%cond (param.1: (s32[], bf16[1024])) -> pred[] {
  %param.1 = (s32[], bf16[1024]{0}) parameter(0)
  %constant.5 = s32[] constant(3)
  %gte.2 = s32[] get-tuple-element(%param.1), index=0
  ROOT %lt.1 = pred[] compare(%gte.2, %constant.5), direction=LT
}

%sampler_body (q: (f32[], pred[])) -> (f32[], pred[]) {
  %q = (f32[], pred[]) parameter(0)
  %gte.3 = f32[] get-tuple-element(%q), index=0
  %all-reduce.11 = f32[]{:T(128)} all-reduce(%gte.3), channel_id=4, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, to_apply=%add
  %gte.4 = pred[] get-tuple-element(%q), index=1
  ROOT %tuple.3 = (f32[], pred[]) tuple(%all-reduce.11, %gte.4)
}

%sampler_cond (r: (f32[], pred[])) -> pred[] {
  %r = (f32[], pred[]) parameter(0)
  ROOT %gte.5 = pred[] get-tuple-element(%r), index=1
}

ENTRY %main (x: f32[128], y: bf16[8,16], z: f32[64,8]) -> f32[128] {
  %x = f32[128]{0} parameter(0)
  %y = bf16[8,16]{1,0} parameter(1)
  %z = f32[64,8]{1,0} parameter(2)
  %all-reduce.1 = (f32[128]{0:T(128)}, /*index=1*/bf16[8,16]{1,0:T(8,128)(2,1)}, f32[]{:T(128)}) all-reduce(%x, %y, %c), channel_id=1, replica_groups=[1,8]<=[8], to_apply=%add
  %all-gather-start.1 = (bf16[8,16]{1,0}, bf16[64,16]{1,0}) all-gather-start(%y), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
  %all-gather-done.1 = bf16[64,16]{1,0} all-gather-done(%all-gather-start.1)
  %collective-permute-start.1 = (f32[128]{0}, f32[128]{0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%x), channel_id=5, source_target_pairs={{0,1},{1,2}}
  %collective-permute-done.1 = f32[128]{0} collective-permute-done(%collective-permute-start.1)
  %async-start.1 = ((f32[64,8]), f32[64,2], u32[]) async-start(%z), calls=%rs_wrapped
  %async-done.1 = f32[64,2]{1,0} async-done(%async-start.1), calls=%rs_wrapped
  %all-to-all.1 = f32[64,8]{1,0} all-to-all(%z), channel_id=6, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %while.1 = (s32[], bf16[1024]{0}) while(%init), condition=%cond, body=%body
  %while.2 = (s32[], bf16[1024]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %while.3 = (f32[], pred[]) while(%init2), condition=%sampler_cond, body=%sampler_body
  ROOT %r = f32[128]{0} add(%collective-permute-done.1, %x)
}
"""


def test_hlo_collectives_async_tuple_and_loop_forms_are_each_counted_as_executed():
    cs = {c.name: c for c in parse_collectives(SYNTHETIC_HLO)}
    assert set(cs) == {
        "all-reduce.1", "all-gather-start.1", "collective-permute-start.1", "reduce-scatter.3", "all-to-all.1",
        "all-reduce.9", "all-reduce.11",
    }  # -done halves and the reducer are not collectives of their own
    tuple_ar = cs["all-reduce.1"]
    assert (tuple_ar.elements, tuple_ar.bytes, tuple_ar.group_size) == (128 + 128 + 1, 512 + 256 + 4, 8)
    gather = cs["all-gather-start.1"]
    assert (gather.kind, gather.bytes) == ("all-gather", 64 * 16 * 2)  # the gathered result, not the operand
    permute = cs["collective-permute-start.1"]
    assert (permute.kind, permute.bytes) == ("collective-permute", 512)
    rs = cs["reduce-scatter.3"]
    assert (rs.kind, rs.group_size, rs.executions) == ("reduce-scatter", 4, 1)
    assert rs.arrays[0].shape == (64, 8) and rs.bytes == 64 * 8 * 4  # the full input, scattered along dim 1
    assert cs["all-to-all.1"].group_size == 8
    # in %body: 3 runs from `i < 3` in the condition (no annotation) + 5 from known_trip_count
    loop_ar = cs["all-reduce.9"]
    assert (loop_ar.executions, loop_ar.in_unknown_loop, loop_ar.group_size) == (3 + 5, False, 4)
    sampler = cs["all-reduce.11"]
    assert (sampler.executions, sampler.in_unknown_loop, sampler.group_size) == (1, True, 4)

    kinds = summarize(cs.values(), num_devices=8)
    assert kinds["all-reduce"].count == 1 + 8 + 1
    assert kinds["all-reduce"].bytes == (512 + 256 + 4) + 8 * 2048 + 4
    # ring traffic per device: all-reduce 2(n-1)/n, all-gather (n-1)/n, permute once
    assert kinds["all-gather"].wire_bytes == pytest.approx(64 * 16 * 2 * 7 / 8)
    assert kinds["collective-permute"].wire_bytes == 512
    assert kinds["all-reduce"].dtypes == {"f32": 128 + 1 + 1, "bf16": 128 + 8 * 1024}


# The forms libtpu gives a reduce-scatter and an all-gather over a multi-dimensional slice (read off
# a compiled v5e:4x4 step): all-reduces, whose result is only dynamic-sliced / whose operand is the
# chip's shard written into zeros. Around them: a combined async all-reduce whose element 0 is
# sliced (inside a fusion, behind a VMEM copy) and element 1 is used whole, and a
# dynamic-update-slice into something that is not zeros (an update, not a gather).
DECOMPOSED_HLO = HLO_HEAD + """
%fused_slice (param_0: f32[64,8], param_1: u32[]) -> f32[4,8] {
  %param_0 = f32[64,8]{1,0} parameter(0)
  %param_1 = u32[] parameter(1)
  %bitcast.1 = f32[64,8]{1,0} bitcast(%param_0)
  %constant.0 = u32[] constant(0)
  ROOT %dynamic-slice.1 = f32[4,8]{1,0} dynamic-slice(%bitcast.1, %param_1, %constant.0), dynamic_slice_sizes={4,8}
}

%fused_gather (param_0.1: f32[4,8], param_1.1: u32[]) -> f32[64,8] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  %param_1.1 = u32[] parameter(1)
  %constant.1 = f32[] constant(0)
  %broadcast.1 = f32[64,8]{1,0} broadcast(%constant.1), dimensions={}
  %constant.2 = u32[] constant(0)
  ROOT %dynamic-update-slice.1 = f32[64,8]{1,0} dynamic-update-slice(%broadcast.1, %param_0.1, %param_1.1, %constant.2)
}

ENTRY %main (g: f32[64,8], w: f32[4,8], h: f32[16], m: f32[64,8]) -> f32[64,8] {
  %g = f32[64,8]{1,0} parameter(0)
  %w = f32[4,8]{1,0} parameter(1)
  %h = f32[16]{0} parameter(2)
  %m = f32[64,8]{1,0} parameter(3)
  %partition-id.1 = u32[] partition-id()
  %all-reduce.1 = f32[64,8]{1,0} all-reduce(%g), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}}, to_apply=%add
  %dynamic-slice.2 = f32[4,8]{1,0} dynamic-slice(%all-reduce.1, %partition-id.1, %partition-id.1), dynamic_slice_sizes={4,8}
  %fusion.1 = f32[64,8]{1,0} fusion(%w, %partition-id.1), kind=kLoop, calls=%fused_gather
  %all-reduce.2 = f32[64,8]{1,0} all-reduce(%fusion.1), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15}}, to_apply=%add
  %all-reduce-start.3 = (f32[64,8]{1,0}, f32[16]{0}) all-reduce-start(%g, %h), channel_id=3, replica_groups=[1,16]<=[16], to_apply=%add
  %all-reduce-done.3 = (f32[64,8]{1,0}, f32[16]{0}) all-reduce-done(%all-reduce-start.3)
  %get-tuple-element.1 = f32[64,8]{1,0} get-tuple-element(%all-reduce-done.3), index=0
  %copy-start.1 = (f32[64,8]{1,0:S(1)}, f32[64,8]{1,0}, u32[]) copy-start(%get-tuple-element.1)
  %copy-done.1 = f32[64,8]{1,0:S(1)} copy-done(%copy-start.1)
  %fusion.2 = f32[4,8]{1,0} fusion(%copy-done.1, %partition-id.1), kind=kLoop, calls=%fused_slice
  %get-tuple-element.2 = f32[16]{0} get-tuple-element(%all-reduce-done.3), index=1
  %negate.1 = f32[16]{0} negate(%get-tuple-element.2)
  %dynamic-update-slice.2 = f32[64,8]{1,0} dynamic-update-slice(%m, %w, %partition-id.1, %partition-id.1)
  %all-reduce.4 = f32[64,8]{1,0} all-reduce(%dynamic-update-slice.2), channel_id=4, replica_groups=[1,16]<=[16], to_apply=%add
  ROOT %add.2 = f32[64,8]{1,0} add(%all-reduce.4, %all-reduce.2)
}
"""


def test_all_reduces_that_stand_for_a_reduce_scatter_or_an_all_gather_say_so():
    cs = {c.name: c for c in parse_collectives(DECOMPOSED_HLO)}
    assert {n: (c.kind, c.roles) for n, c in cs.items()} == {
        "all-reduce.1": ("all-reduce", ("scatter",)),  # the result only dynamic-sliced
        "all-reduce.2": ("all-reduce", ("gather",)),  # the shard written into zeros, then summed
        "all-reduce-start.3": ("all-reduce", ("scatter", "")),  # per element of a combined one
        "all-reduce.4": ("all-reduce", ("",)),  # written into live data: a real sum
    }
    kinds = summarize(cs.values(), num_devices=16)  # the wire still carries all-reduces
    assert set(kinds) == {"all-reduce"} and kinds["all-reduce"].elements == 4 * 64 * 8 + 16


def test_fsdp_check_counts_the_all_reduce_forms_as_what_they_stand_for():
    """Sharded w (64 x 8) and replicated b (16): a reduce-scatter written as all-reduce + slice
    passes; the same gradient all-reduced and kept whole fails as replicated gradients."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))  # conftest's 8 CPU devices
    shardings = {"w": NamedSharding(mesh, PartitionSpec("data")), "b": NamedSharding(mesh, PartitionSpec())}
    shapes = {"w": (64, 8), "b": (16,)}

    def collective(name, roles, arrays=((64, 8), (16,))):
        return Collective("all-reduce", name, "main", tuple(Array("f32", a) for a in arrays), 16, 1, False, roles)

    scattered = [collective("ar", ("scatter", "")), Collective(
        "all-gather", "ag", "main", (Array("f32", (64, 8)),), 16, 1, False)]  # fmt: skip
    check = check_collectives(scattered, shapes, shardings, 4)
    assert check.ok, check
    assert "512 elements are reduce-scatters written as all-reduce + dynamic-slice" in check.found
    assert "reduce-scatters 512 elements" in " ".join(check.findings)
    replicated = [collective("ar", ("", "")), scattered[1]]
    check = check_collectives(replicated, shapes, shardings, 4)
    assert not check.ok and "replicated gradients" in " ".join(check.findings), check


# ---------------------------------------------------------------------------------------------
# Largest batch search (each probe stands for a compile)
# ---------------------------------------------------------------------------------------------


def memory_model(fixed: float, per_example: float, limit: float, calls: list[int]):
    def fits_at(b: int) -> tuple[bool, int]:
        calls.append(b)
        used = fixed + per_example * b
        return used <= limit, int(used)

    return fits_at


@pytest.mark.parametrize("start", [1, 16, 300, 301, 4096])
def test_batch_search_finds_the_largest_fitting_batch_in_few_compiles(start):
    calls: list[int] = []
    limit = 16 * GiB  # fits up to (16 GiB - 1 GiB) / 50 MiB = 307 per chip
    result = search_largest_batch(memory_model(GiB, 50 * 2**20, limit, calls), start, limit)
    largest = 307
    assert result.largest_fitting <= largest < result.smallest_not_fitting
    assert result.largest_fitting >= largest * (1 - 1 / 16)  # within the search's precision
    assert len(calls) <= 6, calls
    assert [b for b, _, _ in result.tried] == sorted(set(calls))


def test_batch_search_reports_nothing_fits_and_stops_at_its_limit():
    none_fit = search_largest_batch(memory_model(20 * GiB, 2**20, 16 * GiB, []), 16, 16 * GiB)
    assert none_fit.largest_fitting is None and none_fit.smallest_not_fitting == 1
    all_fit = search_largest_batch(memory_model(GiB, 1, 16 * GiB, []), 16, 16 * GiB, max_batch=4096)
    assert all_fit.largest_fitting == 4096 and all_fit.smallest_not_fitting is None
