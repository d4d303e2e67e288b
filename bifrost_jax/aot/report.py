"""The AOT report: per-device memory against HBM, XLA's and the counted FLOPs, the analytic model FLOPs, the
compiler's step time and MFU, and its text form."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional


from bifrost_jax.aot.topology import GIB
from bifrost_jax.parallel import devices as devspec


@dataclasses.dataclass
class AotReport:
    target: str
    topology: str
    platform: str
    device_kind: str
    num_devices: int
    mesh_shape: dict[str, int]
    compile_seconds: float = 0.0
    # memory per device (XLA memory analysis)
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    generated_code_bytes: int = 0
    hbm_bytes: Optional[int] = None          # the chip's memory per device (table, override or live)
    # compute per device and step
    xla_flops: Optional[float] = None        # XLA cost analysis of the partitioned program (loop bodies once)
    counted_flops: Optional[float] = None    # traced matmul/conv FLOPs / devices (scans x length)
    bytes_accessed: Optional[float] = None
    xla_seconds: Optional[float] = None      # the compiler's estimate (TPU "optimal_seconds"), corrected below
    xla_seconds_raw: Optional[float] = None  # "optimal_seconds" as the cost analysis returned it
    unknown_cost_ops: int = 0                # ops the cost model prices at its -1 s sentinel (added back)
    peak_flops: Optional[float] = None       # dense bf16 FLOP/s per device
    analytic_flops: Optional[float] = None   # analytic model FLOPs / devices (models/flops.py; no remat)
    analytic_attention_flops: Optional[float] = None  # their attention part (scores + value products)
    analytic_table: str = ""                 # the per-module breakdown, per device
    uncounted_kernels: int = 0               # Pallas calls without a cost estimate (splash attention)
    has_loops: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)
    error: Optional[str] = None              # compile failure, e.g. out of memory

    @property
    def total_bytes(self) -> int:
        """Per-device footprint: arguments + outputs - donated (aliased) + temporaries + code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.generated_code_bytes)

    @property
    def fits(self) -> Optional[bool]:
        """False on a compile out-of-memory or a footprint over HBM; None when the HBM size is unknown."""
        if self.error is not None:
            return False
        if self.hbm_bytes is None:
            return None
        return self.total_bytes <= self.hbm_bytes

    @property
    def flops(self) -> Optional[float]:
        """Best per-device FLOPs per step: the larger of XLA's count and the scan-aware count."""
        known = [f for f in (self.xla_flops, self.counted_flops) if f]
        return max(known) if known else None

    @property
    def estimated_seconds(self) -> Optional[float]:
        """The compiler's step-time estimate, scaled up by counted/XLA FLOPs when loops hid work from it."""
        if not self.xla_seconds:
            return None
        scale = 1.0
        if self.has_loops and self.xla_flops and self.counted_flops and self.counted_flops > self.xla_flops:
            scale = self.counted_flops / self.xla_flops
        return self.xla_seconds * scale

    @property
    def kernel_seconds_floor(self) -> float:
        """Time the compiler's estimate leaves out when attention runs in Pallas kernels without a cost estimate:
        their analytic FLOPs at the chip's peak (a lower bound on the kernels' time). All analytic attention is
        taken, including attention that stays on XLA (e.g. T5's, with its position bias), which the compiler did
        count: a small double count that makes MFU conservative by that share."""
        if not (self.uncounted_kernels and self.analytic_attention_flops and self.peak_flops):
            return 0.0
        return self.analytic_attention_flops / self.peak_flops

    @property
    def step_seconds(self) -> Optional[float]:
        """The estimated step time MFU uses: the compiler's (scaled for loops) + the uncounted kernels' floor."""
        est = self.estimated_seconds
        return None if est is None else est + self.kernel_seconds_floor

    @property
    def compiled_flops_utilisation(self) -> Optional[float]:
        """FLOPs the compiled program executes (``flops``: incl. remat recomputation, elementwise work) over
        estimated time x peak: a hardware-FLOPs utilisation."""
        if not (self.flops and self.estimated_seconds and self.peak_flops):
            return None
        return devspec.mfu(self.flops, self.estimated_seconds, self.peak_flops)

    @property
    def mfu(self) -> Optional[float]:
        """Model FLOPs utilisation at the estimated step time: analytic model FLOPs when known (else ``flops``)
        over ``step_seconds`` x peak."""
        model = self.analytic_flops or self.flops
        if not (model and self.step_seconds and self.peak_flops):
            return None
        return devspec.mfu(model, self.step_seconds, self.peak_flops)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(total_bytes=self.total_bytes, fits=self.fits, flops=self.flops,
                   estimated_seconds=self.estimated_seconds, step_seconds=self.step_seconds, mfu=self.mfu,
                   compiled_flops_utilisation=self.compiled_flops_utilisation)
        return out


