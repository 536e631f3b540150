"""examples/inference.ipynb runs top to bottom (nbclient, a real Jupyter kernel) on a small model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from data_fixtures import require

NOTEBOOK = ROOT / "examples" / "inference.ipynb"


def test_notebook_is_committed_without_outputs():
    nbformat = require("nbformat", "reads the notebook")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1


def tagged(nb, tag):
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A timm-layout test_mambaout (1000 classes, every parameter random), converted in the notebook."""
    require("timm", "the notebook converts a PyTorch checkpoint")
    from safetensors.torch import save_file
    from torch_reference import random_timm_model

    path = tmp_path_factory.mktemp("nb_weights") / "test_mambaout.safetensors"
    save_file({k: v.contiguous() for k, v in random_timm_model("test_mambaout", seed=5).state_dict().items()}, str(path))
    return path


def test_notebook_runs_and_its_top5_is_predict_py_s(timm_weights, tmp_path, monkeypatch):
    nbformat = require("nbformat", "reads the notebook")
    nbclient = require("nbclient", "executes the notebook")
    require("ipykernel", "the notebook's kernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # papermill's convention: a cell after the one tagged "parameters" overrides its values
    at = nb.cells.index(tagged(nb, "parameters")) + 1
    nb.cells.insert(at, nbformat.v4.new_code_cell(f'WEIGHTS = {str(timm_weights)!r}\nMODEL = "test_mambaout"'))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits the environment
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    printed = "".join(o.get("text", "") for o in tagged(nb, "top5").outputs if o.output_type == "stream")
    rows = [re.fullmatch(r"\s*([0-9.]+)  (.+)  \((n\d{8}), index (\d+)\)", line) for line in printed.splitlines()]
    assert len(rows) == 5 and all(rows), printed

    import skimage.data
    from mambaout_jax.predict import load_predictor

    image = str(Path(skimage.data.__file__).parent / "chelsea.png")  # the notebook's default photo
    (want,) = load_predictor(timm_weights, model="test_mambaout").predict([image], top_k=5)
    assert [(r[2], int(r[4])) for r in rows] == [(s.label, s.index) for s in want.top]
    np.testing.assert_allclose([float(r[1]) for r in rows], [s.prob for s in want.top], atol=5e-5)  # printed to 4 places
