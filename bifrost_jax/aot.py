"""``bifrost aot``: compile a step ahead of time for a TPU topology (on a CPU-only machine) and report per-device
memory, FLOPs, the compiler's estimated step time and MFU, and whether it fits the chip's HBM.

    bifrost aot --config configs/x.py --topology v5p:4x4x4 [--phase NAME] [--num_slices 2] [--config.k=v ...]

The generic core is :func:`compile_for_topology` (a function, its abstract arguments, a shardings builder and a
topology name -> :class:`AotReport`); :func:`format_report` prints it and ``AotReport.fits`` is the HBM check.
What can be compiled by name is a registry: ``register_aot_target(name, builder)`` with
``builder(config, mesh) -> (jitted_fn, abstract_args)`` (or an :class:`AotTarget`), the abstract arguments being
``jax.ShapeDtypeStruct``s carrying their shardings on ``mesh``. Built in:

* every training phase of ``bifrost_jax.train.phases.PHASES`` (``--phase`` defaults to ``config.phase``): the real
  train step of ``train/state.py`` (optimizer, frozen weights, donated state, gradient accumulation) with the
  config's mesh and global batch: exactly what ``bifrost train`` would compile;
* ``flux-forward``: the FLUX transformer's loss forward + backward (``configs/flux_aot.py``), proving the path
  on the largest model without any training code.

Topologies: TPU names as libtpu takes them ("v5p:2x2x1", "v5e:4x4", "v6e:8x8", "v4:4x4x4"; multislice with
``--num_slices``), which needs libtpu (``pip install -e '.[tpu]'``); "cpu" / "cpu:N" (this host's CPU devices:
the same code path, used by the tests) and "local" (``jax.devices()``: on a GPU host, the real GPU compile).
GPU names ("h100:8", "h100:4x8" = 4 hosts of 8; "h200:N", "a100:N") compile without a GPU through the CUDA PJRT
plugin (``pip install -e '.[gpu-aot]'``; JAX 0.10 has no GPU topology of its own) and a ``GpuTargetConfigProto``
describing the GPU model, shipped in ``bifrost_jax/data_files/gpu_target_configs/`` (``BIFROST_GPU_TARGET_CONFIG``
overrides): the real XLA GPU pipeline down to PTX and ptxas, real per-GPU memory, no cost model (no XLA FLOPs or
step time). Without the plugin (this project's CPU venv) the name is refused with JAX's message and the install
line. See :func:`gpu_topology_devices`.

Counting caveat: XLA's cost analysis (FLOPs and the TPU compiler's ``optimal_seconds``) counts the body of a while
loop once, whatever its trip count, so scanned layers (``scan_layers=True``) and gradient-accumulation scans are
undercounted. The report therefore also counts the matmul/convolution FLOPs of the traced program with every scan
multiplied by its length, and scales the compiler's time by the ratio when that is larger.

Analytic cross-check: targets carry the analytic model FLOPs of ``bifrost_jax/parallel/flops.py`` (training phases:
``Phase.analytic_flops``; ``flux-forward``; ``generate``), printed beside the counted FLOPs with their ratio and a
per-module table; MFU uses them (model FLOPs: no remat recomputation, no elementwise work). Pallas splash-attention
kernels carry no cost estimate, so neither XLA's nor the counted FLOPs nor the compiler's time include attention
when they are used: the report then marks the attention FLOPs as analytic-only and adds their time at peak to the
step time MFU is computed from (a lower bound on the kernels' time, so that MFU is an upper bound).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bifrost_jax.parallel import devices as devspec
from bifrost_jax.parallel.rules import axis_rules

GIB = 1024 ** 3
TPU_INSTALL_HINT = "pip install -e '.[tpu]'"


class AotUnavailable(RuntimeError):
    """The requested topology cannot be compiled for on this machine (the message says why and what to do)."""


# --------------------------------------------------------------------------------------------------------------
# Topologies
# --------------------------------------------------------------------------------------------------------------
_GPU_NAMES = re.compile(r"^(gpu|cuda|rocm|nvidia|[ahbl]\d{2,3}|gh200|gb200|v100)", re.IGNORECASE)


def topology_devices(topology: str, *, num_slices: int = 1) -> list:
    """The devices of ``topology``: TPU topology devices (compile-only), this host's CPU devices ("cpu",
    "cpu:N") or ``jax.devices()`` ("local")."""
    name = topology.strip()
    if name == "local":
        return list(jax.devices())
    if name == "cpu" or name.startswith("cpu:"):
        cpus = jax.devices("cpu")
        n = int(name.split(":", 1)[1]) if ":" in name else len(cpus)
        if n > len(cpus):
            raise AotUnavailable(f"topology {name}: this host has {len(cpus)} CPU devices (raise it with "
                                 f"XLA_FLAGS=--xla_force_host_platform_device_count={n})")
        return list(cpus[:n])
    if _GPU_NAMES.match(name):
        return gpu_topology_devices(name)
    devspec.parse_topology(name)  # a clear error for names that are not TPU topologies
    if importlib.util.find_spec("libtpu") is None:
        raise AotUnavailable(f"topology {name}: compiling for TPU needs libtpu, which is not installed here. "
                             f"Install it with: {TPU_INSTALL_HINT}")
    from jax.experimental import topologies

    # A topology description uses no chip, so several compile-only processes (or one beside a TPU job) may load
    # libtpu at once; without this libtpu refuses on its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)
    except Exception as e:  # libtpu rejects the name, or cannot start
        raise AotUnavailable(f"topology {name}: libtpu could not describe it: {e}") from e
    return list(desc.devices)


GPU_TARGET_CONFIG_ENV = "BIFROST_GPU_TARGET_CONFIG"
GPU_AOT_INSTALL_HINT = "pip install -e '.[gpu-aot]'"
# GPU models we ship a GpuTargetConfigProto for (bifrost_jax/data_files/gpu_target_configs/): the KIND of
# "KIND:N" -> file. Any other GPU: BIFROST_GPU_TARGET_CONFIG=path of a text proto for it.
GPU_TARGET_CONFIGS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb", "a100": "a100_sxm_80.txtpb"}
GPU_TARGET_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_files", "gpu_target_configs")


def gpu_target_config_path(kind: str) -> Optional[str]:
    """The ``GpuTargetConfigProto`` text file for GPU model ``kind`` ("h100", ...): ``$BIFROST_GPU_TARGET_CONFIG``
    when set (whatever the kind), else the one shipped for ``kind``, else None."""
    path = os.environ.get(GPU_TARGET_CONFIG_ENV, "")
    if path:
        return path
    name = GPU_TARGET_CONFIGS.get(kind.lower())
    return os.path.join(GPU_TARGET_CONFIG_DIR, name) if name else None


def _compile_only_platforms() -> None:
    """Keep the CUDA plugin from starting a GPU backend in this process. The plugin's initialisation checks the
    CUDA runtime libraries (absent on a GPU-less host: it then registers nothing, so no "cuda" topology either)
    unless the platforms JAX was asked for exclude CUDA; a topology needs no client. Only before JAX has
    started its backends, and only when nobody chose the platforms (JAX_PLATFORMS / jax_platforms)."""
    from jax._src import xla_bridge

    if not jax.config.jax_platforms and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def gpu_topology_devices(name: str) -> list:
    """Compile-only devices of a GPU topology "KIND:N" or "KIND:HOSTSxN" (e.g. "h100:8", "h100:4x8"): no GPU needed,
    but the CUDA PJRT plugin (``pip install -e '.[gpu-aot]'``); else :class:`AotUnavailable` saying why.

    How (checked with jax / jaxlib / jax-cuda12-plugin 0.10.2 on a CPU-only host): JAX has no GPU topology of its
    own; ``jax.experimental.topologies.get_topology_desc(platform="cuda", topology_name=..., **options)`` hands
    the options to the plugin, whose topology factory (XLA ``PJRT_GpuDeviceTopology_Create``) reads two of them:
    ``target_config``, a ``stream_executor.GpuTargetConfigProto`` in text form describing the GPU model (without
    it the plugin asks the local GPUs: "No visible GPU devices"), and ``topology``,
    "PARTITIONS x HOSTS x GPUS_PER_HOST" (without it: "Cannot create topology without an explicit topology shape
    or without a client"; ``topology_name`` itself is ignored). The config is the file shipped for KIND
    (:data:`GPU_TARGET_CONFIGS`: H100 SXM 80 GB, H200 141 GB, A100 SXM 80 GB) or ``$BIFROST_GPU_TARGET_CONFIG``.
    XLA then compiles "deviceless": the whole GPU pipeline (SPMD partitioning, fusion, scheduling, LLVM -> PTX
    -> ptxas for sm_90a), so memory_analysis is the real per-GPU figure; cost_analysis is None (no FLOPs, no
    time estimate). What it cannot check without a GPU: cuDNN custom calls (fused attention) are lowered and
    scheduled but their cuDNN graphs are built only on a GPU (XLA's CuDnnWorkspaceRewriter needs a stream
    executor), so their workspace is counted as 0 bytes and cuDNN's own support checks run at load time.
    Multi-host names ("h100:4x8") give devices of 4 processes, compiled for from this one. On a GPU host
    ``--topology local`` compiles for its own GPUs."""
    m = re.fullmatch(r"([A-Za-z0-9]+)(?:[-_]\w+)?:(?:(\d+)x)?(\d+)", name)
    if not m:
        raise AotUnavailable(f"topology {name}: GPU topologies are written KIND:GPUS or KIND:HOSTSxGPUS_PER_HOST "
                             "(e.g. h100:8, h100:4x8)")
    kind, hosts, per_host = m.group(1).lower(), int(m.group(2) or 1), int(m.group(3))
    path = gpu_target_config_path(kind)
    if path is None:
        raise AotUnavailable(
            f"topology {name}: no GPU target config for {kind!r} (shipped: {', '.join(sorted(GPU_TARGET_CONFIGS))}). "
            f"Set {GPU_TARGET_CONFIG_ENV} to a stream_executor.GpuTargetConfigProto text file describing that GPU "
            "(XLA's xla/backends/gpu/target_config/specs/ has several; on a host with the GPU, "
            "--xla_dump_to writes one as *.gpu_target_config.pbtxt)")
    with open(path) as f:
        target_config = f.read()
    _compile_only_platforms()
    from jax.experimental import topologies

    shape = f"1x{hosts}x{per_host}"
    try:
        desc = topologies.get_topology_desc(platform="cuda", topology_name=shape, target_config=target_config,
                                            topology=shape)
    except NotImplementedError as e:  # no CUDA plugin registered
        raise AotUnavailable(
            f"topology {name}: JAX {jax.__version__} cannot compile for a GPU without the CUDA PJRT plugin, which "
            f"is not installed (or did not register) here: jax.experimental.topologies.get_topology_desc("
            f"platform='cuda') raised {type(e).__name__}: {e}. Install it with: {GPU_AOT_INSTALL_HINT} (no GPU "
            "needed). If it is installed, run with JAX_PLATFORMS=cpu: without a GPU the plugin registers only when "
            "CUDA is not among the requested platforms. On a GPU host use --topology local to compile for its "
            "GPUs with the config's mesh.") from e
    except Exception as e:  # the plugin rejects the config or the shape
        raise AotUnavailable(f"topology {name}: the CUDA PJRT plugin could not describe it from {path}: "
                             f"{type(e).__name__}: {e}") from e
    return list(desc.devices)


# JAX's GPU client preallocates this fraction of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75)
# and allocates from that pool only: a program that fits the HBM may still not fit the default pool.
JAX_GPU_MEM_FRACTION_DEFAULT = 0.75


def gpu_compile_only_notes(report: "AotReport", hlo: str) -> list[str]:
    """What a compile for GPU topology devices (no GPU present) leaves out of the report."""
    notes = ["compiled for the GPU model without a GPU (deviceless XLA compile): XLA's GPU compiler gives no cost "
             "analysis, so no XLA FLOPs or step time; memory figures are the compiler's buffer assignment"]
    cudnn = len(re.findall(r'custom_call_target="__cudnn\$', hlo))
    if cudnn:
        notes.append(f"{cudnn} cuDNN custom call(s) (fused attention, convolutions): lowered and scheduled, but "
                     "without a GPU XLA neither builds their cuDNN graphs nor autotunes them, so their workspaces "
                     "(0 bytes here) are missing from the memory figures and cuDNN's own support checks run only "
                     "when the program is loaded on a GPU")
    if report.hbm_bytes and JAX_GPU_MEM_FRACTION_DEFAULT * report.hbm_bytes < report.total_bytes <= report.hbm_bytes:
        need = report.total_bytes / report.hbm_bytes
        notes.append(f"needs {100 * need:.0f}% of the GPU's memory; JAX's GPU client uses "
                     f"{100 * JAX_GPU_MEM_FRACTION_DEFAULT:.0f}% unless told otherwise: run it with "
                     f"XLA_PYTHON_CLIENT_MEM_FRACTION={min(0.99, math.ceil(need * 100 + 2) / 100):.2f} or more")
    return notes


# --------------------------------------------------------------------------------------------------------------
# Counting FLOPs in a jaxpr (scans multiplied by their length)
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CountedFlops:
    flops: float = 0.0               # global (all devices) matmul + convolution FLOPs
    unknown_trip_loops: int = 0      # while loops (trip count unknown: body counted once)
    uncounted_kernels: int = 0       # Pallas / custom kernels without a cost estimate


def _sub_jaxprs(params: Mapping[str, Any]):
    from jax.extend import core as jcore

    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, jcore.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jcore.Jaxpr):
                yield v


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[i] for i in lhs_contract)


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_feature_dim = dn.rhs_spec[0]
    # each output element: one multiply-add per (input feature of its group x kernel tap); with lhs dilation (the
    # input gradient of a strided conv) only 1 / dilation of the taps meet a real input element per spatial axis
    dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
    return 2.0 * math.prod(out) * math.prod(rhs) / rhs[out_feature_dim] / dilation


def count_flops(jaxpr) -> CountedFlops:
    """Matmul and convolution FLOPs of a (closed) jaxpr over all devices: scans count ``length`` times,
    ``shard_map`` bodies once per shard, ``cond`` its costliest branch."""
    from jax.extend import core as jcore

    result = CountedFlops()

    def walk(jx, mult: float) -> None:
        for eqn in jx.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                result.flops += mult * _dot_flops(eqn)
            elif name == "conv_general_dilated":
                result.flops += mult * _conv_flops(eqn)
            elif name == "scan":
                walk(eqn.params["jaxpr"].jaxpr, mult * eqn.params["length"])
            elif name == "while":
                result.unknown_trip_loops += 1
                walk(eqn.params["body_jaxpr"].jaxpr, mult)
            elif name == "cond":
                best = None
                for branch in eqn.params["branches"]:
                    sub = CountedFlops()
                    saved = result.flops
                    walk(branch.jaxpr, mult)
                    sub.flops, result.flops = result.flops - saved, saved
                    best = sub.flops if best is None else max(best, sub.flops)
                result.flops += best or 0.0
            elif name == "shard_map":
                mesh = eqn.params["mesh"]
                manual = (eqn.params.get("newly_manual_axes") or eqn.params.get("manual_axes")
                          or mesh.axis_names)
                shards = math.prod(mesh.shape[a] for a in manual)
                walk(eqn.params["jaxpr"] if isinstance(eqn.params["jaxpr"], jcore.Jaxpr)
                     else eqn.params["jaxpr"].jaxpr, mult * shards)
            elif name == "pallas_call":
                estimate = eqn.params.get("cost_estimate")
                if estimate is not None and getattr(estimate, "flops", None):
                    result.flops += mult * float(estimate.flops)
                else:
                    result.uncounted_kernels += 1
            else:
                for sub in _sub_jaxprs(eqn.params):
                    walk(sub, mult)

    walk(jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr, 1.0)
    return result


# --------------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------------
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
    analytic_flops: Optional[float] = None   # analytic model FLOPs / devices (parallel/flops.py; no remat)
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


# --------------------------------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------------------------------
_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|[Oo]ut of memory|exceeds? .*memory", re.DOTALL)


def _cost_dict(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


# Custom calls the TPU cost model cannot price. The v6e ("TPU v6 lite") model of libtpu 0.0.42-0.0.52 prices each
# "ConcatBitcast" (a bitcast joining the pieces of an asynchronously sliced operand, emitted when the compiler
# prefetches slices of an input into VMEM) at -1 s, a sentinel that drags "optimal_seconds" of any real program
# below zero. The op moves no data (the slices' DMAs are priced on their own), so its true cost is taken as 0.
_SENTINEL_CUSTOM_CALLS = ("ConcatBitcast",)


def _hlo_computations(hlo: str) -> dict[str, str]:
    """Computation name -> its text, from an HLO module's text."""
    comps: dict[str, str] = {}
    for block in re.split(r"\n(?=\S[^\n]*\{\n)", hlo):
        m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)", block)
        if m and "{\n" in block:
            comps[m.group(1)] = block
    return comps


