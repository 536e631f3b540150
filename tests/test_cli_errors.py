"""Bad inputs to convert_torch_weights.py and eval.py: one clear error, a non-zero exit, nothing written."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from conftest import ROOT
from mambaout_jax.convert.torch_io import write_flax_weights
from mambaout_jax.models.factory import model_param_shapes

NAME = "test_mambaout"
TAG = "mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k"  # 384 px, squash (the base name: 224, center)


def _zeros(num_classes: int) -> dict[str, np.ndarray]:
    return {k: np.zeros(s, np.float32) for k, s in model_param_shapes(NAME, num_classes).items()}


# ---- convert_torch_weights.py -----------------------------------------------------------------


def _convert(*args, prelude: str = ""):
    """Run the converter CLI in a fresh interpreter (``prelude`` runs first, e.g. to hide a module)."""
    code = (
        f"{prelude}\nimport runpy, sys\n"
        f"sys.argv = ['convert_torch_weights.py', *{[str(a) for a in args]!r}]\n"
        f"runpy.run_path({str(ROOT / 'convert_torch_weights.py')!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def _assert_clean_failure(r, out, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: "), r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def _not_mambaout_safetensors(path):
    save_file({"conv.weight": np.zeros((4, 3, 3, 3), np.float32), "fc.bias": np.zeros(4, np.float32)}, str(path))


def _not_mambaout_pth(path):
    import torch

    torch.save({"state_dict": {"conv.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(4)}}, str(path))


@pytest.mark.parametrize(
    "name, write", [("resnet.safetensors", _not_mambaout_safetensors), ("resnet.pth", _not_mambaout_pth)]
)
def test_convert_cli_refuses_a_valid_file_that_is_not_mambaout(tmp_path, name, write):
    src, out = tmp_path / name, tmp_path / "out.safetensors"
    write(src)
    r = _convert(src, out)
    _assert_clean_failure(r, out, name, "not a MambaOut state_dict", "conv.weight")


def test_convert_cli_refuses_colliding_authors_keys(tmp_path):
    """An authors'-layout file that also carries timm's block names: two keys map to one."""
    src, out = tmp_path / "mixed.safetensors", tmp_path / "out.safetensors"
    z = np.zeros((8,), np.float32)
    save_file({"downsample_layers.0.conv1.weight": z, "stages.0.0.norm.weight": z,
               "stages.0.blocks.0.norm.weight": z}, str(src))  # fmt: skip
    r = _convert(src, out)
    _assert_clean_failure(r, out, "mixed.safetensors", "'stages.0.blocks.0.norm.weight'", "'stages.0.0.norm.weight'")


@pytest.mark.parametrize(
    "model, rename, needle",
    [
        ("mambaout_huge", {}, "unknown model 'mambaout_huge'"),
        ("", {}, "names no model"),
        (NAME, {"head/fc/kernel": "head/fc/weights"}, "'weights'"),
    ],
)
def test_convert_cli_refuses_bad_project_weight_files(tmp_path, model, rename, needle):
    params = {rename.get(k, k): v for k, v in _zeros(10).items()}
    src, out = tmp_path / "flax.safetensors", tmp_path / "out.safetensors"
    write_flax_weights(src, params, model=model, num_classes=10)
    r = _convert(src, out)
    _assert_clean_failure(r, out, "flax.safetensors", needle)


def test_convert_cli_verify_without_torch_says_what_to_install(tmp_path):
    src, out = tmp_path / "flax.safetensors", tmp_path / "out.safetensors"
    write_flax_weights(src, _zeros(10), model=NAME, num_classes=10)
    hide = "import sys; sys.modules['torch'] = None; sys.modules['timm'] = None"
    r = _convert(src, out, "--verify", prelude=hide)
    _assert_clean_failure(r, out, "--verify", 'pip install -e ".[torch]"')


# ---- eval.py (in process; the expensive parts replaced where they are not what is tested) --------


@pytest.fixture(scope="module")
def eval_cli():
    spec = importlib.util.spec_from_file_location("eval_cli_under_test", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_eval(monkeypatch):
    """Stub the compiled program and the eval loop; record the settings eval.py asks for."""
    import mambaout_jax.train.evaluation as evaluation
    import mambaout_jax.train.program as program

    seen = {}

    def build_eval_program(*args, preprocessing, **kwargs):
        seen.update(settings=dataclasses.asdict(preprocessing))

    def evaluate(program, params, source, *, batch_size, loader):
        seen.update(examples=len(source))
        return {"top1": 1.0, "top5": 1.0, "loss": 0.0, "count": len(source), "images_per_sec": 1.0}

    monkeypatch.setattr(program, "build_eval_program", build_eval_program)
    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    return seen


def _image_folder(root, split="val"):
    (root / split / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / split / "a" / "x.png")
    return root


def test_eval_uses_the_pretrained_tags_eval_settings(eval_cli, fake_eval, monkeypatch, tmp_path, capsys):
    import mambaout_jax.convert as convert

    asked = []

    def load_weights(path, *, model=None, num_classes=None, ema=None):
        asked.append(model)
        return convert.LoadedWeights("mambaout_base_plus_rw", 1000, {}, str(path))

    monkeypatch.setattr(convert, "load_weights", load_weights)
    data = _image_folder(tmp_path / "data")
    base = ["--weights", str(tmp_path / "w.pth"), "--model", TAG, "--source", "folder", "--data-dir", str(data)]
    assert eval_cli.main(base) == 0
    assert asked == [TAG]
    assert fake_eval["settings"]["image_size"] == 384 and fake_eval["settings"]["crop_mode"] == "squash"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == TAG
    # --crop-mode overrides the tag's mode.
    assert eval_cli.main([*base, "--crop-mode", "center"]) == 0
    assert fake_eval["settings"]["image_size"] == 384 and fake_eval["settings"]["crop_mode"] == "center"


def test_eval_digits_defaults_to_the_digits_image_size(eval_cli, fake_eval, monkeypatch, tmp_path):
    import mambaout_jax.convert as convert
    import mambaout_jax.data.digits as digits

    written = []

    def write_digits_folder(cache_dir=None, *, image_size=32, val_fraction=0.2):
        written.append(image_size)
        return _image_folder(tmp_path / f"digits-{image_size}")

    monkeypatch.setattr(convert, "load_weights", lambda path, **k: convert.LoadedWeights(NAME, 10, {}, str(path)))
    monkeypatch.setattr(digits, "write_digits_folder", write_digits_folder)
    assert eval_cli.main(["--weights", str(tmp_path / "w.pth"), "--source", "digits"]) == 0
    assert written == [32] and fake_eval["settings"]["image_size"] == 32  # not test_mambaout's 160
    assert fake_eval["settings"]["crop_pct"] == 1.0


def test_eval_refuses_weights_without_a_classifier(eval_cli, fake_eval, tmp_path, capsys):
    backbone = tmp_path / "backbone.safetensors"
    write_flax_weights(backbone, _zeros(0), model=NAME, num_classes=0)
    assert eval_cli.main(["--weights", str(backbone), "--source", "digits"]) == 2
    err = capsys.readouterr().err
    assert "backbone.safetensors" in err and "no classifier" in err
    with_head = tmp_path / "head.safetensors"
    write_flax_weights(with_head, _zeros(10), model=NAME, num_classes=10)
    assert eval_cli.main(["--weights", str(with_head), "--num-classes", "0", "--source", "digits"]) == 2
    assert "--num-classes 0 drops the classifier" in capsys.readouterr().err
    assert not fake_eval  # refused before evaluating


def test_evaluate_an_empty_split_is_a_clear_error():
    from mambaout_jax.data import EvalPreprocessing
    from mambaout_jax.train.evaluation import evaluate
    from mambaout_jax.train.mesh import make_mesh
    from mambaout_jax.train.program import build_eval_program

    program = build_eval_program(NAME, 10, make_mesh(), preprocessing=EvalPreprocessing(image_size=32))
    with pytest.raises(ValueError, match="has no examples"):  # eval.py reports ValueErrors as one line
        evaluate(program, _zeros(10), [], batch_size=8)


# ---- a train.py checkpoint without its meta item ------------------------------------------------


@pytest.fixture
def run_without_meta(tmp_path):
    import orbax.checkpoint as ocp

    step = tmp_path / "run" / "checkpoints" / "7"
    step.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckptr:  # a state item as train.py writes it, and no meta item
        ckptr.save(step / "state", {"params": _zeros(10)})
        ckptr.wait_until_finished()
    return tmp_path / "run"


def test_run_checkpoint_without_meta_asks_for_the_model(run_without_meta, eval_cli, fake_eval, capsys):
    from mambaout_jax.convert import CheckpointError, load_weights

    with pytest.raises(CheckpointError, match="--model"):
        load_weights(run_without_meta)
    assert eval_cli.main(["--weights", str(run_without_meta), "--source", "digits"]) == 2
    assert "pass the variant it was trained as: --model" in capsys.readouterr().err
    # With the model named, the class count comes from the classifier's shape and the shapes are checked.
    loaded = load_weights(run_without_meta, model=NAME)
    model, num_classes, params = loaded.model, loaded.num_classes, loaded.params
    assert (model, num_classes, len(params)) == (NAME, 10, len(_zeros(10)))
    with pytest.raises(CheckpointError, match="does not hold mambaout_femto weights"):
        load_weights(run_without_meta, model="mambaout_femto")
