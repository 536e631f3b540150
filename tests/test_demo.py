"""The demo's command line and what it puts on the page (the page itself: test_demo_browser.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT
from data_fixtures import require

require("gradio", "the demo's web framework")
from mambaout_jax.data.class_names import default_class_names  # noqa: E402
from mambaout_jax.demo import label_values  # noqa: E402
from mambaout_jax.predict import ClassScore  # noqa: E402


def test_without_weights_or_the_default_run_it_says_how_to_make_one(tmp_path):
    """No --weights and no runs/digits here: exit 2 naming the default run and the command that writes it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "mambaout_jax.demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "runs/digits" in r.stderr and "python train.py --workdir runs/digits" in r.stderr


def test_two_classes_with_one_name_stay_two_bars():
    """ImageNet's two 'crane's (134: the bird, 517: the machine) would be one key of gr.Label."""
    imagenet = default_class_names(1000)
    assert imagenet.labels[134] == imagenet.labels[517] == "crane"
    top = [ClassScore(134, "crane", 0.5), ClassScore(517, "crane", 0.3), ClassScore(0, imagenet.labels[0], 0.1)]
    assert label_values(top, imagenet.ids) == {"crane (n02012849)": 0.5, "crane (n03126707)": 0.3, "tench, Tinca tinca": 0.1}
