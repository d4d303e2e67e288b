"""``bifrost aot``: the command line over :func:`compile_target`."""
from __future__ import annotations

import json
import sys
from typing import Sequence


from bifrost_jax.aot.report import format_report
from bifrost_jax.aot.targets import compile_target
from bifrost_jax.aot.topology import GIB, AotUnavailable
from bifrost_jax.configs import parse_config_flags


USAGE = """usage: bifrost aot --config FILE --topology NAME [--phase NAME] [--num-slices N] [--hbm-gib G]
                   [--json PATH] [--hlo PATH] [--config.KEY=VALUE ...]

Compile a phase's step ahead of time for a device topology and report per-device memory, FLOPs, the compiler's
estimated step time and MFU. Exit status: 0 fits, 1 does not fit (or out of memory at compile time), 2 cannot
compile here (bad arguments, libtpu missing, GPU topology).

  --topology  TPU topology as libtpu names it (v5p:4x4x4, v5e:4x4, v6e:8x8, v4:4x4x4; needs libtpu:
              pip install -e '.[tpu]'), cpu[:N] (this host's CPU devices), local (jax.devices(), e.g. GPUs), or a
              GPU topology h100:8 / h100:4x8 (needs the CUDA PJRT plugin and, without a GPU, a
              GpuTargetConfigProto in $BIFROST_GPU_TARGET_CONFIG; refused with JAX's reason otherwise)
  --phase     an aot target or a training phase (default: config.phase)
  --num-slices  TPU multislice: N slices of --topology (the config's mesh sets dcn_* axes)
  --hbm-gib   check the fit against this many GiB per device instead of the chip table
  --json      also write the report as JSON to PATH
  --hlo       also write the compiled (optimized, partitioned) HLO text to PATH"""


def main(argv: Sequence[str] | None = None) -> int:

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        config, extra = parse_config_flags(argv, extra_string_flags=("topology", "phase", "num-slices", "hbm-gib",
                                                                     "json", "hlo"))
        if not extra["topology"]:
            raise ValueError("missing --topology (e.g. v5p:4x4x4, cpu:8, local)")
        num_slices = int(extra["num-slices"] or 1)
        hbm = int(float(extra["hbm-gib"]) * GIB) if extra["hbm-gib"] else None
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
