"""Shared test setup: 8 simulated CPU devices, and which device runs the PyTorch reference."""

from __future__ import annotations

import sys
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


@pytest.fixture(scope="session")
def reference_device() -> str:
    return REFERENCE_DEVICE


def pytest_report_header(config):
    return f"PyTorch reference device: {REFERENCE_DEVICE}"