def _conditional_branch_computations(comps: Mapping[str, str]) -> set[str]:
    """The computations run only under a ``conditional`` (its branches and whatever they call)."""
    refs = lambda text: re.findall(r"%([\w.\-]+)", text)  # noqa: E731
    todo = []
    for text in comps.values():
        for group in re.findall(r"branch_computations=\{([^}]*)\}", text):
            todo += refs(group)
        todo += re.findall(r"(?:true|false)_computation=%([\w.\-]+)", text)
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        body = comps[name].split("\n", 1)[-1]
        todo += [r for r in refs(body) if r in comps]
    return seen


def corrected_optimal_seconds(raw: float, hlo: str) -> tuple[Optional[float], int, str]:
    """The compiler's step time with the cost model's -1 s sentinels removed, from the optimized HLO: every
    sentinel custom call outside a conditional is counted (the cost analysis counts each instruction once) and
    added back; one inside a conditional's branch counts only if that branch is the one the analysis priced (it
    takes one branch), which the HLO does not say, so those are added back only as far as the total needs to turn
    positive. Returns (seconds or None, sentinels added back, note). None when the result is still not positive:
    some other op carries a sentinel, and no estimate is better than a wrong one."""
    pattern = "|".join(re.escape(t) for t in _SENTINEL_CUSTOM_CALLS)
    count = lambda text: len(re.findall(r'custom_call_target="(?:%s)"' % pattern, text))  # noqa: E731
    total = count(hlo)
    comps = _hlo_computations(hlo) if total else {}
    in_branches = sum(count(comps[c]) for c in _conditional_branch_computations(comps)) if total else 0
    n = total - in_branches
    corrected = raw + n
    while corrected <= 0 and n < total:
        n, corrected = n + 1, corrected + 1
    if n and corrected > 0:
        return corrected, n, (f"the compiler's cost model priced {n} {'/'.join(_SENTINEL_CUSTOM_CALLS)} custom "
                              f"call(s) at its -1 s 'unknown' sentinel (optimal_seconds {raw:.4f}); they move no "
                              f"data and are counted as 0 s: estimate {corrected * 1e3:.3f} ms")
    if corrected > 0:
        return corrected, 0, ""
    if raw == 0 and not total:   # backends without a cost model (CPU) report 0
        return None, 0, ""
    return None, n, (f"the compiler's cost model returned optimal_seconds={raw:.4f} ({n} known sentinel op(s) "
                     f"added back: {corrected:.4f}); some op has no cost: step time unknown")


