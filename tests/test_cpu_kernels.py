"""The hand-written CPU kernels (mambaout_jax/kernels): what they compute, that the CPU
forward and train step really call them, and how their build fails and caches."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambaout_jax.kernels import cpu as cpu_kernels
from mambaout_jax.models.layers import _pad_same, depthwise_conv_grouped, depthwise_conv_shift


def _reference_forward(x, kernel, bias, passthrough):
    """[x[..., :p], conv(x[..., p:]) + bias] from XLA's grouped convolution at full precision."""
    with jax.default_matmul_precision("highest"):
        y = depthwise_conv_grouped(x[..., passthrough:], kernel) + bias
    return jnp.concatenate([x[..., :passthrough], y], axis=-1)


# (batch, height, width, passthrough, channels, k): femto's first and last stage shapes; a tail of
# 5 channels after two full blocks; widths that are not a multiple of any tile, narrower than the
# kernel, one pixel; no passthrough; kernel sizes 3 and 5.
FORWARD_CASES = [
    (2, 56, 56, 80, 48, 7),
    (3, 7, 7, 480, 288, 7),
    (2, 9, 23, 5, 37, 7),
    (1, 4, 3, 2, 20, 5),
    (2, 1, 1, 1, 3, 7),
    (2, 14, 13, 0, 16, 3),
]


@pytest.mark.parametrize("batch,height,width,passthrough,channels,k", FORWARD_CASES)
def test_depthwise_forward_equals_the_grouped_convolution(batch, height, width, passthrough, channels, k):
    assert cpu_kernels.depthwise_available(k)
    kx, kk, kb = jax.random.split(jax.random.key(channels), 3)
    x = jax.random.normal(kx, (batch, height, width, passthrough + channels))
    kernel = jax.random.normal(kk, (k, k, 1, channels))
    bias = jax.random.normal(kb, (channels,))
    y = jax.jit(cpu_kernels.depthwise_forward, static_argnums=3)(x, kernel, bias, passthrough)
    ref = _reference_forward(x, kernel, bias, passthrough)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y[..., :passthrough]), np.asarray(x[..., :passthrough]))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=1e-6 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("cpu", ["1", "0"], ids=["cpu-kernel", "xla-only"])
def test_the_shift_form_with_passthrough_and_bias_has_the_reference_gradients(cpu, monkeypatch):
    """depthwise_conv_shift's hand-written VJP (its input gradient from the forward kernel, its
    kernel gradient from the other) against autodiff of the grouped-convolution reference, in x,
    the kernel and the bias, with the C++ kernels and with XLA's forms."""
    monkeypatch.setenv("MAMBAOUT_JAX_CPU_KERNELS", cpu)
    passthrough, channels = 21, 40
    kx, kk, kb, kg = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, (3, 12, 17, passthrough + channels))
    kernel = jax.random.normal(kk, (7, 7, 1, channels))
    bias = jax.random.normal(kb, (channels,))
    g = jax.random.normal(kg, x.shape)

    def outputs_and_grads(f):
        y, vjp = jax.vjp(lambda x, w, b: f(x, w, b, passthrough), x, kernel, bias)
        return (y, *vjp(g))

    ours = jax.jit(lambda: outputs_and_grads(depthwise_conv_shift))()
    with jax.default_matmul_precision("highest"):
        theirs = jax.jit(lambda: outputs_and_grads(_reference_forward))()
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6 * float(jnp.abs(b).max()))


def _reference_kernel_grad(x, g, k):
    """d/dkernel of XLA's grouped convolution by autodiff, as (k * k, C)."""
    kernel = jnp.zeros((k, k, 1, x.shape[-1]), jnp.float32)
    with jax.default_matmul_precision("highest"):
        _, vjp = jax.vjp(lambda w: depthwise_conv_grouped(x, w), kernel)
        (dk,) = vjp(g)
    return dk.reshape(k * k, -1)


@pytest.mark.parametrize("batch,size,channels,k", [(3, 14, 5, 7), (2, 8, 48, 7), (2, 10, 37, 3), (1, 9, 16, 5)])
def test_depthwise_kernel_grad_equals_autodiff_of_the_grouped_convolution(batch, size, channels, k):
    assert cpu_kernels.depthwise_available()
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


def test_the_shift_form_calls_the_cpu_kernels_unless_switched_off(monkeypatch):
    text = _lowered_shift_vjp()
    assert cpu_kernels.KERNEL_GRAD_TARGET in text and cpu_kernels.FORWARD_TARGET in text  # dx is a forward
    text = _lowered_shift_vjp(kernel_size=9)  # a size the kernels are not built for
    assert cpu_kernels.KERNEL_GRAD_TARGET not in text and cpu_kernels.FORWARD_TARGET not in text
    monkeypatch.setenv("MAMBAOUT_JAX_CPU_KERNELS", "0")
    text = _lowered_shift_vjp()
    assert cpu_kernels.KERNEL_GRAD_TARGET not in text and cpu_kernels.FORWARD_TARGET not in text
    monkeypatch.setenv("MAMBAOUT_JAX_CPU_KERNELS", "sometimes")
    with pytest.raises(ValueError, match="MAMBAOUT_JAX_CPU_KERNELS='sometimes'"):
        _lowered_shift_vjp()


def test_the_cpu_forward_calls_the_forward_kernel_in_float32_only():
    """A model as built (shift form on CPU by 'auto') reaches the forward kernel; a bfloat16 model
    keeps XLA's form (the kernel is float32)."""
    from flax import nnx

    import mambaout_jax

    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    for dtype, expected in ((jnp.float32, True), (jnp.bfloat16, False)):
        graphdef, state = nnx.split(mambaout_jax.create_model("test_mambaout", dtype=dtype))
        forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        assert (cpu_kernels.FORWARD_TARGET in forward.lower(state, x).as_text()) is expected


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
    assert cpu_kernels.KERNEL_GRAD_TARGET in program.train_step.lower(program.abstract_state(), batch).as_text()


def _library_files(cache):
    return sorted(p.name for p in (cache / "cpu_kernels").glob("*")) if (cache / "cpu_kernels").exists() else []


def test_build_caches_by_source_and_is_not_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_JAX_CACHE", str(tmp_path))
    first = cpu_kernels.build()
    assert first.parent == tmp_path / "cpu_kernels" and first.suffix == ".so"
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build() == first and first.stat().st_mtime_ns == stamp
    changed = tmp_path / "depthwise.cc"
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
        "    cpu_kernels.depthwise_available()\n"
        "assert cpu_kernels.KERNEL_GRAD_TARGET not in text\n"
        "print(len([w for w in caught if 'not available' in str(w.message)]), [str(w.message) for w in caught][0])\n"
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), MAMBAOUT_JAX_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    count, message = done.stdout.strip().split(" ", 1)
    assert count == "1" and "no-such-compiler" in message and "XLA" in message
