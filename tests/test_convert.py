"""Converter: every file format and layout, strict errors, atomic output, the CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_torch_safetensors

import mambaout_jax
from conftest import ROOT
from mambaout_jax.convert import CheckpointError, convert_state_dict, export_timm_safetensors, load_weights
from mambaout_jax.convert.verify import compare_logits, flax_forward, timm_forward
from mambaout_jax.models import get_params
from timm.models.mambaout import checkpoint_filter_fn
from torch_reference import random_timm_model, randomize_, state_dict_numpy, timm_to_authors

NAME = "test_mambaout"


@pytest.fixture(scope="module")
def reference():
    """A timm test_mambaout with every parameter random, and a batch to run it on."""
    tm = random_timm_model(NAME, seed=7)
    x = np.random.default_rng(0).standard_normal((2, 96, 96, 3), dtype=np.float32)
    return tm, x, timm_forward(tm, x)


def _torch_sd(tm, layout: str) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    return timm_to_authors(sd) if layout == "authors" else sd


def _write(path, sd, fmt: str, wrapped: bool):
    if fmt == "safetensors":
        save_torch_safetensors({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"model": sd, "epoch": 300} if wrapped else sd, str(path))
    return path


def test_authors_renaming_equals_timm_checkpoint_filter_fn(reference):
    tm, _, _ = reference
    authors = timm_to_authors(state_dict_numpy(tm))
    assert "downsample_layers.0.conv1.weight" in authors and "head.fc2.weight" in authors
    from mambaout_jax.convert import authors_to_timm

    ours = authors_to_timm(authors)
    theirs = checkpoint_filter_fn(dict(authors), None)
    assert sorted(ours) == sorted(theirs) == sorted(tm.state_dict())


@pytest.mark.parametrize(
    "layout,fmt,wrapped",
    [
        ("timm", "pth", False),
        ("timm", "pth", True),
        ("authors", "pth", False),
        ("authors", "pth", True),
        ("timm", "safetensors", False),
        ("authors", "safetensors", False),
        ("timm", "bin", False),
    ],
)
def test_create_model_loads_every_layout_and_format(tmp_path, reference, layout, fmt, wrapped):
    tm, x, ref = reference
    path = _write(tmp_path / f"weights.{fmt}", _torch_sd(tm, layout), fmt, wrapped)
    model = mambaout_jax.create_model(NAME, pretrained=path)
    result = compare_logits(ref, flax_forward(model, x))
    assert result["rel_err"] <= 2e-5, result


def test_variant_is_recognised_from_shapes(tmp_path, reference):
    tm, _, _ = reference
    path = _write(tmp_path / "w.pth", _torch_sd(tm, "authors"), "pth", True)
    loaded = load_weights(path)
    name, num_classes = loaded.model, loaded.num_classes
    assert (name, num_classes) == (NAME, 1000)


def test_flax_timm_flax_round_trip_is_bit_exact(tmp_path):
    model = mambaout_jax.create_model("mambaout_small_rw", seed=3)
    params = {k: np.asarray(v) for k, v in get_params(model).items()}
    export_timm_safetensors(tmp_path / "timm.safetensors", params, model="mambaout_small_rw")

    import timm
    from safetensors.torch import load_file

    tm = timm.create_model("mambaout_small_rw", pretrained=False)
    tm.load_state_dict(load_file(str(tmp_path / "timm.safetensors")), strict=True)
    torch.save(tm.state_dict(), str(tmp_path / "back.pth"))
    loaded = load_weights(tmp_path / "back.pth")
    name, back = loaded.model, loaded.params
    assert name == "mambaout_small_rw"
    assert sorted(back) == sorted(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and np.array_equal(back[k], params[k]), k


def test_project_weight_file_round_trips(tmp_path, reference):
    tm, x, ref = reference
    _, nc, params = convert_state_dict(state_dict_numpy(tm))
    mambaout_jax.convert.save_flax_weights(tmp_path / "ours.safetensors", params, model=NAME, num_classes=nc)
    model = mambaout_jax.create_model(NAME, pretrained=tmp_path / "ours.safetensors")
    for k, v in get_params(model).items():
        assert np.array_equal(np.asarray(v), params[k]), k
    assert compare_logits(ref, flax_forward(model, x))["rel_err"] <= 2e-5


# ---- bad input -------------------------------------------------------------------------------


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="notes.pth.*neither a PyTorch checkpoint"):
        load_weights(bad)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_weights(tmp_path / "nope.pth")


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_truncated_file(tmp_path, reference, fmt):
    tm, _, _ = reference
    path = _write(tmp_path / f"w.{fmt}", _torch_sd(tm, "timm"), fmt, False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.%s.*(truncated|not a readable)" % fmt):
        load_weights(path)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, str(path))
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_weights(path)


def test_wrong_variant_names_mismatched_keys_and_shapes(tmp_path):
    tm = random_timm_model("mambaout_femto")
    path = _write(tmp_path / "femto.pth", _torch_sd(tm, "timm"), "pth", False)
    with pytest.raises(CheckpointError) as err:
        mambaout_jax.create_model("mambaout_kobe", pretrained=path)
    msg = str(err.value)
    assert "does not match mambaout_kobe" in msg
    # kobe has 15 blocks in stage 2 where femto has 9: 6 blocks x 8 tensors are missing.
    assert "missing from the checkpoint (48): stages.2.blocks.10.conv.bias" in msg
    assert "those of mambaout_femto" in msg
    with pytest.raises(CheckpointError, match=r"shape mismatch \(171\).*stages\.0\.blocks\.0\.fc1\.weight: checkpoint \(256, 48\) vs model \(512, 96\)"):
        mambaout_jax.create_model("mambaout_tiny", pretrained=path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, reference):
    tm, _, _ = reference
    sd = _torch_sd(tm, "timm")
    del sd["stages.2.blocks.1.conv.bias"]
    sd["stages.2.blocks.1.extra.weight"] = torch.zeros(3)
    path = _write(tmp_path / "w.pth", sd, "pth", False)
    with pytest.raises(CheckpointError) as err:
        load_weights(path, model=NAME)
    msg = str(err.value)
    assert "missing from the checkpoint (1): stages.2.blocks.1.conv.bias" in msg
    assert "unexpected in the checkpoint (1): stages.2.blocks.1.extra.weight" in msg


def test_unrecognised_architecture_says_so(tmp_path, reference):
    tm, _, _ = reference
    sd = _torch_sd(tm, "timm")
    del sd["stages.2.blocks.1.conv.bias"]
    with pytest.raises(CheckpointError, match="(?s)no registered MambaOut variant.*closest variant test_mambaout differs.*stages.2.blocks.1.conv.bias"):
        load_weights(_write(tmp_path / "w.pth", sd, "pth", False))


def test_class_count_mismatch_says_how_to_load(tmp_path):
    tm = random_timm_model(NAME, num_classes=11821)
    path = _write(tmp_path / "in12k.pth", _torch_sd(tm, "timm"), "pth", False)
    with pytest.raises(CheckpointError, match=r"11821 classes.*num_classes=1000 was asked.*num_classes=11821"):
        mambaout_jax.create_model(NAME, pretrained=path, num_classes=1000)
    assert mambaout_jax.create_model(NAME, pretrained=path).num_classes == 11821
    backbone = mambaout_jax.create_model(NAME, pretrained=path, num_classes=0)
    assert backbone.head.fc is None


# ---- the CLI ---------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "convert_torch_weights.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def test_cli_converts_verifies_and_exports(tmp_path, reference):
    tm, x, ref = reference
    src = _write(tmp_path / "authors.pth", _torch_sd(tm, "authors"), "pth", True)
    out = tmp_path / "flax.safetensors"
    r = _cli(src, out, "--verify", "--verify-size", "96")
    assert r.returncode == 0, r.stderr
    assert '"rel_err"' in r.stdout and out.exists()
    back = tmp_path / "timm.safetensors"
    r = _cli(out, back, "--to-timm")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    tm2 = random_timm_model(NAME, seed=99)
    tm2.load_state_dict(load_file(str(back)), strict=True)
    assert np.array_equal(timm_forward(tm2, x), ref)


def test_cli_bad_input_exits_nonzero_and_leaves_existing_output_untouched(tmp_path, reference):
    tm, _, _ = reference
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous good output")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    r = _cli(bad, out)
    assert r.returncode != 0
    assert "bad.pth" in r.stderr and "Traceback" not in r.stderr
    assert out.read_bytes() == b"previous good output"
    fresh = tmp_path / "fresh.safetensors"
    r = _cli(_write(tmp_path / "femto.pth", _torch_sd(tm, "timm"), "pth", False), fresh, "--model", "mambaout_femto")
    assert r.returncode != 0 and "does not match mambaout_femto" in r.stderr
    assert not fresh.exists() and not list(tmp_path.glob(".fresh*"))


def test_cli_verify_failure_writes_nothing(tmp_path, reference):
    """A tolerance no fp32 computation can meet must fail verification and write no file."""
    tm, _, _ = reference
    src = _write(tmp_path / "w.pth", _torch_sd(tm, "timm"), "pth", False)
    out = tmp_path / "out.safetensors"
    r = _cli(src, out, "--verify", "--verify-size", "64", "--tolerance", "0")
    assert r.returncode == 1 and "exceeds" in r.stderr
    assert not out.exists()


# ---- timm training checkpoints (CheckpointSaver) ------------------------------------------------


def _optimizer_after_one_step(tm):
    opt = torch.optim.AdamW(tm.parameters(), lr=1e-3)
    tm(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    opt.zero_grad()
    return opt


def _training_args(**extra) -> argparse.Namespace:
    """What timm's train.py pickles as ``args``: its parsed flags plus the fields main() sets."""
    return argparse.Namespace(
        model=NAME, lr=4e-3, opt="adamw", opt_betas=None, weight_decay=0.05, model_ema=True, model_ema_decay=0.9999,
        input_size=None, mean=None, std=None, crop_pct=None, aa="rand-m9-mstd0.5-inc1", model_kwargs={},
        prefetcher=True, distributed=False, device="cuda:0", world_size=1, rank=0, native_amp=True, **extra,
    )  # fmt: skip


