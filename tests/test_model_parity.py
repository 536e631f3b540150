"""The Flax model computes timm's function: every variant, every parameter randomised, fp32."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REFERENCE_DEVICE
from mambaout_jax.convert import convert_state_dict
from mambaout_jax.convert.verify import compare_logits, flax_forward, timm_forward
from mambaout_jax.models import list_models, model_from_params
from torch_reference import random_timm_model, state_dict_numpy

# max |diff| / max |reference| on fp32 logits and features; a correct port lands near 1e-6.
REL_TOL = 2e-5


def _models_pair(name, num_classes=1000, dw_conv_impl="auto", seed=0):
    tm = random_timm_model(name, num_classes=num_classes, seed=seed, device=REFERENCE_DEVICE)
    found, nc, params = convert_state_dict(state_dict_numpy(tm))
    assert (found, nc) == (name, num_classes)
    return tm, model_from_params(name, params, num_classes=nc, dw_conv_impl=dw_conv_impl)


def _images(batch, size, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3), dtype=np.float32)


@pytest.mark.parametrize("ref", [REFERENCE_DEVICE], ids=lambda d: f"ref={d}")
@pytest.mark.parametrize("name", list_models())
def test_logits_and_stage_features_match_timm(name, ref):
    tm, fm = _models_pair(name)
    x = _images(2, 64)
    logits = compare_logits(timm_forward(tm, x), flax_forward(fm, x))
    assert logits["rel_err"] <= REL_TOL, logits
    assert logits["top1_agreement"] == 1.0
    ref_feats, feats = timm_forward(tm, x, features=True), flax_forward(fm, x, features=True)
    assert [f.shape for f in feats] == [f.shape for f in ref_feats]
    assert [f.shape[1] for f in feats] == [64 // s for s in (4, 8, 16, 32)]
    for r, f in zip(ref_feats, feats):
        err = compare_logits(r, f)["rel_err"]
        assert err <= REL_TOL, err


@pytest.mark.parametrize("ref", [REFERENCE_DEVICE], ids=lambda d: f"ref={d}")
@pytest.mark.parametrize("dw_conv_impl", ["grouped", "shift"])
def test_femto_at_224_matches_timm_with_each_depthwise_form(dw_conv_impl, ref):
    tm, fm = _models_pair("mambaout_femto", dw_conv_impl=dw_conv_impl, seed=3)
    x = _images(4, 224, seed=1)
    result = compare_logits(timm_forward(tm, x), flax_forward(fm, x))
    assert result["rel_err"] <= REL_TOL, result
    assert result["top1_agreement"] == 1.0


@pytest.mark.parametrize("ref", [REFERENCE_DEVICE], ids=lambda d: f"ref={d}")
@pytest.mark.parametrize("name", ["mambaout_femto", "mambaout_small_rw"])
def test_without_classifier_returns_timm_pre_logits(name, ref):
    tm, fm = _models_pair(name, num_classes=0)
    x = _images(2, 64)
    out = flax_forward(fm, x)
    assert out.shape == (2, 4 * fm.config.dims[-1])
    assert compare_logits(timm_forward(tm, x), out)["rel_err"] <= REL_TOL


@pytest.mark.parametrize("ref", [REFERENCE_DEVICE], ids=lambda d: f"ref={d}")
def test_odd_input_size_matches_timm(ref):
    """Stride-2 convs on odd sizes are where 'SAME' vs symmetric padding would show."""
    tm, fm = _models_pair("test_mambaout")
    x = _images(2, 77)
    assert compare_logits(timm_forward(tm, x), flax_forward(fm, x))["rel_err"] <= REL_TOL
