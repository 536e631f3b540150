"""The parity report (python -m mambaout_jax.parity): passes on faithful weights, fails on a perturbed file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from mambaout_jax.convert import load_weights, save_flax_weights
from mambaout_jax.parity import TOLERANCES
from torch_reference import random_timm_model


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three of scikit-image's photos, one of them grayscale (PIL's convert('RGB') on both sides)."""
    import skimage.data

    folder = tmp_path_factory.mktemp("photos")
    src = Path(skimage.data.__file__).parent
    for name in ("chelsea.png", "rocket.jpg", "camera.png"):
        shutil.copy(src / name, folder / name)
    return folder


def _parity(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mambaout_jax.parity", *map(str, args)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env,
    )  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random test_mambaout as a PyTorch checkpoint, and the same weights converted to this project's file."""
    folder = tmp_path_factory.mktemp("weights")
    tm = random_timm_model("test_mambaout", seed=3)
    torch.save({"model": tm.state_dict(), "epoch": 1}, str(folder / "ref.pth"))
    loaded = load_weights(folder / "ref.pth")
    save_flax_weights(folder / "converted.safetensors", loaded.params, model=loaded.model, num_classes=loaded.num_classes)
    return folder


def test_converted_file_against_its_source_passes_with_every_item_reported(tmp_path, checkpoint, photos):
    out = tmp_path / "report.json"
    r = _parity("--weights", checkpoint / "converted.safetensors", "--reference", checkpoint / "ref.pth",
                "--images", photos, "--json", out)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PARITY OK" in r.stdout and "pixels_differing" in r.stdout
    report = json.loads(out.read_text())
    assert report["ok"] and len(report["images"]) == 3 and report["image_size"] == 160
    assert report["pixels"] == {"differing": 0, "max_abs": 0, "total": 3 * 160 * 160 * 3}
    assert 0 < report["logits"]["rel"] <= TOLERANCES["float32"]["logits_rel"]  # computed, not skipped
    assert report["agreement"]["top1"] == 1.0 and report["agreement"]["top5"] == 1.0
    assert [f["shape"][1:] for f in report["features"]] == [[40, 40, 16], [20, 20, 32], [10, 10, 48], [5, 5, 64]]
    assert 0 < report["input_grad"]["rel"] <= 1e-4 and 0 < report["param_grad"]["rel"] <= 1e-4
    assert report["param_grad"]["tensors"] == 78
    assert report["adamw"]["outside_fraction"] <= 1e-3 and report["adamw"]["clear_over_bound"] <= 1.0
    assert {c["check"] for c in report["checks"]} >= {"logits_rel", "features_rel", "adamw_outside_fraction"}


def test_perturbed_weight_file_fails(tmp_path, checkpoint, photos):
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    src = checkpoint / "converted.safetensors"
    with safe_open(str(src), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(str(src))
    key = "stages/2/blocks/1/fc2/kernel"
    tensors[key] = tensors[key] * np.float32(1.01)  # 1% on one matrix: a subtle conversion bug
    save_file(tensors, str(tmp_path / "perturbed.safetensors"), metadata=metadata)
    out = tmp_path / "report.json"
    r = _parity("--weights", tmp_path / "perturbed.safetensors", "--reference", checkpoint / "ref.pth",
                "--images", photos, "--json", out)  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert "PARITY FAILED" in r.stdout
    report = json.loads(out.read_text())
    failed = {c["check"] for c in report["checks"] if not c["ok"]}
    assert {"logits_rel", "features_rel", "param_grad_rel"} <= failed
    assert report["pixels"]["differing"] == 0  # the preprocessing is not what failed


def test_femto_random_weights(tmp_path, photos):
    r = _parity("--random-weights", "mambaout_femto", "--images", photos, "--max-images", "2", "--json", tmp_path / "f.json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["variant"] == "mambaout_femto" and report["image_size"] == 224 and report["ok"]
    assert report["param_grad"]["tensors"] == len(random_timm_model("mambaout_femto").state_dict())


def test_bfloat16_has_its_own_tolerances(tmp_path, photos):
    r = _parity("--random-weights", "test_mambaout", "--dtype", "bfloat16", "--images", photos, "--max-images", "2",
                "--json", tmp_path / "b.json")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["dtype"] == "bfloat16" and report["pixels"]["differing"] == 0
    # bf16 really ran: its error is far above float32's bound, and within bf16's.
    assert TOLERANCES["float32"]["logits_rel"] * 10 < report["logits"]["rel"] <= TOLERANCES["bfloat16"]["logits_rel"]


def test_bad_input_and_missing_torch_exit_2(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    r = _parity("--weights", checkpoint / "ref.pth", "--images", tmp_path / "empty")
    assert r.returncode == 2 and "holds no image files" in r.stderr and "Traceback" not in r.stderr
    r = _parity("--weights", tmp_path / "nope.pth")
    assert r.returncode == 2 and "nope.pth: no such file" in r.stderr
    no_torch = "import sys, runpy; sys.modules['torch'] = None; runpy.run_module('mambaout_jax.parity', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", no_torch, "--random-weights", "test_mambaout"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and "pip install 'mambaout-jax[torch]'" in r.stderr and "Traceback" not in r.stderr
