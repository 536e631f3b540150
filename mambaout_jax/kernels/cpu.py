"""Hand-written C++ kernels for XLA:CPU, called through its FFI, for what XLA:CPU computes slowly.

One kernel today: the depthwise convolution's kernel gradient (``kernels/depthwise_kernel_grad.cc``), which
XLA computes as k*k memory-bound reductions per image (~28% of a femto train step on CPU,
benchmarks/RESULTS.md). The C++ source ships with the package and is compiled on first use, for
the machine it runs on (``g++ -O3 -march=native``), into a cache keyed by everything the binary
depends on: the source, the compiler, JAX's FFI headers and the CPU's instruction-set flags (so a
cache shared between an Intel and an AMD machine never runs one's binary on the other). As with
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

SOURCE = Path(__file__).with_name("depthwise_kernel_grad.cc")
TARGET = "mambaout_depthwise_kernel_grad"
COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
COMPILE_TIMEOUT_S = 300


class KernelBuildError(RuntimeError):
    pass


KERNEL_SIZES = (3, 5, 7)  # the kernel sizes depthwise_kernel_grad.cc is instantiated for
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


def depthwise_kernel_grad_available(kernel_size: int = 7) -> bool:
    """Whether the depthwise kernel-gradient kernel is switched on, built for ``kernel_size`` and
    registered with XLA for the CPU (read when a function is traced: the switch applies to programs
    traced after it)."""
    return enabled() and kernel_size in KERNEL_SIZES and _register_depthwise_kernel_grad()


@functools.cache
def _register_depthwise_kernel_grad() -> bool:
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (KernelBuildError, OSError) as e:
        warnings.warn(
            f"mambaout_jax: the CPU depthwise kernel-gradient kernel is not available, using XLA's slower form ({e})",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.MambaOutDepthwiseKernelGrad), platform="cpu")
    return True


def depthwise_kernel_grad(xp: jax.Array, g: jax.Array) -> jax.Array:
    """sum over n, h, w of ``xp[n, h + i, w + j, c] * g[n, h, w, c]``, shape (k * k, C), float32.

    ``xp`` is the input padded 'same' by (k - 1) / 2 on each side of both spatial axes. CPU only;
    call it when ``depthwise_kernel_grad_available()``. One thread: XLA runs the step's other
    operations on the other cores meanwhile (measured: a 2-thread split made the femto train step
    5% slower on 2 cores).
    """
    n, h, w, c = g.shape
    k = xp.shape[1] - h + 1
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((k * k, c), jnp.float32), vmap_method="sequential")
    return call(xp.astype(jnp.float32), g.astype(jnp.float32))


__all__ = ["KERNEL_SIZES", "KernelBuildError", "build", "depthwise_kernel_grad", "depthwise_kernel_grad_available", "enabled"]