def _ema_model(tm, seed: int):
    """An EMA copy whose weights differ from the raw model's (as after training), via timm's ModelEmaV3."""
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(tm, decay=0.9)
    randomize_(ema.module, seed)
    return ema


@pytest.fixture(scope="module")
def saver_checkpoints(tmp_path_factory, reference):
    """model_best / last / checkpoint-0 of timm 1.0.31's CheckpointSaver (with EMA, AMP scaler, args, metric),
    and the same dict written the way timm 0.6.11's saver (the authors' train.py) does."""
    from timm.utils import CheckpointSaver, NativeScaler

    tm, x, _ = reference
    ema = _ema_model(tm, seed=11)
    out = tmp_path_factory.mktemp("timm_saver")
    opt = _optimizer_after_one_step(random_timm_model(NAME, seed=7))
    saver = CheckpointSaver(
        tm, opt, args=_training_args(), model_ema=ema, amp_scaler=NativeScaler(device="cpu"),
        checkpoint_dir=str(out), recovery_dir=str(out), decreasing=False, max_history=2,
    )  # fmt: skip
    saver.save_checkpoint(0, metric=71.5)
    # timm 0.6.11 timm/utils/checkpoint_saver.py _save: the same entries; 'amp_scaler' from the authors'
    # NativeScalerAccum (utils.py, state_dict_key "amp_scaler"), and a DDP-wrapped model's 'module.' keys
    # as saved without unwrap_fn.
    legacy = out / "legacy_model_best.pth.tar"
    torch.save(
        {
            "epoch": 299, "arch": NAME, "version": 2, "args": _training_args(),
            "state_dict": {f"module.{k}": v for k, v in tm.state_dict().items()},
            "optimizer": opt.state_dict(), "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                         "growth_interval": 2000, "_growth_tracker": 0},
            "state_dict_ema": ema.module.state_dict(), "metric": 78.9,
        },
        str(legacy),
    )  # fmt: skip
    ema_logits = timm_forward(ema.module.eval(), x)
    return out, legacy, ema_logits


