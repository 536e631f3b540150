"""Published per-chip figures of the Cloud TPU generations the planner knows.

Sources (Google Cloud TPU documentation pages, read November 2026):
- v4:  https://cloud.google.com/tpu/docs/v4  -- 275 TFLOP/s bf16; 32 GiB HBM2 at 1200 GB/s. The page
  gives ICI only per pod ("all-reduce bandwidth per Pod 1.1 PB/s" over 4096 chips), so the per-chip
  figure is derived from it the same way it relates on v5e and v6e (see ``ici_send_bandwidth``).
- v5e: https://cloud.google.com/tpu/docs/v5e -- 197 TFLOP/s bf16; 16 GB HBM2 at 819 GB/s; 400 GB/s
  bidirectional ICI per chip (older revisions: "1600 Gbps", the same per direction).
- v5p: https://cloud.google.com/tpu/docs/v5p -- 459 TFLOP/s bf16; 95 GiB HBM at 2765 GB/s; 1200 GB/s
  bidirectional ICI per chip.
- v6e: https://cloud.google.com/tpu/docs/v6e -- 918 TFLOP/s bf16; 32 GB HBM at 1600 GB/s; 800 GB/s
  bidirectional ICI per chip (older revisions of the page say 1640 GB/s and 3584 Gbps).

These are peak figures: the roofline built on them is optimistic (real steps are slower). The HBM
the planner checks a program against is not the published capacity but what the TPU compiler
itself allows (``probe_hbm_limit`` in ``compile.py``), a little less (e.g. 15.75 GiB on v5e).
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    generation: str  # the name libtpu topologies use: 'v5e'
    device_kind: str  # what JAX reports as ``device.device_kind``
    bf16_flops: float  # peak dense bf16 FLOP/s per chip
    hbm_bytes: float  # published HBM capacity per chip
    hbm_bandwidth: float  # bytes/s per chip
    ici_bandwidth: float  # bytes/s per chip, both directions of all its links together
    torus_dims: int  # 2 (v5e, v6e) or 3 (v4, v5p)
    tensorcores_per_chip: int  # v4/v5p accelerator types count TensorCores: v4-32 is 16 chips
    source: str

    @property
    def ici_send_bandwidth(self) -> float:
        """What one chip can send per second over all its links at once: half the bidirectional
        figure. A ring collective's bytes sent per chip divided by it is the collective's time.
        Check: on v5e and v6e it equals Google's "all-reduce bandwidth per Pod" over 256 chips
        (51.2 TB/s / 256 = 200 GB/s; 102.4 TB/s / 256 = 400 GB/s)."""
        return self.ici_bandwidth / 2


CHIPS: dict[str, ChipSpec] = {
    "v4": ChipSpec(
        generation="v4",
        device_kind="TPU v4",
        bf16_flops=275e12,
        hbm_bytes=32 * GiB,
        hbm_bandwidth=1200 * GB,
        ici_bandwidth=2 * 1.1e15 / 4096,  # from the per-pod all-reduce bandwidth, see the docstring
        torus_dims=3,
        tensorcores_per_chip=2,
        source="https://cloud.google.com/tpu/docs/v4",
    ),
    "v5e": ChipSpec(
        generation="v5e",
        device_kind="TPU v5 lite",
        bf16_flops=197e12,
        hbm_bytes=16 * GiB,
        hbm_bandwidth=819 * GB,
        ici_bandwidth=400 * GB,
        torus_dims=2,
        tensorcores_per_chip=1,
        source="https://cloud.google.com/tpu/docs/v5e",
    ),
    "v5p": ChipSpec(
        generation="v5p",
        device_kind="TPU v5",
        bf16_flops=459e12,
        hbm_bytes=95 * GiB,
        hbm_bandwidth=2765 * GB,
        ici_bandwidth=1200 * GB,
        torus_dims=3,
        tensorcores_per_chip=2,
        source="https://cloud.google.com/tpu/docs/v5p",
    ),
    "v6e": ChipSpec(
        generation="v6e",
        device_kind="TPU v6 lite",
        bf16_flops=918e12,
        hbm_bytes=32 * GiB,
        hbm_bandwidth=1600 * GB,
        ici_bandwidth=800 * GB,
        torus_dims=2,
        tensorcores_per_chip=1,
        source="https://cloud.google.com/tpu/docs/v6e",
    ),
}
