"""benchmarks/bench_gpu.py end to end at smoke size on whatever device is here (CPU in CI).

Both depthwise forms with one dense form (4 JAX compiles of test_mambaout, ~2-4 min on 2 quiet
cores); the full run's default is every form (``--dw-conv-impls``/``--conv-impls``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "benchmarks/bench_gpu.py", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)


def test_smoke_run_measures_every_form_and_writes_json_and_markdown(tmp_path):
    proc = run("--smoke", "--no-torch-compile", "--conv-impls", "im2col", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = result["rows"]
    jax_forms = {(r["step"], r["dw_conv_impl"], r["conv_impl"]) for r in rows if r["framework"] == "jax"}
    assert jax_forms == {(s, d, c) for s in ("inference", "train") for d in ("grouped", "shift") for c in ("im2col",)}
    assert {(r["step"], r["contender"]) for r in rows if r["framework"] != "jax"} == {
        ("inference", "timm_eager"), ("train", "timm_eager")
    }
    for r in rows:
        assert r["model"] == "test_mambaout" and r["batch"] == 2 and r["image_size"] == 32
        assert r["img_per_s"] > 0 and r["first_call_seconds"] > 0
        if r["contender"] == "timm_eager":
            assert r["vs_timm_eager"] == 1.0
    fastest = result["fastest"]
    assert set(fastest) == {"test_mambaout inference", "test_mambaout train"}
    for step, best in fastest.items():
        candidates = [r for r in rows if r["framework"] == "jax" and f"{r['model']} {r['step']}" == step]
        assert best["img_per_s"] == max(r["img_per_s"] for r in candidates)
    assert result["parity"]["passed"] and "passed" in result["parity"]["summary"]
    md = (tmp_path / "gpu.md").read_text()
    assert md.count("| test_mambaout |") == len(rows) == 6
    assert "Fastest JAX form" in md and "Parity" in md


def test_bad_arguments_are_clear_errors_and_write_nothing(tmp_path):
    proc = run("--models", "mambaout_huge", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "unknown model(s) mambaout_huge" in proc.stderr
    proc = run("--batch", "0", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "--batch must be at least 1, got 0" in proc.stderr
    assert not (tmp_path / "out").exists()


# What a bare GPU image lacks: the input pipeline's packages (grain, ArrayRecord, TFDS). The model,
# the converter and the CUDA parity tests that bench_gpu.py runs must not need them.
WITHOUT_INPUT_PIPELINE = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("grain", "array_record", "tensorflow_datasets"):
            raise ModuleNotFoundError(f"No module named {name!r} (absent on purpose)", name=name)
sys.meta_path.insert(0, Absent())
import pytest
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


def test_the_parity_tests_it_runs_need_no_input_pipeline():
    cmd = [sys.executable, "-c", WITHOUT_INPUT_PIPELINE, "tests/test_model_parity.py", "tests/test_model.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]  # "N tests collected in ..s", or "... N errors in ..s"
    assert "tests collected" in summary and "error" not in summary, summary
    # The same guard does stop what needs the pipeline, so the check above is not vacuous.
    proc = subprocess.run([*cmd[:3], "tests/test_data_pipeline.py"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "absent on purpose" in proc.stdout + proc.stderr
