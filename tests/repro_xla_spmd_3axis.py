"""Minimal pure-JAX repro: SPMD partitioner returns wrong values (no error) on a 3-axis mesh.

jax/jaxlib 0.10.2, CPU with 8 simulated devices; wrong with both Shardy (default) and GSPMD
(JAX_USE_SHARDY_PARTITIONER=false / jax_use_shardy_partitioner=False).

    y = x + (temb @ wa)[:, None] * (o @ wo),   constrained to P(("data", "fsdp"))

on a mesh data=2 x fsdp=2 x tensor=2 with
    o  : (B, S, D) sharded P(("data", "fsdp"), None, "tensor")   (e.g. an attention output, heads on "tensor")
    wo : (D, D)    sharded P("tensor", "fsdp")                   (a row-parallel, FSDP-sharded output projection)
    wa : (D, D)    sharded P(None, "tensor")                     (so temb @ wa is "tensor"-sharded on D)

After sharding propagation the dot ``o @ wo`` is annotated {devices=[4,1,2]<=[8]} (batch over data*fsdp, D over
tensor): correct. The SPMD partitioner then lowers it as
    collective-permute(o, {2<->4, 3<->5})       # batch now laid out over (fsdp, data) instead of (data, fsdp)
    dot(o', all-gather(wo over fsdp)) ; all-reduce over tensor ; dynamic-slice D by tensor index
and never permutes back, so devices (data=0, fsdp=1) and (data=1, fsdp=0) multiply the gate / add the residual of
batch row 1 with the projection of batch row 2 (and vice versa). Max relative error ~2 (expected ~1e-7).

Passes with: D=32 instead of 64; batch constrained to ("fsdp", "data"), "data" or "fsdp" alone; wo sharded
P("tensor", None) or P(None, "fsdp"); wa unsharded; no `x +`; any 2-axis mesh; or a sharding constraint that
gathers wo's fsdp axis before the dot (with_sharding_constraint(wo, P(P.UNCONSTRAINED, None))) or that replicates
the dot output's D.

Run: python xla_bug_repro.py   (prints the error for Shardy and GSPMD; add --hlo to print the partitioned HLO)
"""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402


def run(shardy: bool, workaround: bool = False, show_hlo: bool = False) -> float:
    jax.config.update("jax_use_shardy_partitioner", shardy)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rng = np.random.default_rng(0)
    B, S, D = 4, 24, 64
    x, o = rng.normal(size=(B, S, D)).astype(np.float32), rng.normal(size=(B, S, D)).astype(np.float32)
    temb = rng.normal(size=(B, D)).astype(np.float32)
    wa, wo = rng.normal(size=(D, D)).astype(np.float32), rng.normal(size=(D, D)).astype(np.float32)
    expected = x + (temb @ wa)[:, None] * (o @ wo)

    def f(x, o, temb, wa, wo):
        if workaround:
            wo = jax.lax.with_sharding_constraint(wo, NamedSharding(mesh, P(P.UNCONSTRAINED, None)))
        y = x + (temb @ wa)[:, None] * (o @ wo)
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(("data", "fsdp"))))

    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    args = (put(x, P()), put(o, P(("data", "fsdp"), None, "tensor")), put(temb, P()),
            put(wa, P(None, "tensor")), put(wo, P("tensor", "fsdp")))
    jitted = jax.jit(f)
    out = np.asarray(jitted(*args))
    if show_hlo:
        print(jitted.lower(*args).compile().as_text())
    return float(np.max(np.abs(out - expected)) / np.max(np.abs(expected)))


if __name__ == "__main__":
    print("jax", jax.__version__, "backend", jax.default_backend())
    for shardy in (True, False):
        err = run(shardy, show_hlo="--hlo" in sys.argv)
        print(f"{'Shardy' if shardy else 'GSPMD '}: max rel err {err:.2e} ({'WRONG' if err > 1e-4 else 'ok'})")
    for shardy in (True, False):
        print(f"{'Shardy' if shardy else 'GSPMD '} + fsdp-gather constraint on wo: max rel err "
              f"{run(shardy, workaround=True):.2e}")
