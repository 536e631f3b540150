"""Model behaviour beyond parity: sizes, compute, depthwise forms, drop path, bf16, the API."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from torch.utils.flop_counter import FlopCounterMode

import mambaout_jax
from mambaout_jax.convert import convert_state_dict
from mambaout_jax.convert.verify import flax_forward
from mambaout_jax.models import PAPER_MODELS, get_params, model_from_params
from mambaout_jax.models.layers import (
    DepthwiseConv2d,
    DropPath,
    Dropout,
    depthwise_conv_grouped,
    depthwise_conv_grouped_passthrough,
    depthwise_conv_shift,
    drop_path,
    gelu,
)
from mambaout_jax.models.mambaout import drop_path_rates
from torch_reference import random_timm_model, state_dict_numpy

# The paper's ImageNet-1k table (Yu & Wang, arXiv 2405.07992): params in M, MACs in G at 224px.
PAPER_TABLE = {
    "mambaout_femto": (7.3, 1.2),
    "mambaout_kobe": (9.1, 1.5),
    "mambaout_tiny": (26.5, 4.5),
    "mambaout_small": (48.5, 9.0),
    "mambaout_base": (84.8, 15.8),
}


@pytest.mark.parametrize("name", mambaout_jax.list_models())
def test_params_and_macs_equal_timm_count(name):
    tm = timm.create_model(name, pretrained=False).eval()
    info = mambaout_jax.model_info(name, image_size=96)
    assert info["params"] == sum(p.numel() for p in tm.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        tm(torch.zeros(1, 3, 96, 96))
    assert info["macs"] == counter.get_total_flops() // 2  # torch counts 2 FLOPs per MAC


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_paper_models_round_to_the_papers_table(name):
    info = mambaout_jax.model_info(name)
    params_m, macs_g = PAPER_TABLE[name]
    assert round(info["params"] / 1e6, 1) == params_m
    # The paper counts with fvcore (LayerNorm at 5 ops per element); see models/complexity.py.
    assert round(info["macs_fvcore"] / 1e9, 1) == macs_g


def test_conv_and_linear_macs_alone_do_not_reproduce_the_table_for_femto():
    """Documents why the fvcore convention is needed: 1.148 G would print as 1.1, not 1.2."""
    assert round(mambaout_jax.model_info("mambaout_femto")["macs"] / 1e9, 3) == 1.148


def test_model_info_has_eval_settings():
    info = mambaout_jax.model_info("mambaout_base_short_rw")
    assert info["input_size"] == 224 and info["test_input_size"] == 288
    assert info["crop_pct"] == 0.95 and info["interpolation"] == "bicubic"
    assert info["mean"] == (0.485, 0.456, 0.406) and info["std"] == (0.229, 0.224, 0.225)
    r384 = mambaout_jax.model_info("mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k")
    assert r384["input_size"] == 384 and r384["crop_mode"] == "squash"


def test_list_models_is_timms_list():
    assert sorted(mambaout_jax.list_models()) == sorted(timm.list_models("*mambaout*"))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'mambaout_huge'.*mambaout_femto"):
        mambaout_jax.create_model("mambaout_huge")


@pytest.mark.parametrize("size,channels", [(14, 5), (56, 48), (9, 128)])
def test_depthwise_forms_agree(size, channels):
    key_x, key_k = jax.random.split(jax.random.key(size))
    x = jax.random.normal(key_x, (2, size, size, channels))
    k = jax.random.normal(key_k, (7, 7, 1, channels))
    with jax.default_matmul_precision("highest"):
        a = jax.jit(depthwise_conv_grouped)(x, k)
        b = jax.jit(depthwise_conv_shift)(x, k)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(jnp.abs(a).max()))


@pytest.mark.parametrize("cpu_kernels", ["1", "0"], ids=["cpu-kernel", "xla-only"])
@pytest.mark.parametrize("size,channels", [(14, 5), (9, 128), (11, 40)])
def test_depthwise_forms_have_the_same_gradients(size, channels, cpu_kernels, monkeypatch):
    """The shift form's hand-written VJP against autodiff of XLA's grouped convolution, with its
    kernel gradient from the hand-written CPU kernel (mambaout_jax/kernels) and from XLA's fallback.
    40 channels: two blocks of 16 and a tail of 8 in the CPU kernel."""
    monkeypatch.setenv("MAMBAOUT_JAX_CPU_KERNELS", cpu_kernels)
    kx, kk, kg = jax.random.split(jax.random.key(size), 3)
    x = jax.random.normal(kx, (3, size, size, channels))
    k = jax.random.normal(kk, (7, 7, 1, channels))
    g = jax.random.normal(kg, (3, size, size, channels))

    def grads(conv):
        return jax.jit(lambda x, k: jax.vjp(conv, x, k)[1](g))(x, k)

    with jax.default_matmul_precision("highest"):
        (dx_a, dk_a), (dx_b, dk_b) = grads(depthwise_conv_grouped), grads(depthwise_conv_shift)
    np.testing.assert_allclose(np.asarray(dx_b), np.asarray(dx_a), rtol=0, atol=1e-5 * float(jnp.abs(dx_a).max()))
    np.testing.assert_allclose(np.asarray(dk_b), np.asarray(dk_a), rtol=0, atol=1e-5 * float(jnp.abs(dk_a).max()))


@pytest.mark.parametrize("size,stride,padding", [(56, 2, 1), (15, 2, 1), (9, 1, 1)])
def test_dense_conv_as_im2col_matmul_equals_xla_convolution_and_its_gradients(size, stride, padding):
    from mambaout_jax.models.layers import conv_im2col

    kx, kk, kg = jax.random.split(jax.random.key(size), 3)
    x = jax.random.normal(kx, (2, size, size, 6))
    k = jax.random.normal(kk, (3, 3, 6, 10))

    def xla(x, k):
        pad = ((padding, padding), (padding, padding))
        return jax.lax.conv_general_dilated(x, k, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def im2col(x, k):
        return conv_im2col(x, k, stride, padding)

    with jax.default_matmul_precision("highest"):
        ya, vjp_a = jax.vjp(xla, x, k)
        yb, vjp_b = jax.vjp(im2col, x, k)
        g = jax.random.normal(kg, ya.shape)
        grads_a, grads_b = vjp_a(g), vjp_b(g)
    assert ya.shape == yb.shape
    for a, b in [(ya, yb), *zip(grads_a, grads_b)]:
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * float(jnp.abs(a).max()))


def test_models_with_either_conv_forms_compute_the_same_logits():
    grouped = mambaout_jax.create_model("test_mambaout", dw_conv_impl="grouped", conv_impl="xla", seed=1)
    shift = model_from_params(
        "test_mambaout", get_params(grouped), num_classes=1000, dw_conv_impl="shift", conv_impl="im2col"
    )
    assert grouped.stages[0].blocks[0].conv.impl == "grouped" and shift.stages[0].blocks[0].conv.impl == "shift"
    assert grouped.stem.conv1.impl == "xla" and shift.stem.conv1.impl == "im2col"
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3), dtype=np.float32)
    a, b = flax_forward(grouped, x), flax_forward(shift, x)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


def test_auto_conv_forms_follow_backend():
    from mambaout_jax.models.layers import resolve_conv_impl, resolve_depthwise_impl

    assert resolve_conv_impl("auto", "cpu") == "im2col"
    assert resolve_conv_impl("auto", "tpu") == resolve_conv_impl("auto", "gpu") == "xla"
    assert resolve_depthwise_impl("auto", "cpu") == "shift"
    assert resolve_depthwise_impl("auto", "tpu") == "grouped"
    assert resolve_depthwise_impl("auto", "gpu") == "grouped"
    with pytest.raises(ValueError, match="unknown depthwise conv impl 'fft'"):
        resolve_depthwise_impl("fft")


@pytest.mark.parametrize("size,passthrough,channels", [(14, 3, 5), (9, 128, 64)])
def test_grouped_passthrough_conv_equals_slice_conv_concat_with_its_gradients(size, passthrough, channels):
    """[x[..., :p], conv(x[..., p:])] in one grouped convolution: same values, same gradients as the
    slice-convolve-concatenate it replaces (autodiff), and exactly x on the passed-through channels."""
    kx, kk, kg = jax.random.split(jax.random.key(size), 3)
    x = jax.random.normal(kx, (2, size, size, passthrough + channels))
    k = jax.random.normal(kk, (7, 7, 1, channels))
    g = jax.random.normal(kg, x.shape)

    def reference(x, k):
        return jnp.concatenate([x[..., :passthrough], depthwise_conv_grouped(x[..., passthrough:], k)], axis=-1)

    def passthrough_conv(x, k):
        return depthwise_conv_grouped_passthrough(x, k, passthrough)

    with jax.default_matmul_precision("highest"):
        (a, (dx_a, dk_a)), (b, (dx_b, dk_b)) = (
            jax.jit(lambda x, k, f=f: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, x, k)))(x, k)
            for f in (reference, passthrough_conv)
        )
    np.testing.assert_array_equal(np.asarray(b[..., :passthrough]), np.asarray(x[..., :passthrough]))
    for ours, theirs in ((b, a), (dx_b, dx_a), (dk_b, dk_a)):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=0, atol=1e-5 * float(jnp.abs(theirs).max()))


@pytest.mark.parametrize("impl", ["grouped", "shift"])
def test_depthwise_module_passthrough_in_both_forms(impl):
    conv = DepthwiseConv2d(6, impl=impl, dtype=jnp.float32, rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.arange(6, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 10))
    with jax.default_matmul_precision("highest"):
        y = conv(x, passthrough=4)
        tail = conv(x[..., 4:])
    np.testing.assert_array_equal(np.asarray(y[..., :4]), np.asarray(x[..., :4]))
    np.testing.assert_allclose(np.asarray(y[..., 4:]), np.asarray(tail), rtol=0, atol=1e-5 * float(jnp.abs(tail).max()))
    with pytest.raises(ValueError, match="expected 3 \\+ 6 channels, got 10"):
        conv(x, passthrough=3)


def test_per_sample_keys_make_drop_path_independent_of_how_the_batch_is_split():
    """One key per sample (train/steps.py folds them from the row in the global batch): each
    sample's mask depends on its key alone, so halves of a batch draw what the whole batch draws."""
    model = mambaout_jax.create_model("test_mambaout", drop_path_rate=0.5, seed=0)
    model.train()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 32, 32, 3), dtype=np.float32))
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(3), jnp.arange(6))
    whole = np.asarray(model(x, keys))
    halves = np.concatenate([np.asarray(model(x[:3], keys[:3])), np.asarray(model(x[3:], keys[3:]))])
    np.testing.assert_allclose(halves, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    other = np.asarray(model(x, jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(4), jnp.arange(6))))
    assert not np.allclose(other, whole)  # the keys do decide the draws
    with pytest.raises(ValueError, match=r"per-sample keys \(4,\) do not match a batch of 6"):
        model(x, keys[:4])


