"""FLOPs of a traced program's matmuls and convolutions with every scan multiplied by its trip count (XLA's cost
analysis counts a while-loop body once)."""
from __future__ import annotations

import dataclasses

import math
from typing import Any, Mapping




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
