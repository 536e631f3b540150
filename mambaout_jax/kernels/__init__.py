"""Native kernels XLA calls through its FFI, for what XLA computes slowly: the library's lowest layer.

``cpu``: C++ kernels for XLA:CPU, compiled on first use for the machine that runs them (the
depthwise convolution's forward and kernel gradient). The models layer calls them from its layers' VJPs; this
layer builds, caches and registers them (file I/O the pure models layer does not do).
"""

from mambaout_jax.kernels import cpu

__all__ = ["cpu"]
