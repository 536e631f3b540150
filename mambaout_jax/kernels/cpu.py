"""Hand-written C++ kernels for XLA:CPU, called through its FFI, for what XLA:CPU computes slowly.

Two kernels today, both for the depthwise 'same' convolution (``kernels/depthwise.cc``): its
forward with the Gated CNN block's pass-through channels, ``[x[..., :p], conv(x[..., p:]) + bias]``,
which XLA computes as a pad, a 49-tap loop and a concatenate (2-3x slower, benchmarks/RESULTS.md),
and which also serves as the input gradient; and its kernel gradient, which XLA computes as k*k
memory-bound reductions per image (~28% of a femto train step on CPU). The C++ source ships with
the package and is compiled on first use, for the machine it runs on (``g++ -O3 -march=native``),
into a cache keyed by everything the binary depends on: the source, the compiler, JAX's FFI
headers and the CPU's instruction-set flags (so a cache shared between an Intel and an AMD machine
never runs one's binary on the other). As with
``torch.utils.cpp_extension.load``: no build step at install time, and where the build cannot run
(no C++ compiler) the model falls back to XLA's form of the same sum, with one warning.

``MAMBAOUT_JAX_CPU_KERNELS=0`` turns the kernels off; ``MAMBAOUT_JAX_CACHE`` moves the cache
(default ``~/.cache/mambaout_jax``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("depthwise.cc")
FORWARD_TARGET = "mambaout_depthwise_forward"
KERNEL_GRAD_TARGET = "mambaout_depthwise_kernel_grad"
COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 300


class KernelBuildError(RuntimeError):
    pass


KERNEL_SIZES = (3, 5, 7)  # the kernel sizes depthwise.cc is instantiated for
_SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def enabled() -> bool:
    """``MAMBAOUT_JAX_CPU_KERNELS`` (default on); a value that is neither on nor off is refused."""
    value = os.environ.get("MAMBAOUT_JAX_CPU_KERNELS", "1").strip().lower()
    if value not in _SWITCH:
        raise ValueError(f"MAMBAOUT_JAX_CPU_KERNELS={value!r}: use 1 (on, the default) or 0 (off)")
    return _SWITCH[value]


def cache_dir() -> Path:
    root = os.environ.get("MAMBAOUT_JAX_CACHE") or Path.home() / ".cache" / "mambaout_jax"
    return Path(root) / "cpu_kernels"


def _cpu_flags() -> str:
    """The instruction-set flags -march=native compiles for (the first 'flags' line of /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise KernelBuildError("no C++ compiler found (set CXX, or install g++)")
    return compiler


def build(source: Path = SOURCE) -> Path:
    """The shared library for ``source``, compiled if the cache does not hold it yet.

    The library is written to a temporary name beside its final one and renamed into place, so a
    process that is killed mid-build, or two processes building at once, never leave a half-written
    library where a later process would load it.
    """
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot run the C++ compiler {compiler}: {e}") from e
    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    for part in (source.read_bytes(), version.encode(), " ".join(COMPILE_FLAGS).encode(), _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    for header in sorted(Path(include, "xla", "ffi", "api").glob("*.h")):
        key.update(header.read_bytes())
    library = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=library.name + ".", suffix=".tmp", dir=library.parent)
    os.close(fd)
    try:
        cmd = [compiler, *COMPILE_FLAGS, "-I", include, str(source), "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelBuildError(f"compiling {source.name} failed: {e}") from e
        if done.returncode != 0:
            raise KernelBuildError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return library


def depthwise_available(kernel_size: int = 7) -> bool:
    """Whether the depthwise kernels are switched on, built for ``kernel_size`` and registered with
    XLA for the CPU (read when a function is traced: the switch applies to programs traced after it)."""
    return enabled() and kernel_size in KERNEL_SIZES and _register()


@functools.cache
def _register() -> bool:
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (KernelBuildError, OSError) as e:
        warnings.warn(
            f"mambaout_jax: the CPU depthwise kernels are not available, using XLA's slower forms ({e})",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(library.MambaOutDepthwiseForward), platform="cpu")
    jax.ffi.register_ffi_target(
        KERNEL_GRAD_TARGET, jax.ffi.pycapsule(library.MambaOutDepthwiseKernelGrad), platform="cpu"
    )
    return True


def depthwise_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array, passthrough: int) -> jax.Array:
    """``[x[..., :p], conv(x[..., p:]) + bias]`` (p = passthrough), the 'same' depthwise convolution
    of the last C channels of ``x`` (N, H, W, p + C) with ``kernel`` (k, k, 1, C), float32.

    CPU only; call it when ``depthwise_available()``. Its (image, channel block) items are split
    over XLA's intra-op thread pool: nothing else of the forward pass can run beside it (the gate
    waits for its output).
    """
    k, _, _, c = kernel.shape
    if x.shape[-1] != passthrough + c:
        raise ValueError(f"expected {passthrough} + {c} channels, got {x.shape[-1]}")
    call = jax.ffi.ffi_call(FORWARD_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")
    f32 = jnp.float32
    return call(x.astype(f32), kernel.reshape(k, k, c).astype(f32), bias.astype(f32), passthrough=np.int64(passthrough))


def depthwise_kernel_grad(xp: jax.Array, g: jax.Array) -> jax.Array:
    """sum over n, h, w of ``xp[n, h + i, w + j, c] * g[n, h, w, c]``, shape (k * k, C), float32.

    ``xp`` is the input padded 'same' by (k - 1) / 2 on each side of both spatial axes. CPU only;
    call it when ``depthwise_available()``. One thread: XLA runs the step's other
    operations on the other cores meanwhile (measured: a 2-thread split made the femto train step
    5% slower on 2 cores).
    """
    n, h, w, c = g.shape
    k = xp.shape[1] - h + 1
    call = jax.ffi.ffi_call(KERNEL_GRAD_TARGET, jax.ShapeDtypeStruct((k * k, c), jnp.float32), vmap_method="sequential")
    return call(xp.astype(jnp.float32), g.astype(jnp.float32))


__all__ = [
    "FORWARD_TARGET",
    "KERNEL_GRAD_TARGET",
    "KERNEL_SIZES",
    "KernelBuildError",
    "build",
    "depthwise_available",
    "depthwise_forward",
    "depthwise_kernel_grad",
    "enabled",
]