def compile_jitted(jitted, abstract_args: Sequence[Any], mesh: Mesh, *, target: str, topology: str,
                   hbm_bytes: Optional[int] = None, hlo_path: Optional[str] = None) -> AotReport:
    """Trace, lower and compile an already-jitted function (shardings in the jit or on the abstract arguments)
    under the logical-axis rules and ``mesh``, and analyse it. ``hlo_path``: also write the compiled (optimized,
    partitioned) HLO text there, e.g. to see which collectives the compiler placed where."""
    devices = list(mesh.devices.flat)
    spec = devspec.per_device(devices, topology)
    report = AotReport(target=target, topology=topology, platform=devices[0].platform, device_kind=spec.device_kind,
                       num_devices=len(devices), mesh_shape={k: int(v) for k, v in mesh.shape.items()},
                       peak_flops=spec.peak_bf16_flops, hbm_bytes=hbm_bytes or spec.hbm_bytes)
    if hbm_bytes is None and devices[0].platform != "tpu":
        report.hbm_bytes = devspec.live_hbm_bytes(devices[0]) or report.hbm_bytes
    if spec.devices_per_chip > 1:
        report.notes.append(f"{spec.devices_per_chip} devices per chip: peak and HBM are per device (chip / "
                            f"{spec.devices_per_chip})")
    start = time.perf_counter()
    with axis_rules(mesh):
        traced = jitted.trace(*abstract_args)
        lowered = traced.lower()
    counted = count_flops(traced.jaxpr)
    report.counted_flops = counted.flops / len(devices) if counted.flops else None
    report.uncounted_kernels = counted.uncounted_kernels
    if counted.uncounted_kernels:
        report.notes.append(f"{counted.uncounted_kernels} Pallas kernel call(s) (e.g. splash attention) have no "
                            "cost estimate: they are missing from XLA's and the counted FLOPs and from the "
                            "compiler's time estimate; the attention FLOPs shown are analytic (when the target "
                            "has an analytic count) and MFU adds their time at peak")
    try:
        compiled = lowered.compile()
    except Exception as e:
        report.compile_seconds = time.perf_counter() - start
        if _OOM.search(str(e)):
            report.error = "out of memory: " + str(e).strip().splitlines()[0][:2000]
            return report
        raise
    report.compile_seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    if mem is not None:
        report.argument_bytes = int(mem.argument_size_in_bytes)
        report.output_bytes = int(mem.output_size_in_bytes)
        report.alias_bytes = int(mem.alias_size_in_bytes)
        report.temp_bytes = int(mem.temp_size_in_bytes)
        report.generated_code_bytes = int(mem.generated_code_size_in_bytes)
    else:
        report.notes.append("this backend gives no memory analysis")
    cost = _cost_dict(compiled)
    report.xla_flops = float(cost["flops"]) if cost.get("flops") else None
    report.bytes_accessed = float(cost["bytes accessed"]) if cost.get("bytes accessed") else None
    try:
        hlo = compiled.as_text()
    except Exception:
        hlo = ""
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(hlo)
    if cost.get("optimal_seconds") is not None:
        report.xla_seconds_raw = float(cost["optimal_seconds"])
        report.xla_seconds, report.unknown_cost_ops, note = corrected_optimal_seconds(report.xla_seconds_raw, hlo)
        if note:
            report.notes.append(note)
    if report.platform == "gpu" and devspec.live_hbm_bytes(devices[0]) is None:
        report.notes.extend(gpu_compile_only_notes(report, hlo))
    report.has_loops = bool(re.search(r"\bwhile\(", hlo or ""))
    if report.has_loops:
        report.notes.append("the program has while loops (scanned layers / micro-batches): XLA's cost analysis "
                            "counts each loop body once; the counted FLOPs multiply scans by their length")
    if counted.unknown_trip_loops:
        report.notes.append(f"{counted.unknown_trip_loops} while loop(s) of unknown trip count counted once")
    if report.peak_flops is None:
        report.notes.append(f"no peak FLOP/s known for device kind {spec.device_kind!r}: MFU unknown")
    return report


