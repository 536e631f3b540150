"""The full recipe step (mixup, cutmix, erasing, drop path) on a simulated 8-device mesh: float32
gradient reduction in the compiled HLO, and the same step on 8 devices as on one, for data
parallel and FSDP, with accumulation and chunking; EMA against timm's ModelEmaV2."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from mambaout_jax.data.batch_transforms import BatchAugmentation, augment_train_batch
from mambaout_jax.plan.collectives import parse_collectives
from mambaout_jax.train import mesh as mesh_lib
from mambaout_jax.train.program import build_program
from mambaout_jax.train.recipe import ConfigError
from mambaout_jax.train.steps import ema_update, rng_streams
from test_train_step import REDUCTION_ORDER_RTOL, assert_params_close, initial_params, no_aug_config, random_batch, train_steps


def recipe_config(**overrides):
    """Every random part of the recipe on: mixup, cutmix, erasing, drop path, label smoothing."""
    aug = {"aug.mixup_alpha": 0.8, "aug.cutmix_alpha": 1.0, "aug.erase_prob": 0.25, "aug.mix_group_size": 4}
    return no_aug_config(drop_path_rate=0.3, **{**aug, **overrides})


def abstract_batch(program, n, size=32):
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=program.batch_sharding)  # noqa: E731
    return {"image": sds((n, size, size, 3), np.uint8), "label": sds((n,), np.int32)}


@pytest.mark.parametrize("sharding, dtype", [("data_parallel", "bfloat16"), ("fsdp", "bfloat16"), ("data_parallel", "float16")])
def test_gradients_are_reduced_in_float32_once_per_optimizer_step(sharding, dtype):
    """bf16/fp16 compute, 2 accumulation steps: every non-scalar all-reduce / reduce-scatter of the
    compiled step is float32, outside any loop (one per optimizer step), and together they carry
    every parameter's gradient exactly once."""
    config = recipe_config(sharding=sharding, compute_dtype=dtype, grad_accum_steps=2)
    program = build_program(config, mesh_lib.make_mesh(), steps_per_epoch=10)
    hlo = program.train_step.lower(program.abstract_state(), abstract_batch(program, 16)).compile().as_text()
    reductions = [
        c for c in parse_collectives(hlo) if c.kind in ("all-reduce", "reduce-scatter") and any(a.shape for a in c.arrays)
    ]
    assert reductions
    dtypes = {a.dtype for c in reductions for a in c.arrays if a.shape}
    assert dtypes == {"f32"}, dtypes
    assert all(c.executions == 1 and not c.in_unknown_loop for c in reductions)
    elements = sum(a.elements for c in reductions for a in c.arrays if a.shape)
    total = sum(int(np.prod(s)) for s in program.model_shapes.values())
    if sharding == "data_parallel":
        assert elements == total
    else:  # reduce-scatter operands are whole gradients; replicated ones are all-reduced
        assert abs(elements - total) <= 0.01 * total


def run(config, devices, params, batches):
    state, losses, _ = train_steps(config, devices, params, batches)
    return jax.device_get(state.params), jax.device_get(state.ema_params), losses


@pytest.fixture(scope="module")
def reference():
    """One device, no accumulation, no chunking: two recipe steps."""
    config = recipe_config(micro_batch="none", ema_decay=0.9)
    params = initial_params(config)
    batches = [random_batch(16, seed=s) for s in range(2)]
    return params, batches, run(config, jax.devices()[:1], params, batches)


@pytest.mark.parametrize(
    "devices, sharding, accum, micro",
    [(8, "data_parallel", 1, "none"), (2, "data_parallel", 2, "none"), (8, "fsdp", 2, "none"), (1, "data_parallel", 4, "2"),
     (2, "fsdp", 1, "auto")],
)  # fmt: skip
def test_full_recipe_step_on_n_devices_equals_one_device(reference, devices, sharding, accum, micro):
    """Same per-example augmentation and drop path on any split, so only the order of float32
    additions differs (per-device and per-piece partial sums): REDUCTION_ORDER_RTOL, as in
    test_train_step (Adam with eps=1 there, for the reason given there)."""
    params, batches, (p1, e1, l1) = reference
    config = recipe_config(sharding=sharding, grad_accum_steps=accum, micro_batch=micro, ema_decay=0.9)
    pn, en, ln = run(config, jax.devices()[:devices], params, batches)
    np.testing.assert_allclose(ln, l1, rtol=REDUCTION_ORDER_RTOL)
    assert_params_close(pn, p1, REDUCTION_ORDER_RTOL)
    assert_params_close(en, e1, REDUCTION_ORDER_RTOL)


