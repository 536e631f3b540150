"""Shared test setup: 8 simulated CPU devices, one compilation cache for the whole test run, and
which device runs the PyTorch reference."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import pytest
from absl import flags

# Simulate an 8-device mesh on the CPU (sharding tests); must happen before JAX initialises.
jax.config.update("jax_num_cpu_devices", 8)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the test modules import configs/ (the recipes) as a package
    sys.path.insert(0, str(ROOT))
# grain's worker processes read absl flags, which only an absl app parses; tests use their defaults.
flags.FLAGS.mark_as_parsed()


def _reference_device() -> str:
    """'cuda' (the CUDA reference: timm on CUDA, JAX on the GPU) when both see a GPU, else 'cpu'."""
    try:
        from mambaout_jax.convert.verify import reference_device

        return reference_device()
    except ImportError:
        return "cpu"


REFERENCE_DEVICE = _reference_device()

# One persistent JAX compilation cache for the whole test run: the pytest process, its xdist
# workers and the subprocesses they start (train.py, eval.py) share it, so a program that several
# tests compile (the digits train step, femto's forward) is compiled once per run. It starts
# empty and is removed at the end: nothing carries over between runs. Exceptions set their
# subprocess's JAX_COMPILATION_CACHE_DIR themselves: test_train_run's runs use a cache of their
# own, and "" where a test needs a cold compile; the planner's TPU compiles (test_plan,
# test_breakdown) run without one.
_CACHE_ENV = "MAMBAOUT_TEST_JAX_CACHE"


def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller (or the only process): before any worker starts
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="mambaout-jax-test-compilation-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput") and os.environ.get(_CACHE_ENV):
        shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.fixture(scope="session")
def reference_device() -> str:
    return REFERENCE_DEVICE


def pytest_report_header(config):
    return f"PyTorch reference device: {REFERENCE_DEVICE}"