@pytest.mark.parametrize("name", ["model_best.pth.tar", "last.pth.tar", "checkpoint-0.pth.tar", "legacy_model_best.pth.tar"])
def test_timm_training_checkpoints_load_either_weight_set(saver_checkpoints, reference, name):
    tm, x, ref = reference
    out, _, ema_logits = saver_checkpoints
    path = out / name
    with pytest.raises(Exception, match="argparse.Namespace"):  # not a plain weights file: args are pickled
        torch.load(str(path), weights_only=True)
    default = load_weights(path)
    assert default.weight_set == "state_dict"  # timm's validate.py: load_checkpoint(use_ema=False)
    assert load_weights(path, ema=False).weight_set == "state_dict"
    averaged = load_weights(path, ema=True)
    assert averaged.weight_set == "state_dict_ema"
    for loaded, expected in ((default, ref), (averaged, ema_logits)):
        model = mambaout_jax.models.model_from_params(loaded.model, loaded.params, num_classes=loaded.num_classes)
        assert compare_logits(expected, flax_forward(model, x))["rel_err"] <= 2e-5
    assert compare_logits(ref, ema_logits)["rel_err"] > 1e-2  # the two sets really differ
    model = mambaout_jax.create_model(NAME, pretrained=path, ema=True)
    assert compare_logits(ema_logits, flax_forward(model, x))["rel_err"] <= 2e-5