def test_drop_path_keeps_the_expected_fraction_and_scales_by_one_over_keep():
    rate, n = 0.3, 20000
    x = jnp.ones((n, 2, 2, 3))
    y = np.asarray(drop_path(x, rate, jax.random.key(0)))
    per_sample = y.reshape(n, -1)
    # Whole samples are dropped or kept, never single elements.
    assert np.all(per_sample.min(1) == per_sample.max(1))
    kept = per_sample[:, 0] != 0
    assert abs(kept.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_allclose(per_sample[kept], 1 / (1 - rate), rtol=1e-6)


def test_dropout_drops_elements_and_both_drops_need_a_key_in_train_mode():
    rate, x = 0.25, jnp.ones((64, 4, 4, 8))
    dropout, path = Dropout(rate, deterministic=False), DropPath(rate, deterministic=False)
    y = np.asarray(dropout(x, jax.random.key(0)))
    assert set(np.unique(y)) == {0.0, np.float32(1 / (1 - rate))}
    assert abs((y == 0).mean() - rate) < 0.02  # 8192 independent elements
    per_sample = y.reshape(64, -1)
    assert np.any(per_sample.min(1) != per_sample.max(1))  # element-wise, unlike drop path
    for module in (dropout, path):
        with pytest.raises(ValueError, match=f"{type(module).__name__} in train mode needs a PRNG key"):
            module(x, None)
        module.deterministic = True
        assert module(x, None) is x
    with pytest.raises(ValueError, match=r"DropPath rate must be in \[0, 1\), got 1.0"):
        DropPath(1.0)


def test_drop_path_rates_grow_linearly_like_timm():
    from timm.layers import calculate_drop_path_rates

    depths = (3, 4, 27, 3)
    ours = drop_path_rates(0.4, depths)
    theirs = calculate_drop_path_rates(0.4, list(depths), stagewise=True)
    assert ours == theirs


def test_train_mode_is_stochastic_and_eval_mode_is_not():
    model = mambaout_jax.create_model("test_mambaout", drop_path_rate=0.5, seed=0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3), dtype=np.float32))
    clean = model(x)
    np.testing.assert_array_equal(np.asarray(model(x, jax.random.key(1))), np.asarray(clean))
    model.train()
    with pytest.raises(ValueError, match="needs a PRNG key"):
        model(x)
    a, b, c = model(x, jax.random.key(1)), model(x, jax.random.key(1)), model(x, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(clean))
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(clean))


