"""The hand-written CPU kernels (mambaout_jax/kernels): what they compute, that the CPU
train step really calls them, and how their build fails and caches."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambaout_jax.kernels import cpu as cpu_kernels
from mambaout_jax.models.layers import _pad_same, depthwise_conv_grouped, depthwise_conv_shift


def _reference_kernel_grad(x, g, k):
    """d/dkernel of XLA's grouped convolution by autodiff, as (k * k, C)."""
    kernel = jnp.zeros((k, k, 1, x.shape[-1]), jnp.float32)
    with jax.default_matmul_precision("highest"):
        _, vjp = jax.vjp(lambda w: depthwise_conv_grouped(x, w), kernel)
        (dk,) = vjp(g)
    return dk.reshape(k * k, -1)


@pytest.mark.parametrize("batch,size,channels,k", [(3, 14, 5, 7), (2, 8, 48, 7), (2, 10, 37, 3), (1, 9, 16, 5)])
def test_depthwise_kernel_grad_equals_autodiff_of_the_grouped_convolution(batch, size, channels, k):
    assert cpu_kernels.depthwise_kernel_grad_available()
    kx, kg = jax.random.split(jax.random.key(channels))
    x = jax.random.normal(kx, (batch, size, size + 1, channels))  # not square: H and W kept apart
    g = jax.random.normal(kg, (batch, size, size + 1, channels))
    dk = jax.jit(lambda x, g: cpu_kernels.depthwise_kernel_grad(_pad_same(x, k), g))(x, g)
    ref = _reference_kernel_grad(x, g, k)
    assert dk.shape == (k * k, channels) and dk.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dk), np.asarray(ref), rtol=0, atol=2e-6 * float(jnp.abs(ref).max()))


def _lowered_shift_vjp(kernel_size=7, channels=16):
    x = jnp.ones((2, 11, 11, channels))
    k = jnp.ones((kernel_size, kernel_size, 1, channels))
    return jax.jit(lambda x, k: jax.vjp(depthwise_conv_shift, x, k)[1](x)).lower(x, k).as_text()


def test_the_shift_form_calls_the_cpu_kernel_unless_switched_off(monkeypatch):
    assert cpu_kernels.TARGET in _lowered_shift_vjp()
    assert cpu_kernels.TARGET not in _lowered_shift_vjp(kernel_size=9)  # a size the kernel is not built for
    monkeypatch.setenv("MAMBAOUT_JAX_CPU_KERNELS", "0")
    assert cpu_kernels.TARGET not in _lowered_shift_vjp()
    monkeypatch.setenv("MAMBAOUT_JAX_CPU_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="MAMBAOUT_JAX_CPU_KERNELS='sometimes'"):
        _lowered_shift_vjp()


def test_the_cpu_train_step_calls_the_cpu_kernel():
    """The library's own train step (shift form on CPU by 'auto') reaches the kernel."""
    from configs import digits
    from mambaout_jax.train import mesh as mesh_lib
    from mambaout_jax.train.program import build_program

    c = digits.get_config()
    program = build_program(c, mesh_lib.make_mesh(jax.devices()[:1]), steps_per_epoch=10)
    n, size = c.batch_size, c.data.image_size
    batch = {
        "image": jax.ShapeDtypeStruct((n, size, size, 3), np.uint8, sharding=program.batch_sharding),
        "label": jax.ShapeDtypeStruct((n,), np.int32, sharding=program.batch_sharding),
    }
    assert cpu_kernels.TARGET in program.train_step.lower(program.abstract_state(), batch).as_text()


def _library_files(cache):
    return sorted(p.name for p in (cache / "cpu_kernels").glob("*")) if (cache / "cpu_kernels").exists() else []


def test_build_caches_by_source_and_is_not_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_JAX_CACHE", str(tmp_path))
    first = cpu_kernels.build()
    assert first.parent == tmp_path / "cpu_kernels" and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == stamp
    changed = tmp_path / "depthwise_kernel_grad.cc"
    changed.write_text(cpu_kernels.SOURCE.read_text() + "\n// another version\n")
    assert cpu_kernels.build(changed) != first  # a changed source is a new library, not the old one
    assert _library_files(tmp_path) == sorted([first.name, cpu_kernels.build(changed).name])


def test_a_failed_build_names_its_cause_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_JAX_CACHE", str(tmp_path))
    broken = tmp_path / "broken_kernel.cc"
    broken.write_text("this is not C++\n")
    with pytest.raises(cpu_kernels.KernelBuildError, match=r"(?s)compiling broken_kernel\.cc failed.*error: expected"):
        cpu_kernels.build(broken)
    assert _library_files(tmp_path) == []  # no half-written library for a later process to load

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(cpu_kernels.KernelBuildError, match="no-such-compiler"):
        cpu_kernels.build()
    assert _library_files(tmp_path) == []


def test_without_a_compiler_the_model_warns_once_and_uses_xla(tmp_path):
    """A fresh process whose compiler is missing: one warning naming the cause (the failed build is
    not retried at the second call), and the XLA form is lowered."""
    import subprocess
    import sys

    code = (
        "import warnings, jax, jax.numpy as jnp, numpy as np\n"
        "from mambaout_jax.kernels import cpu as cpu_kernels\n"
        "from mambaout_jax.models.layers import depthwise_conv_shift\n"
        "x = jnp.arange(2 * 6 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 6, 3) / 50\n"
        "k = jnp.ones((7, 7, 1, 3)) / 7\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    text = jax.jit(lambda x, k: jax.vjp(depthwise_conv_shift, x, k)[1](x)).lower(x, k).as_text()\n"
        "    cpu_kernels.depthwise_kernel_grad_available()\n"
        "assert cpu_kernels.TARGET not in text\n"
        "print(len([w for w in caught if 'not available' in str(w.message)]), [str(w.message) for w in caught][0])\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), MAMBAOUT_JAX_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    count, message = done.stdout.strip().split(" ", 1)
    assert count == "1" and "no-such-compiler" in message and "XLA" in message