def test_only_exactly_argparse_namespace_is_allowed(tmp_path, reference):
    """The training-checkpoint allowance is one global; any other class in the file is still refused."""
    import collections

    tm, _, _ = reference
    path = tmp_path / "other.pth.tar"
    Point = collections.namedtuple("Point", "x y")  # noqa: PYI024
    globals()["Point"] = Point  # picklable by reference, as a user class in a training script would be
    torch.save({"state_dict": tm.state_dict(), "args": _training_args(), "extra": Point(1, 2)}, str(path))
    with pytest.raises(CheckpointError, match=r"refused to unpickle.*Unsupported global: GLOBAL test_convert\.Point"):
        load_weights(path)


def test_a_file_with_one_weight_set(tmp_path, reference, saver_checkpoints):
    tm, x, ref = reference
    _, _, ema_logits = saver_checkpoints
    only_ema = tmp_path / "only_ema.pth.tar"
    torch.save({"epoch": 3, "args": _training_args(), "state_dict_ema": tm.state_dict()}, str(only_ema))
    assert load_weights(only_ema).weight_set == "state_dict_ema"  # the only set there is
    with pytest.raises(CheckpointError, match=r"only_ema.pth.tar: has only EMA weights.*found: 'epoch', 'args', 'state_dict_ema'"):
        load_weights(only_ema, ema=False)
    only_raw = _write(tmp_path / "raw.pth", _torch_sd(tm, "timm"), "pth", True)
    with pytest.raises(CheckpointError, match=r"raw.pth: has no EMA weights.*found: 'model', 'epoch'"):
        load_weights(only_raw, ema=True)
    bare = _write(tmp_path / "bare.safetensors", _torch_sd(tm, "timm"), "safetensors", False)
    with pytest.raises(CheckpointError, match="bare.safetensors: a safetensors file holds one weight set"):
        load_weights(bare, ema=True)
    no_weights = tmp_path / "no_weights.pth.tar"
    torch.save({"epoch": 3, "args": _training_args(), "metric": 1.0}, str(no_weights))
    with pytest.raises(CheckpointError, match=r"no_weights.pth.tar: .*not a state_dict.*top-level keys found: 'epoch', 'args', 'metric'"):
        load_weights(no_weights)


def test_cli_ema_flag_converts_the_chosen_set(tmp_path, reference, saver_checkpoints):
    tm, x, ref = reference
    out_dir, legacy, ema_logits = saver_checkpoints
    for flag, expected, name in (("--ema", ema_logits, "state_dict_ema"), ("--no-ema", ref, "state_dict"), (None, ref, "state_dict")):
        out = tmp_path / f"{flag}.safetensors"
        r = _cli(legacy, out, *([flag] if flag else []))
        assert r.returncode == 0, r.stderr
        assert f"weight set: {name}" in r.stdout
        model = mambaout_jax.create_model(NAME, pretrained=out)
        assert compare_logits(expected, flax_forward(model, x))["rel_err"] <= 2e-5
    r = _cli(_write(tmp_path / "raw.pth", _torch_sd(tm, "timm"), "pth", False), tmp_path / "x.safetensors", "--ema")
    assert r.returncode == 2 and "no EMA weights" in r.stderr and "Traceback" not in r.stderr


def test_eval_py_evaluates_either_weight_set_of_a_training_checkpoint(tmp_path, saver_checkpoints):
    """The timm-0.6.11-layout model_best.pth.tar with EMA through eval.py: --ema evaluates exactly the EMA
    weights (the same numbers as their converted file), the default the raw ones."""
    _, legacy, _ = saver_checkpoints
    assert _cli(legacy, tmp_path / "ema.safetensors", "--ema").returncode == 0

    def evaluate(*args):
        r = subprocess.run(
            [sys.executable, str(ROOT / "eval.py"), "--source", "digits", "--batch-size", "64", *map(str, args)],
            capture_output=True, text=True, cwd=ROOT, timeout=600,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr

    ema, ema_err = evaluate("--weights", legacy, "--ema")
    raw, raw_err = evaluate("--weights", legacy)
    converted, _ = evaluate("--weights", tmp_path / "ema.safetensors")
    assert (ema["weight_set"], raw["weight_set"]) == ("state_dict_ema", "state_dict")
    assert "weight set: state_dict_ema" in ema_err and "weight set: state_dict" in raw_err
    assert ema["loss"] == converted["loss"] and ema["top1"] == converted["top1"]
    assert ema["loss"] != raw["loss"]