def test_bf16_compute_agrees_with_fp32_on_top1():
    tm = random_timm_model("mambaout_femto", seed=5)
    _, nc, params = convert_state_dict(state_dict_numpy(tm))
    f32 = model_from_params("mambaout_femto", params, num_classes=nc)
    bf16 = model_from_params("mambaout_femto", params, num_classes=nc, dtype=jnp.bfloat16)
    x = np.random.default_rng(0).standard_normal((64, 64, 64, 3), dtype=np.float32)
    a, b = flax_forward(f32, x), flax_forward(bf16, x)
    assert b.dtype == np.float32  # outputs are float32 whatever the compute dtype
    assert all(v.dtype == jnp.float32 for v in get_params(bf16).values())
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9
    assert np.abs(a - b).max() <= 0.1 * np.abs(a).max()


def test_stage_features_have_strides_4_8_16_32():
    model = mambaout_jax.create_model("test_mambaout")
    x = jnp.zeros((1, 128, 128, 3))
    _, feats = model.forward_intermediates(x)
    assert [f.shape for f in feats] == [
        (1, 128 // info["reduction"], 128 // info["reduction"], info["num_chs"]) for info in model.feature_info
    ]
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]


def test_parameter_paths_mirror_timm_keys():
    params = get_params(mambaout_jax.create_model("test_mambaout"))
    for path in ["stem/conv1/kernel", "stages/2/blocks/1/fc1/kernel", "stages/1/downsample/norm/scale",
                 "stages/2/blocks/0/ls/gamma", "head/pre_logits/fc/bias", "head/fc/kernel"]:
        assert path in params
    assert params["stages/2/blocks/0/ls/gamma"].shape == (48,)
    np.testing.assert_allclose(np.asarray(params["stages/2/blocks/0/ls/gamma"]), 1e-4)  # timm's init for this model


