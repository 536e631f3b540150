"""The training step in-process: sharding, accumulation, optimizer and schedule against PyTorch."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from configs import digits
from mambaout_jax.models import get_params
from mambaout_jax.convert import convert_state_dict
from mambaout_jax.train import mesh as mesh_lib
from mambaout_jax.train.optim import decay_mask, lr_schedule
from mambaout_jax.train.program import build_program
from mambaout_jax.train.recipe import ConfigError
from torch_reference import random_timm_model, state_dict_numpy

# Sharded vs single-device and accumulated vs whole-batch steps differ only in the order of fp32
# reductions (per-device partial sums, micro-batch sums): losses and parameters agree to this
# relative error. These comparisons use Adam with eps=1: Adam divides each element's update by
# its own |gradient|, so with the recipe's eps=1e-8 an element whose gradient is ~0 moves by up to
# lr in a direction decided by rounding noise; a large eps keeps the update proportional to the
# gradient, so the test sees the arithmetic of the step and not that amplification.
REDUCTION_ORDER_RTOL = 1e-5


def no_aug_config(**overrides):
    """The digits config with every random augmentation off, so only the arithmetic differs."""
    c = digits.get_config()
    c.unlock()
    for k in ("mixup_alpha", "cutmix_alpha", "erase_prob"):
        c.aug[k] = 0.0
    c.aug.label_smoothing = 0.1
    c.batch_size = 16
    c.warmup_epochs = 0
    c.lr = 1e-3
    c.eps = 1.0
    for k, v in overrides.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def random_batch(n, size=32, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, (n,), dtype=np.int32),
    }


def initial_params(config, seed=0):
    from mambaout_jax import create_model

    return {k: np.asarray(v) for k, v in get_params(create_model(config.model, num_classes=config.num_classes, seed=seed)).items()}


def train_steps(config, devices, params, batches):
    """The compiled train step on a mesh of ``devices``, one call per batch: (state, losses, program)."""
    mesh = mesh_lib.make_mesh(devices)
    program = build_program(config, mesh, steps_per_epoch=10)
    state = program.init_state(params)
    losses = []
    for b in batches:
        state, metrics = program.train_step(state, mesh_lib.global_batch(b, mesh))
        losses.append(float(metrics["loss"]))
    return state, losses, program


def run_steps(config, devices, params, batches):
    state, losses, program = train_steps(config, devices, params, batches)
    return jax.device_get(state.params), losses, program


def assert_params_close(a, b, rtol):
    assert sorted(a) == sorted(b)
    for k in a:
        scale = max(float(np.abs(a[k]).max()), 1e-6)
        err = float(np.abs(a[k] - b[k]).max()) / scale
        assert err <= rtol, (k, err)


def test_sharded_step_equals_single_device_step():
    assert len(jax.devices()) == 8
    config = no_aug_config()
    params = initial_params(config)
    batches = [random_batch(16, seed=s) for s in range(2)]
    p8, l8, program = run_steps(config, jax.devices(), params, batches)
    p1, l1, _ = run_steps(config, jax.devices()[:1], params, batches)
    # The batch really is split: each device holds 2 of the 16 examples.
    batch = mesh_lib.global_batch(batches[0], program.mesh)
    assert {s.data.shape[0] for s in batch["image"].addressable_shards} == {2}
    np.testing.assert_allclose(l8, l1, rtol=REDUCTION_ORDER_RTOL)
    assert_params_close(p8, p1, REDUCTION_ORDER_RTOL)


def test_gradient_accumulation_equals_one_big_batch():
    params = initial_params(no_aug_config())
    batch = [random_batch(32, seed=3)]
    accumulated, la, _ = run_steps(no_aug_config(batch_size=32, grad_accum_steps=4), jax.devices(), params, batch)
    whole, lw, _ = run_steps(no_aug_config(batch_size=32, grad_accum_steps=1), jax.devices(), params, batch)
    np.testing.assert_allclose(la, lw, rtol=REDUCTION_ORDER_RTOL)
    assert_params_close(accumulated, whole, REDUCTION_ORDER_RTOL)


def test_fsdp_shards_parameters_and_optimizer_state_and_computes_the_same_step():
    config = no_aug_config(sharding="fsdp")
    params = initial_params(config)
    batches = [random_batch(16, seed=5)]
    pf, lf, program = run_steps(config, jax.devices(), params, batches)
    pd, ld, _ = run_steps(no_aug_config(), jax.devices(), params, batches)
    np.testing.assert_allclose(lf, ld, rtol=REDUCTION_ORDER_RTOL)
    assert_params_close(pf, pd, REDUCTION_ORDER_RTOL)
    kernel = program.param_shardings["stages/2/blocks/0/fc1/kernel"]  # (48, 288): 288 splits over 8
    assert kernel.spec == jax.sharding.PartitionSpec(None, "data")
    assert program.param_shardings["stages/2/blocks/0/norm/scale"].spec == jax.sharding.PartitionSpec()
    # Adam's moments follow their parameter's sharding.
    moments = [
        leaf for path, leaf in jax.tree_util.tree_flatten_with_path(program.abstract_state().opt_state)[0]
        if "stages/2/blocks/0/fc1/kernel" in jax.tree_util.keystr(path)
    ]
    assert len(moments) == 2  # mu and nu
    assert all(m.sharding.spec == jax.sharding.PartitionSpec(None, "data") for m in moments)


def test_data_parallel_replicates_parameters():
    program = build_program(no_aug_config(), mesh_lib.make_mesh(), steps_per_epoch=10)
    assert all(s.spec == jax.sharding.PartitionSpec() for s in program.param_shardings.values())


def test_lr_schedule_matches_timm_per_epoch():
    from timm.scheduler import create_scheduler_v2

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-3)
    sched, num_epochs = create_scheduler_v2(
        opt, sched="cosine", num_epochs=300, warmup_epochs=20, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=10
    )
    assert num_epochs == 310
    ours = lr_schedule(base_lr=4e-3, epochs=300, warmup_epochs=20, warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=10,
                       steps_per_epoch=7)  # fmt: skip
    for epoch in range(num_epochs):
        sched.step(epoch)
        expected = opt.param_groups[0]["lr"]
        for step in (7 * epoch, 7 * epoch + 6):  # constant within the epoch
            assert float(ours(step)) == pytest.approx(expected, rel=1e-6), epoch


def test_weight_decay_mask_matches_timm_param_groups():
    from timm.optim import param_groups_weight_decay

    tm = random_timm_model("mambaout_small_rw")
    groups = param_groups_weight_decay(tm, weight_decay=0.05)
    decayed_ids = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    torch_decay = {name: id(p) in decayed_ids for name, p in tm.named_parameters()}
    _, _, params = convert_state_dict(state_dict_numpy(tm))
    from mambaout_jax.convert.mapping import flax_to_torch

    for mask in (decay_mask(params), decay_mask({k: v.shape for k, v in params.items()})):
        ours = {torch_key: mask[path] for path, torch_key in zip(params, flax_to_torch(params))}
        assert ours == torch_decay
    assert not ours["stages.2.blocks.0.ls.gamma"] and ours["stages.2.blocks.0.fc1.weight"]


def test_one_adamw_step_matches_pytorch_timm():
    """From identical weights and batch, one AdamW step in JAX and in PyTorch give the same weights.

    Stated tolerance: the first Adam step moves each weight by lr * g / (|g| + eps) (plus the
    decoupled decay), i.e. by ~lr whatever |g|. Where |g| is far above fp32 rounding noise the two
    frameworks agree to 1e-7 + 2.4e-7 |w| (2.5e-5 of lr plus two fp32 ulps of the weight); where |g|
    is small (below 1e-3 of the tensor's largest gradient), eps / |g|^2 amplifies the gradients'
    rounding differences and the direction can even be decided by noise, so those elements are only
    bounded by 2 lr, and there must be few of them.
    """
    name, lr, wd = "test_mambaout", 4e-3, 0.05
    tm = random_timm_model(name, num_classes=10, seed=11)
    _, _, params = convert_state_dict(state_dict_numpy(tm))
    batch = random_batch(8, size=32, seed=1)
    config = no_aug_config(batch_size=8, lr=lr, weight_decay=wd, eps=1e-8, **{"aug.label_smoothing": 0.1})

    # JAX: the project's train step (normalisation inside, soft targets with smoothing 0.1).
    p_jax, losses, _ = run_steps(config, jax.devices()[:1], params, [batch])

    # PyTorch: timm model, the same normalisation and targets, torch.optim.AdamW with timm's groups.
    from timm.optim import param_groups_weight_decay

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((batch["image"] / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    targets = np.full((8, 10), 0.1 / 10, np.float32)
    targets[np.arange(8), batch["label"]] += 0.9
    opt = torch.optim.AdamW(param_groups_weight_decay(tm, wd), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    tm.train()
    loss = torch.sum(-torch.from_numpy(targets) * torch.log_softmax(tm(torch.from_numpy(x)), -1), -1).mean()
    loss.backward()
    grads = {k: p.grad.numpy().copy() for k, p in tm.named_parameters()}
    opt.step()
    assert losses[0] == pytest.approx(loss.item(), rel=1e-5)
    from mambaout_jax.convert.mapping import flax_to_torch

    torch_after = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    ours_after = flax_to_torch(p_jax)
    outside = total = 0
    for k, g in grads.items():
        diff = np.abs(torch_after[k] - ours_after[k])
        # Zero gradients (e.g. 7x7 taps that only see padding at 1x1 resolution) leave decay only.
        clear = (np.abs(g) > 1e-3 * np.abs(g).max()) | (g == 0)
        bound = 1e-7 + 2.4e-7 * np.abs(torch_after[k])
        assert np.all(diff[clear] <= bound[clear]), (k, diff[clear].max())
        assert diff.max() <= 2 * lr, k
        outside += int((diff > bound).sum())
        total += g.size
    assert outside <= 1e-3 * total, outside / total


def test_bad_batch_and_model_are_clear_errors():
    mesh = mesh_lib.make_mesh()
    with pytest.raises(mesh_lib.ShardingConfigError, match=r"global batch \(12\) must divide by the number of devices \(8\)"):
        build_program(no_aug_config(batch_size=12), mesh, steps_per_epoch=1)
    with pytest.raises(mesh_lib.ShardingConfigError, match="does not divide by grad_accum_steps 3"):
        build_program(no_aug_config(batch_size=16, grad_accum_steps=3), mesh, steps_per_epoch=1)
    with pytest.raises(ValueError, match="unknown model 'mambaout_giant'"):
        build_program(no_aug_config(model="mambaout_giant"), mesh, steps_per_epoch=1)
    with pytest.raises(ConfigError, match="compute_dtype"):
        build_program(no_aug_config(compute_dtype="fp8"), mesh, steps_per_epoch=1)
    with pytest.raises(mesh_lib.ShardingConfigError, match="unknown sharding preset 'zero9'"):
        build_program(no_aug_config(sharding="zero9"), mesh, steps_per_epoch=1)


def test_nonfinite_step_keeps_the_previous_state():
    config = no_aug_config(lr=1e30)
    params = initial_params(config)
    mesh = mesh_lib.make_mesh()
    program = build_program(config, mesh, steps_per_epoch=10)
    state = program.init_state(params)
    metrics_seen = []
    for s in range(3):
        before = jax.device_get(state.params)
        state, metrics = program.train_step(state, mesh_lib.global_batch(random_batch(16, seed=s), mesh))
        metrics_seen.append(bool(metrics["finite"]))
        if not metrics_seen[-1]:
            after = jax.device_get(state.params)
            assert all(np.array_equal(before[k], after[k]) for k in before)
            break
    assert not all(metrics_seen), "an lr of 1e30 should have produced a non-finite step"