def add_analytic(report: AotReport, breakdown) -> AotReport:
    """Put a ``FlopsBreakdown`` (global FLOPs of one call) on ``report``, per device."""
    if breakdown is None:
        return report
    n = report.num_devices
    report.analytic_flops = breakdown.total / n
    report.analytic_attention_flops = breakdown.attention / n
    report.analytic_table = breakdown.table(devices=n)
    return report


def make_topology_mesh(topology: str, mesh_sizes: Mapping[str, int] | None = None, *, num_slices: int = 1) -> Mesh:
    """A mesh over the devices of ``topology`` (``config.mesh``-style sizes, DCN factors for multislice)."""
    from bifrost_jax.parallel.multislice import mesh_from_config

    return mesh_from_config(mesh_sizes, topology_devices(topology, num_slices=num_slices))


def compile_for_topology(fn: Callable, abstract_args: Sequence[Any], topology: str, *,
                         shardings: Optional[Callable[[Mesh], tuple[Any, Any]]] = None,
                         mesh_sizes: Mapping[str, int] | None = None, num_slices: int = 1,
                         donate_argnums: Sequence[int] = (), name: Optional[str] = None,
                         hbm_bytes: Optional[int] = None, analytic=None) -> AotReport:
    """Compile ``fn`` for ``topology`` and report on it (the generic core of ``bifrost aot``).

    ``abstract_args``: ``jax.ShapeDtypeStruct``s (shardings on them are ignored when ``shardings`` is given).
    ``shardings(mesh) -> (in_shardings, out_shardings)`` builds the shardings once the mesh over the topology's
    devices exists (None: everything replicated in, compiler's choice out). ``mesh_sizes`` as ``config.mesh``
    (default: every device on "fsdp"). ``analytic``: a ``parallel.flops.FlopsBreakdown`` of one call (global)."""
    mesh = make_topology_mesh(topology, mesh_sizes, num_slices=num_slices)
    if shardings is None:
        replicated = NamedSharding(mesh, PartitionSpec())
        in_shardings, out_shardings = jax.tree.map(lambda _: replicated, tuple(abstract_args)), None
    else:
        in_shardings, out_shardings = shardings(mesh)
    args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tuple(abstract_args),
                        tuple(in_shardings))
    kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
    jitted = jax.jit(fn, in_shardings=tuple(in_shardings), donate_argnums=tuple(donate_argnums), **kwargs)
    report = compile_jitted(jitted, args, mesh, target=name or getattr(fn, "__name__", "fn"), topology=topology,
                            hbm_bytes=hbm_bytes)
    return add_analytic(report, analytic)


