"""``bifrost port``: a local PyTorch checkpoint directory -> an Orbax checkpoint that training starts from."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax.numpy as jnp

from bifrost_jax import port
from bifrost_jax.port.orbax_io import save_ported


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="bifrost port",
                                description="Port a local PyTorch checkpoint directory into an Orbax checkpoint "
                                            "that training can start from.")
    p.add_argument("--kind", required=True, choices=port.KINDS)
    p.add_argument("--src", required=True, help="diffusers/transformers directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output directory (must not hold a previous port)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--base", default=None, help="bifrost-1 only: the Qwen2.5-VL directory for weights the "
                                                 "checkpoint omits (the vision tower)")
    args = p.parse_args(argv)
    kwargs = {"base": args.base} if args.base else {}
    _, variables = port.load(args.kind, args.src, dtype=getattr(jnp, args.dtype), **kwargs)
    save_ported(args.out, args.kind, variables, args.src)
    print(f"ported {args.kind} from {args.src} -> {args.out}")
    return 0
