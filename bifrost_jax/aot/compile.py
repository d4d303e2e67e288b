"""Compiling a jitted function for a topology's mesh and filling an :class:`AotReport` (memory, cost analysis, the
v6e cost-model sentinel correction)."""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bifrost_jax.aot.counting import count_flops
from bifrost_jax.aot.report import AotReport
from bifrost_jax.aot.topology import gpu_compile_only_notes, topology_devices
from bifrost_jax.parallel.multislice import mesh_from_config
from bifrost_jax.parallel import devices as devspec
from bifrost_jax.parallel.rules import axis_rules


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
    (default: every device on "fsdp"). ``analytic``: a ``models.flops.FlopsBreakdown`` of one call (global)."""
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