# --------------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AotTarget:
    fn: Any                          # a jax.jit-wrapped function (shardings in the jit or on the args)
    args: tuple                      # abstract arguments (ShapeDtypeStructs with shardings)
    description: str = ""
    analytic: Any = None             # bifrost_jax.parallel.flops.FlopsBreakdown of one call (global), or None


AotBuilder = Callable[[ml_collections.ConfigDict, Mesh], Any]

# name -> builder, or "module:function" imported on first use
AOT_TARGETS: dict[str, AotBuilder | str] = {
    "flux-forward": "bifrost_jax.aot:flux_forward_target",
    "generate": "bifrost_jax.aot_generate:generate_target",
}


def register_aot_target(name: str, builder: AotBuilder | str) -> None:
    """Make ``bifrost aot --phase NAME`` compile ``builder(config, mesh) -> (jitted_fn, abstract_args)``."""
    if name in AOT_TARGETS and AOT_TARGETS[name] != builder:
        raise ValueError(f"aot target {name!r} is already registered as {AOT_TARGETS[name]}")
    AOT_TARGETS[name] = builder


def _load(builder: AotBuilder | str) -> AotBuilder:
    if isinstance(builder, str):
        module, func = builder.split(":")
        return getattr(importlib.import_module(module), func)
    return builder


