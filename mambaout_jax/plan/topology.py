"""TPU pod slices by name, as compile-only JAX devices on a machine without a TPU.

``libtpu`` (the TPU compiler and runtime, a PyPI wheel) can describe any slice topology and compile
for it without the hardware: ``jax.experimental.topologies.get_topology_desc`` returns devices that
``jax.jit(...).lower(...).compile()`` accepts, from a CPU-only process. Two names are accepted:

- a topology, ``<generation>:<shape>``: ``v4:2x2x4``, ``v5e:16x16``, ``v5p:4x4x4``, ``v6e:16x16``;
- an accelerator type as ``gcloud`` spells it, ``<generation>-<n>``: ``v4-32``, ``v5e-256`` (or
  ``v5litepod-256``), ``v5p-128``, ``v6e-256``; n counts TensorCores, so v4-32 and v5p-128 are 16
  and 64 chips; the shape is Google's default for that type.

v4 is described with its two TensorCores fused into one device per chip ("megacore"), which is how
JAX presents a real v4 chip; v5p does that by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from typing import Any, Iterator

from mambaout_jax.plan.chips import CHIPS, ChipSpec

KNOWN_FORMS = (
    "a topology <generation>:<shape> (v4:2x2x4, v5e:16x16, v5p:4x4x4, v6e:16x16; v5e/v6e are 2-D, "
    "v4/v5p 3-D) or an accelerator type <generation>-<n> (v4-32, v5e-256 or v5litepod-256, v5p-128, "
    f"v6e-256); generations: {', '.join(CHIPS)}"
)

# Default slice shapes of accelerator types (Cloud TPU docs: the v4, v5e, v5p and v6e pages).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {
    4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
    512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16", 6144: "16x16x24",
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}
# libtpu options per generation: one device per v4 chip, as on a real v4 host.
_TOPOLOGY_OPTIONS: dict[str, dict[str, Any]] = {"v4": {"chip_config_name": "megacore"}}


class TopologyError(ValueError):
    """A topology name the planner cannot describe (unknown form, generation or shape)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # canonical '<generation>:<shape>'
    accelerator_type: str  # how gcloud names the slice: 'v5e-256', 'v4-32'
    chip: ChipSpec
    devices: tuple[Any, ...]  # compile-only jax devices, one per chip

    @property
    def num_chips(self) -> int:
        return len(self.devices)

    @property
    def num_processes(self) -> int:
        """TPU VMs of the slice, one JAX process each (e.g. 4 chips per VM on v5e-256: 64)."""
        return len({d.process_index for d in self.devices})


def parse_topology_name(name: str) -> tuple[str, str]:
    """``(generation, shape)`` of a topology or accelerator-type name; TopologyError otherwise."""
    text = name.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    if m:
        generation, shape = _ALIASES.get(m.group(1), m.group(1)), m.group(2)
    else:
        m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
        if not m:
            raise TopologyError(f"cannot read TPU topology {name!r}: expected {KNOWN_FORMS}")
        generation, count = _ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
        if generation not in CHIPS:
            raise TopologyError(f"unknown TPU generation in {name!r}: expected {KNOWN_FORMS}")
        chip = CHIPS[generation]
        chips, rest = divmod(count, chip.tensorcores_per_chip)
        shapes = _SHAPES_3D if chip.torus_dims == 3 else _SHAPES_2D
        if rest or chips not in shapes:
            known = ", ".join(f"{generation}-{n * chip.tensorcores_per_chip}" for n in shapes)
            raise TopologyError(f"no default slice shape for {name!r}; known {generation} types: {known}")
        shape = shapes[chips]
    if generation not in CHIPS:
        raise TopologyError(f"unknown TPU generation in {name!r}: expected {KNOWN_FORMS}")
    dims = shape.count("x") + 1
    if dims != CHIPS[generation].torus_dims:
        raise TopologyError(
            f"{name!r}: {generation} slices are {CHIPS[generation].torus_dims}-D, got a {dims}-D shape; "
            f"expected {KNOWN_FORMS}"
        )
    return generation, shape


def accelerator_type(generation: str, num_chips: int) -> str:
    return f"{generation}-{num_chips * CHIPS[generation].tensorcores_per_chip}"


def load_topology(name: str) -> Topology:
    """The compile-only devices of a TPU slice (needs the ``libtpu`` wheel, not a TPU)."""
    generation, shape = parse_topology_name(name)
    canonical = f"{generation}:{shape}"
    # The planner only compiles: never hold /tmp/libtpu_lockfile against another process (a
    # training job on a TPU VM, or a second planner) that uses libtpu at the same time.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    error = None
    with _quiet_stderr():
        try:
            desc = topologies.get_topology_desc(
                topology_name=canonical, platform="tpu", **_TOPOLOGY_OPTIONS.get(generation, {})
            )
        except RuntimeError as e:  # JaxRuntimeError from libtpu, RuntimeError without libtpu
            error = e
    if error is not None:
        if "TPU support not installed" in str(error):
            raise TopologyError(
                "compiling for TPU needs the libtpu wheel (no TPU needed): "
                "pip install 'libtpu==0.0.42.*'  (the version jax[tpu]==0.10.2 pins)"
            ) from None
        raise TopologyError(f"libtpu cannot describe {canonical!r}: {error}") from None
    devices = tuple(desc.devices)
    chip = CHIPS[generation]
    if devices[0].device_kind != chip.device_kind:
        raise TopologyError(f"{canonical}: libtpu describes {devices[0].device_kind!r}, expected {chip.device_kind!r}")
    return Topology(canonical, accelerator_type(generation, len(devices)), chip, devices)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the process's stderr (fd 2) while libtpu initialises.

    libtpu looks for the TPU VM it runs on and, finding none, logs warnings and errors to stderr
    ("could not determine TPU accelerator type", "unexpected worker hostname"): harmless for
    compiling, alarming to read. A real failure still surfaces as the exception it raises.
    """
    with open(os.devnull, "w") as devnull:
        saved = os.dup(2)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
