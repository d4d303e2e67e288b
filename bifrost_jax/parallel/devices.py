"""Peak dense bf16 FLOP/s and memory per accelerator, for MFU and "does it fit" checks.

Looked up by a live device's ``device.device_kind`` (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3") or by a TPU
topology name (e.g. "v5p:4x4x4", as ``bifrost aot --topology`` takes). Figures are per CHIP (a GPU is one chip);
JAX exposes some TPU generations as two devices per chip (v2, v3, and v4 / v5p topologies compiled without
megacore), so :func:`per_device` divides by the devices per chip seen in the device list.

Dense means without structured sparsity (NVIDIA's headline tensor figures are 2:4-sparse; the dense ones are half).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

GiB = 1024 ** 3
GB = 1000 ** 3
TERA = 1e12


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str                 # our short name: "v5p", "h100-sxm", ...
    platform: str             # "tpu" | "gpu"
    peak_bf16_flops: float    # dense bf16 FLOP/s per chip
    hbm_bytes: int            # HBM per chip
    hbm_bandwidth: float      # bytes/s per chip
    source: str               # where the figures come from


# Sources:
#  TPU: Google Cloud TPU documentation, "TPU versions" / per-generation system-architecture pages
#       (cloud.google.com/tpu/docs/v2, v3, v4, v5e, v5p, v6e, tpu7x): bf16 peak TFLOP/s, HBM GiB and GB/s per chip.
#  NVIDIA: product datasheets (A100 "NVIDIA A100 Tensor Core GPU" datasheet; H100 "NVIDIA H100 Tensor Core GPU"
#       datasheet, SXM / PCIe / NVL columns; H200 "NVIDIA H200 Tensor Core GPU" page; HGX B200 / GB200 NVL72
#       spec pages, per-GPU = system / 8 or / 72; L4 and L40S datasheets). NVIDIA lists bf16 tensor peaks "with
#       sparsity": the dense figure used here is half of it.
CHIPS: dict[str, ChipSpec] = {c.name: c for c in (
    ChipSpec("v2", "tpu", 45e12, 16 * GiB, 600 * GB, "Cloud TPU v2: 45 TFLOP/s, 16 GiB HBM, 600 GB/s per chip"),
    ChipSpec("v3", "tpu", 123e12, 32 * GiB, 900 * GB, "Cloud TPU v3: 123 TFLOP/s, 32 GiB HBM, 900 GB/s per chip"),
    ChipSpec("v4", "tpu", 275e12, 32 * GiB, 1200 * GB, "Cloud TPU v4: 275 TFLOP/s, 32 GiB HBM, 1200 GB/s per chip"),
    ChipSpec("v5e", "tpu", 197e12, 16 * GiB, 819 * GB, "Cloud TPU v5e: 197 TFLOP/s, 16 GiB HBM, 819 GB/s per chip"),
    ChipSpec("v5p", "tpu", 459e12, 95 * GiB, 2765 * GB,
             "Cloud TPU v5p: 459 TFLOP/s, 95 GiB HBM, 2765 GB/s per chip"),
    ChipSpec("v6e", "tpu", 918e12, 32 * GiB, 1640 * GB,
             "Cloud TPU v6e (Trillium): 918 TFLOP/s, 32 GiB HBM, 1640 GB/s per chip"),
    ChipSpec("tpu7x", "tpu", 2307e12, 192 * GiB, 7380 * GB,
             "Cloud TPU7x (Ironwood): 2307 TFLOP/s bf16 (4614 fp8), 192 GiB HBM, 7.38 TB/s per chip"),
    ChipSpec("v100", "gpu", 125e12, 32 * GB, 900 * GB, "V100 SXM2 datasheet: 125 TFLOP/s fp16 tensor (no bf16)"),
    ChipSpec("a100-40gb", "gpu", 312e12, 40 * GB, 1555 * GB, "A100 datasheet: 312 TFLOP/s bf16 dense, 40 GB"),
    ChipSpec("a100-80gb", "gpu", 312e12, 80 * GB, 2039 * GB, "A100 datasheet: 312 TFLOP/s bf16 dense, 80 GB"),
    ChipSpec("h100-sxm", "gpu", 989e12, 80 * GB, 3350 * GB, "H100 SXM datasheet: 1979 TFLOP/s sparse bf16"),
    ChipSpec("h100-pcie", "gpu", 756e12, 80 * GB, 2000 * GB, "H100 PCIe datasheet: 1513 TFLOP/s sparse bf16"),
    ChipSpec("h100-nvl", "gpu", 835e12, 94 * GB, 3900 * GB, "H100 NVL datasheet: 1671 TFLOP/s sparse bf16"),
    ChipSpec("gh200", "gpu", 989e12, 96 * GB, 4000 * GB, "GH200 datasheet: H100 compute, 96 GB HBM3"),
    ChipSpec("h200", "gpu", 989e12, 141 * GB, 4800 * GB, "H200 SXM page: 1979 TFLOP/s sparse bf16, 141 GB"),
    ChipSpec("h200-nvl", "gpu", 835e12, 141 * GB, 4800 * GB, "H200 NVL page: 1671 TFLOP/s sparse bf16, 141 GB"),
    ChipSpec("b200", "gpu", 2250e12, 180 * GB, 7700 * GB, "HGX B200: 4.5 PFLOP/s sparse bf16 per GPU, 180 GB"),
    ChipSpec("gb200", "gpu", 2500e12, 186 * GB, 8000 * GB, "GB200 NVL72: 5 PFLOP/s sparse bf16 per GPU, 186 GB"),
    ChipSpec("l40s", "gpu", 362e12, 48 * GB, 864 * GB, "L40S datasheet: 733 TFLOP/s sparse bf16, 48 GB"),
    ChipSpec("l4", "gpu", 121e12, 24 * GB, 300 * GB, "L4 datasheet: 242 TFLOP/s sparse bf16, 24 GB"),
)}

# device_kind (lower case) -> chip, tried in order: the first pattern found in the string wins, so more specific
# names come first ("h100 nvl" before "h100", "v5 lite" before "v5").
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"tpu\s*7x|tpu v7|ironwood", "tpu7x"),
    (r"tpu v6 ?lite|tpu v6e|trillium", "v6e"),
    (r"tpu v5 ?lite|tpu v5e", "v5e"),
    (r"tpu v5p?\b", "v5p"),
    (r"tpu v4", "v4"),
    (r"tpu v3", "v3"),
    (r"tpu v2", "v2"),
    (r"gh200", "gh200"),
    (r"gb200", "gb200"),
    (r"b200", "b200"),
    (r"h200 nvl", "h200-nvl"),
    (r"h200", "h200"),
    (r"h100 nvl", "h100-nvl"),
    (r"h100.*pcie", "h100-pcie"),
    (r"h100|h800", "h100-sxm"),
    (r"a100.*80", "a100-80gb"),
    (r"a100|a800", "a100-40gb"),
    (r"l40s", "l40s"),
    (r"\bl4\b", "l4"),
    (r"v100", "v100"),
)

# topology-name prefixes (before ":" / "_" / "-") -> chip
_TOPOLOGY_PREFIXES = {"v2": "v2", "v3": "v3", "v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5lite": "v5e",
                      "v5p": "v5p", "v6e": "v6e", "tpu7x": "tpu7x", "v7x": "tpu7x"}


def chip_for_device_kind(device_kind: str) -> Optional[ChipSpec]:
    """The chip of a ``device.device_kind`` string, or None (CPU, unknown accelerators)."""
    kind = device_kind.lower()
    for pattern, name in _KIND_PATTERNS:
        if re.search(pattern, kind):
            return CHIPS[name]
    return None


def parse_topology(topology: str) -> tuple[ChipSpec, tuple[int, ...]]:
    """("v5p:4x4x4" | "v5e:2x2" | "v4-8"-style names) -> (chip, chip grid). A "-N" suffix (Cloud TPU accelerator
    type, counting TensorCores for v2-v4 and v5p, chips for v5e/v6e) is returned as a 1-D grid of N."""
    m = re.fullmatch(r"([A-Za-z0-9]+?)[:_=-]([0-9x]+)(_twisted|_untwisted)?", topology.strip())
    if not m or m.group(1).lower() not in _TOPOLOGY_PREFIXES:
        raise ValueError(f"unknown TPU topology {topology!r}: expected GENERATION:AxBxC with GENERATION one of "
                         f"{sorted(_TOPOLOGY_PREFIXES)} (e.g. v5p:4x4x4, v5e:4x4, v6e:8x8)")
    chip = CHIPS[_TOPOLOGY_PREFIXES[m.group(1).lower()]]
    return chip, tuple(int(x) for x in m.group(2).split("x"))


def chip_for_topology(topology: str) -> ChipSpec:
    return parse_topology(topology)[0]


def devices_per_chip(devices: Sequence) -> int:
    """How many JAX devices share one chip (2 for TPU v2/v3 and non-megacore v4 topologies, else 1)."""
    coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices]
    if not devices or not all(coords):
        return 1
    slices = [getattr(d, "slice_index", 0) for d in devices]
    chips = len(set(zip(slices, coords)))
    return max(1, len(devices) // max(chips, 1))


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Peak figures of one JAX device (a chip, or a core where JAX splits chips)."""
    chip: Optional[ChipSpec]
    device_kind: str
    devices_per_chip: int = 1

    @property
    def peak_bf16_flops(self) -> Optional[float]:
        return None if self.chip is None else self.chip.peak_bf16_flops / self.devices_per_chip

    @property
    def hbm_bytes(self) -> Optional[int]:
        return None if self.chip is None else self.chip.hbm_bytes // self.devices_per_chip


def per_device(devices: Sequence, topology: Optional[str] = None) -> DeviceSpec:
    """Figures of one device of ``devices`` (by device_kind, else by topology name)."""
    kind = getattr(devices[0], "device_kind", "") if devices else ""
    chip = chip_for_device_kind(kind)
    if chip is None and topology:
        try:
            chip = chip_for_topology(topology)
        except ValueError:  # a GPU topology name ("h100:8"): its prefix is a device kind
            chip = chip_for_device_kind(topology.split(":")[0])
    return DeviceSpec(chip=chip, device_kind=kind, devices_per_chip=devices_per_chip(devices))


def live_hbm_bytes(device) -> Optional[int]:
    """Memory the runtime lets this live device use (``memory_stats()["bytes_limit"]``), if it reports one."""
    try:
        stats = device.memory_stats()
    except Exception:  # topology (compile-only) devices and some backends have none
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def mfu(flops_per_device: float, seconds: float, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    if seconds <= 0 or peak_flops_per_device <= 0 or not math.isfinite(seconds):
        raise ValueError(f"mfu: need positive time and peak, got {seconds} s and {peak_flops_per_device} FLOP/s")
    return flops_per_device / seconds / peak_flops_per_device