def test_compiled_forward_in_micro_batches_equals_whole_batch():
    model = mambaout_jax.create_model("test_mambaout", seed=4)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((11, 64, 64, 3), dtype=np.float32))
    whole = np.asarray(mambaout_jax.compile_forward(model, micro_batch=None)(x))
    chunked = np.asarray(mambaout_jax.compile_forward(model, micro_batch=4)(x))  # 3 chunks, last one padded
    assert chunked.shape == whole.shape == (11, 1000)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    np.testing.assert_allclose(whole, np.asarray(model(x)), rtol=0, atol=1e-5 * np.abs(whole).max())
    with pytest.raises(ValueError, match="micro_batch"):
        mambaout_jax.compile_forward(model, micro_batch=0)


def test_layer_scale_starts_at_timms_registered_values():
    """The project follows timm's registrations (ls_init_value 1e-6; test_mambaout 1e-4), the values
    the _rw weights were trained with; timm 1.0.31 itself builds LayerScale(dim) and starts at 1e-5."""
    import timm

    for name, registered in (("mambaout_small_rw", 1e-6), ("test_mambaout", 1e-4)):
        gammas = [v for k, v in get_params(mambaout_jax.create_model(name)).items() if k.endswith("ls/gamma")]
        assert gammas and all(np.all(np.asarray(g) == np.float32(registered)) for g in gammas), name
    timm_gamma = next(p for k, p in timm.create_model("test_mambaout").named_parameters() if k.endswith("ls.gamma"))
    assert float(timm_gamma.detach()[0]) == pytest.approx(1e-5)  # what timm does instead: if this changes, revisit
    assert mambaout_jax.create_model("mambaout_femto").stages[0].blocks[0].ls is None  # paper models: none


def test_gelu_is_torchs_formula_in_float32_and_erfc_in_bfloat16():
    """float32: PyTorch's x/2 (1 + erf(x/sqrt 2)) (what nn.GELU computes on CPU), value and
    gradient; bfloat16 keeps jax.nn.gelu's erfc form, which the erf form would cancel to 0 for
    negative inputs."""
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-9, 9, 4001), rng.standard_normal(4000) * 3]).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch.nn.functional.gelu(xt)
    yt.sum().backward()
    y = gelu(jnp.asarray(x))
    dx = jax.grad(lambda v: jnp.sum(gelu(v)))(jnp.asarray(x))
    # Both sides round 1 + erf(x / sqrt 2) near 1 (and near 0 for negative x, where the two erf
    # implementations' last bits are all that is left): a few ulps of max(|x|, 1), not of the result.
    bound = 4 * np.finfo(np.float32).eps * np.maximum(np.abs(x), 1)
    assert np.all(np.abs(np.asarray(y) - yt.detach().numpy()) <= bound)
    assert np.all(np.abs(np.asarray(dx) - xt.grad.numpy()) <= bound)
    assert np.all(np.abs(np.asarray(y) - np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False))) <= bound)

    xb = jnp.asarray([-5.0, -3.0, -1.0, 0.5, 2.0], jnp.bfloat16)
    yb = gelu(xb)
    assert yb.dtype == jnp.bfloat16
    reference = jax.nn.gelu(xb, approximate=False)
    np.testing.assert_array_equal(np.asarray(yb, np.float32), np.asarray(reference, np.float32))
    erf_form = xb * 0.5 * (1 + jax.lax.erf(xb * jnp.asarray(np.sqrt(0.5), jnp.bfloat16)))
    assert float(erf_form[0]) == 0.0 and float(yb[0]) < 0  # gelu(-5) = -1.4e-6: 1 + erf cancels, erfc does not