def _as_target(built: Any) -> AotTarget:
    if isinstance(built, AotTarget):
        return built
    fn, args = built
    return AotTarget(fn=fn, args=tuple(args))


def train_step_target(config: ml_collections.ConfigDict, mesh: Mesh) -> AotTarget:
    """The training step of ``config.phase`` exactly as ``bifrost train`` builds it."""
    from bifrost_jax.train.phases import get_phase
    from bifrost_jax.train.state import StateBuilder, jit_train_step, make_optimizer, make_train_step

    phase = get_phase(config)
    batch, accum = int(config.train.batch_size), int(config.train.grad_accum_steps)
    rows = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if accum < 1 or batch % accum or (batch // accum) % rows:
        raise ValueError(f"train.batch_size={batch} with grad_accum_steps={accum} does not shard over "
                         f"data*fsdp={rows} devices of this mesh")
    tx, schedule = make_optimizer(config.optim, int(config.train.steps))
    ema_decay = float(config.optim.ema_decay)
    builder = StateBuilder(phase, tx, mesh, seed=int(config.seed), ema=ema_decay > 0)
    step = jit_train_step(make_train_step(phase, tx, schedule, grad_accum_steps=accum, ema_decay=ema_decay),
                          builder, batch)
    args = (builder.abstract_state, builder.abstract_frozen, builder.abstract_batch(batch))
    return AotTarget(fn=step, args=args, description=f"train step of phase {phase.name!r}, global batch {batch}",
                     analytic=phase.analytic_flops(batch))


def flux_forward_target(config: ml_collections.ConfigDict, mesh: Mesh) -> AotTarget:
    """FLUX transformer forward + backward of a flow-matching MSE loss (gradients of every parameter).

    Reads ``config.model.flux`` (FluxConfig fields; default FLUX.1-dev), ``config.model.scan_layers`` (True),
    ``remat_policy`` ("full"), ``param_dtype`` ("float32"), ``config.data.image_size`` (512: (size/16)^2 image
    tokens), ``config.data.max_text_length`` (512) and ``config.train.batch_size``."""
    import flax.linen as nn

    from bifrost_jax.models.flux.transformer import FluxConfig, FluxTransformer2DModel
    from bifrost_jax.parallel.rules import logical_to_mesh_spec, tree_shardings

    model_cfg = config.get("model", ml_collections.ConfigDict())
    data_cfg = config.get("data", ml_collections.ConfigDict())
    fields = dict(model_cfg.get("flux", None) or {"guidance_embeds": True})
    flux_cfg = FluxConfig(**fields)
    model = FluxTransformer2DModel(flux_cfg, dtype=jnp.bfloat16,
                                   param_dtype=jnp.dtype(model_cfg.get("param_dtype", "float32")),
                                   scan_layers=bool(model_cfg.get("scan_layers", True)),
                                   remat_policy=str(model_cfg.get("remat_policy", "full")))
    size = int(data_cfg.get("image_size", 512))
    img_len, txt_len = (size // 16) ** 2, int(data_cfg.get("max_text_length", 512))
    b = int(config.train.batch_size)
    n_axes = len(flux_cfg.axes_dims_rope)
    batch = dict(hidden_states=(b, img_len, flux_cfg.in_channels),
                 encoder_hidden_states=(b, txt_len, flux_cfg.joint_attention_dim),
                 pooled_projections=(b, flux_cfg.pooled_projection_dim), timestep=(b,),
                 img_ids=(img_len, n_axes), txt_ids=(txt_len, n_axes), target=(b, img_len, flux_cfg.output_channels))
    if flux_cfg.guidance_embeds:
        batch["guidance"] = (b,)
    batch_specs = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in batch.items()}

    def axes(name, shape):
        return (None,) * len(shape) if name.endswith("_ids") else ("batch",) + (None,) * (len(shape) - 1)

    dummy = model.dummy_inputs(batch=1)
    with axis_rules(mesh):
        boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **dummy))
    param_shardings = tree_shardings(nn.get_partition_spec(boxed), mesh)["params"]
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed)["params"], param_shardings)
    batch_shardings = {k: NamedSharding(mesh, logical_to_mesh_spec(axes(k, v.shape))) for k, v in
                       batch_specs.items()}
    batch_args = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_shardings[k])
                  for k, v in batch_specs.items()}

    def loss_and_grads(params, batch):
        def loss_fn(p):
            inputs = {k: v for k, v in batch.items() if k != "target"}
            pred = model.apply({"params": p}, **inputs)
            return jnp.mean(jnp.square(pred.astype(jnp.float32) - batch["target"]))
        return jax.value_and_grad(loss_fn)(params)

    fn = jax.jit(loss_and_grads, in_shardings=(param_shardings, batch_shardings),
                 out_shardings=(NamedSharding(mesh, PartitionSpec()), param_shardings))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    from bifrost_jax.parallel import flops as flops_lib

    analytic = flops_lib.FlopsBreakdown(tuple(flops_lib.flux_transformer_parts(flux_cfg, b, img_len, txt_len,
                                                                                mode="train")),
                                        f"flux-forward, batch {b}")
    return AotTarget(fn=fn, args=(params, batch_args),
                     description=f"FLUX forward+backward, {n_params / 1e9:.2f}B params, batch {b}, "
                                 f"{img_len} image + {txt_len} text tokens", analytic=analytic)