def _gib(n: Optional[float]) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (right-aligned for the table)."""
    if n is None:
        return "unknown"
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:9.3f} {unit}"
    return f"{n:9.0f} B  "


def _sci(x: Optional[float], unit: str = "") -> str:
    return "unknown" if x is None else f"{x:.4g}{unit}"


def format_report(r: AotReport) -> str:
    mesh = ", ".join(f"{k}={v}" for k, v in r.mesh_shape.items())
    lines = [f"bifrost aot: {r.target} on {r.topology} ({r.num_devices} x {r.device_kind or r.platform}), "
             f"mesh {mesh}"]
    if r.error is not None:
        lines += ["", f"COMPILE FAILED after {r.compile_seconds:.1f} s: {r.error}"]
    else:
        lines.append(f"compiled in {r.compile_seconds:.1f} s")
        lines += ["", "memory per device:",
                  f"  arguments      {_gib(r.argument_bytes)}",
                  f"  outputs        {_gib(r.output_bytes)}",
                  f"  aliased (-)    {_gib(r.alias_bytes)}   (donated inputs reused as outputs)",
                  f"  temporaries    {_gib(r.temp_bytes)}",
                  f"  code           {_gib(r.generated_code_bytes)}"]
        total = f"  total          {_gib(r.total_bytes)}"
        if r.hbm_bytes:
            total += f" of {r.hbm_bytes / GIB:.2f} GiB HBM ({100 * r.total_bytes / r.hbm_bytes:.1f}%)"
        lines.append(total)
        lines += ["", "compute per device and step:",
                  f"  FLOPs (XLA cost analysis)       {_sci(r.xla_flops)}",
                  f"  FLOPs (counted, scans x length) {_sci(r.counted_flops)}"]
        if r.analytic_flops:
            ratio = (f"   (counted / analytic = {r.counted_flops / r.analytic_flops:.3f})"
                     if r.counted_flops else "")
            lines.append(f"  FLOPs (analytic model count)    {_sci(r.analytic_flops)}{ratio}")
            if r.uncounted_kernels and r.analytic_attention_flops:
                lines.append(f"    of which attention (analytic) {_sci(r.analytic_attention_flops)}   <- the Pallas "
                             "kernels report no cost: these FLOPs are ANALYTIC only")
        else:
            lines.append("  FLOPs (analytic model count)    unknown (no analytic count for this target)")
        lines.append(f"  bytes accessed (XLA)            {_sci(r.bytes_accessed)}")
        if r.xla_seconds:
            lines.append(f"  compiler's step time estimate   {r.xla_seconds * 1e3:.3f} ms")
            if r.estimated_seconds != r.xla_seconds:
                lines.append(f"  scaled for loop trip counts     {r.estimated_seconds * 1e3:.3f} ms")
            if r.kernel_seconds_floor:
                lines.append(f"  + kernels' attention at peak    {r.kernel_seconds_floor * 1e3:.3f} ms   (not in the "
                             f"compiler's estimate) = {r.step_seconds * 1e3:.3f} ms")
        else:
            lines.append("  step time estimate              unknown (this backend gives none)")
        lines.append(f"  peak bf16                       "
                     + ("unknown" if r.peak_flops is None else f"{r.peak_flops / 1e12:.1f} TFLOP/s"))
        basis = "analytic model FLOPs" if r.analytic_flops else "compiled FLOPs"
        lines.append(f"  MFU at the estimated time       " + ("unknown" if r.mfu is None else
                                                             f"{100 * r.mfu:.1f}%   ({basis})"))
        if r.analytic_flops and r.compiled_flops_utilisation is not None:
            lines.append(f"  compiled-FLOPs utilisation      {100 * r.compiled_flops_utilisation:.1f}%   (incl. remat "
                         "recomputation and elementwise work)")
    if r.notes:
        lines += ["", "notes:"] + [f"  - {n}" for n in r.notes]
    if r.analytic_table:
        lines += ["", r.analytic_table]
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "fit unknown (no HBM size for this device)"}[r.fits]
    lines += ["", f"verdict: {verdict}"]
    return "\n".join(lines)


@dataclasses.dataclass
class AotTarget:
    fn: Any                          # a jax.jit-wrapped function (shardings in the jit or on the args)
    args: tuple                      # abstract arguments (ShapeDtypeStructs with shardings)
    description: str = ""
    analytic: Any = None             # bifrost_jax.models.flops.FlopsBreakdown of one call (global), or None