def test_recipe_augmentation_really_acts_and_depends_on_the_seed(reference):
    """The comparison above is not vacuous: with the augmentation off, or another seed, the step differs."""
    params, batches, (p1, _, l1) = reference
    _, _, l_off = run(no_aug_config(micro_batch="none", ema_decay=0.9), jax.devices()[:1], params, batches[:1])
    _, _, l_seed = run(recipe_config(micro_batch="none", ema_decay=0.9, seed=7), jax.devices()[:1], params, batches[:1])
    assert abs(l_off[0] - l1[0]) > 1e-3 and abs(l_seed[0] - l1[0]) > 1e-4


def test_mix_groups_that_do_not_tile_the_micro_batch_are_a_config_error():
    mesh = mesh_lib.make_mesh(jax.devices()[:1])
    with pytest.raises(ConfigError, match="mix_group_size=128"):
        build_program(recipe_config(**{"aug.mix_group_size": 128}), mesh, steps_per_epoch=1)
    with pytest.raises(ConfigError, match=r"global micro-batch \(4 = batch_size / grad_accum_steps\)"):
        build_program(recipe_config(**{"aug.mix_group_size": 8}, grad_accum_steps=4), mesh, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="micro_batch"):
        build_program(recipe_config(micro_batch="eight"), mesh, steps_per_epoch=1)
    # Without mixing the group size does not matter.
    build_program(no_aug_config(**{"aug.mix_group_size": 128}), mesh, steps_per_epoch=1)


def test_augmentation_per_example_is_independent_of_the_split():
    """Each row's augmented image depends on the batch and key only; a micro-batch (rows j::k)
    holds whole strided groups, so augmenting the whole batch is what any split sees."""
    aug = BatchAugmentation(mix_group_size=4)
    kw = dict(num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
    b = random_batch(16)
    x, t = jax.jit(lambda k, i, l: augment_train_batch(k, i, l, aug, **kw))(jax.random.key(1), b["image"], b["label"])
    sharded = jax.jit(
        lambda k, i, l: augment_train_batch(k, i, l, aug, **kw),
        in_shardings=(None, mesh_lib.batch_sharding(mesh_lib.make_mesh()), mesh_lib.batch_sharding(mesh_lib.make_mesh())),
    )(jax.random.key(1), b["image"], b["label"])
    np.testing.assert_array_equal(sharded[0], x)
    np.testing.assert_array_equal(sharded[1], t)


def test_rng_streams_are_split_once_from_the_seed():
    init_key, train_key = rng_streams(42)
    keys = {tuple(jax.random.key_data(k).tolist()) for k in (init_key, train_key, jax.random.key(42))}
    assert len(keys) == 3
    assert jax.random.key_data(rng_streams(42)[1]).tolist() == jax.random.key_data(train_key).tolist()


def test_ema_matches_timm_model_ema_v2_over_a_sequence_of_weights():
    """timm's ModelEmaV2 (the authors' train.py: --model-ema-decay 0.9998, update after every
    optimizer step) and ema_update, fed the same weights: float32 agreement."""
    from timm.utils import ModelEmaV2

    rng = np.random.default_rng(0)
    model = torch.nn.Linear(5, 3)
    ema_t = ModelEmaV2(model, decay=0.9998)
    ema = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    for _ in range(50):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.from_numpy(rng.normal(size=p.shape).astype(np.float32)))
        ema_t.update(model)
        ema = ema_update(ema, {k: v.detach().numpy() for k, v in model.state_dict().items()}, 0.9998)
    for k, v in ema_t.module.state_dict().items():
        np.testing.assert_allclose(np.asarray(ema[k]), v.numpy(), rtol=1e-6, atol=1e-6)
    moved = {k: float(np.abs(v.numpy() - model.state_dict()[k].numpy()).max()) for k, v in ema_t.module.state_dict().items()}
    assert all(m > 1.0 for m in moved.values())  # the EMA lags the weights: the test is not trivial