def resolve_target(name: Optional[str], config: ml_collections.ConfigDict) -> tuple[str, AotBuilder]:
    """(display name, builder) for ``--phase NAME`` (default: ``config.phase``)."""
    from bifrost_jax.train.phases import PHASES

    phase = config.get("phase", "") or ""
    name = name or phase
    if not name:
        raise ValueError("no --phase given and the config sets no phase; targets: "
                         f"{sorted(AOT_TARGETS)} and training phases {sorted(PHASES)}")
    if name in AOT_TARGETS:
        return name, _load(AOT_TARGETS[name])
    if name in PHASES:
        if name != phase:
            raise ValueError(f"--phase {name}: the config is for phase {phase!r}; pass a config of phase "
                             f"{name!r} (its model, data and batch settings are what gets compiled)")
        return f"train step of phase {name!r}", train_step_target
    raise ValueError(f"--phase {name!r} is neither an aot target {sorted(AOT_TARGETS)} nor a training phase "
                     f"{sorted(PHASES)} (phases register with register_aot_target or train.phases.register_phase)")


def compile_target(name: Optional[str], config: ml_collections.ConfigDict, topology: str, *, num_slices: int = 1,
                   hbm_bytes: Optional[int] = None, hlo_path: Optional[str] = None) -> AotReport:
    """Build a registered target for ``config`` on ``topology``'s mesh and compile it."""
    display, builder = resolve_target(name, config)
    mesh = make_topology_mesh(topology, dict(config.mesh), num_slices=num_slices)
    target = _as_target(builder(config, mesh))  # builders enter axis_rules themselves where they need it
    report = compile_jitted(target.fn, target.args, mesh, target=display, topology=topology, hbm_bytes=hbm_bytes,
                            hlo_path=hlo_path)
    add_analytic(report, target.analytic)
    if num_slices > 1:
        report.topology = f"{num_slices} x {topology}"
    if target.description:
        report.notes.insert(0, target.description)
    return report


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
USAGE = """usage: bifrost aot --config FILE --topology NAME [--phase NAME] [--num_slices N] [--hbm_gib G]
                   [--json PATH] [--hlo PATH] [--config.KEY=VALUE ...]

Compile a phase's step ahead of time for a device topology and report per-device memory, FLOPs, the compiler's
estimated step time and MFU. Exit status: 0 fits, 1 does not fit (or out of memory at compile time), 2 cannot
compile here (bad arguments, libtpu missing, GPU topology).

  --topology  TPU topology as libtpu names it (v5p:4x4x4, v5e:4x4, v6e:8x8, v4:4x4x4; needs libtpu:
              pip install -e '.[tpu]'), cpu[:N] (this host's CPU devices), local (jax.devices(), e.g. GPUs), or a
              GPU topology h100:8 / h100:4x8 (needs the CUDA PJRT plugin and, without a GPU, a
              GpuTargetConfigProto in $BIFROST_GPU_TARGET_CONFIG; refused with JAX's reason otherwise)
  --phase     an aot target or a training phase (default: config.phase)
  --num_slices  TPU multislice: N slices of --topology (the config's mesh sets dcn_* axes)
  --hbm_gib   check the fit against this many GiB per device instead of the chip table
  --json      also write the report as JSON to PATH
  --hlo       also write the compiled (optimized, partitioned) HLO text to PATH"""


def main(argv: Sequence[str] | None = None) -> int:
    from bifrost_jax.configs import parse_config_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        config, extra = parse_config_flags(argv, extra_string_flags=("topology", "phase", "num_slices", "hbm_gib",
                                                                     "json", "hlo"))
        if not extra["topology"]:
            raise ValueError("missing --topology (e.g. v5p:4x4x4, cpu:8, local)")
        num_slices = int(extra["num_slices"] or 1)
        hbm = int(float(extra["hbm_gib"]) * GIB) if extra["hbm_gib"] else None
        report = compile_target(extra["phase"], config, extra["topology"], num_slices=num_slices, hbm_bytes=hbm,
                                hlo_path=extra["hlo"] or None)
    except (AotUnavailable, ValueError) as e:
        print(f"bifrost aot: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if extra["json"]:
        with open(extra["json"], "w") as f:
            json.dump(report.to_dict(), f, indent=2, default=str)
    if report.fits is False:
        reason = report.error or (f"{report.total_bytes / GIB:.2f} GiB per device > "
                                  f"{report.hbm_bytes / GIB:.2f} GiB HBM")
        print(f"bifrost aot: does not fit: {reason}. Shard more (config.mesh), lower the batch, raise "
              f"train.grad_accum_steps or use a stronger remat policy.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
