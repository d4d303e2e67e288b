"""Which weights ``bifrost generate`` / ``bifrost eval`` will use, checked before anything is built: a missing
``--checkpoint`` is an error, and random weights are used only when asked for by name (``--random-weights``).

* ``--checkpoint WORKDIR`` must exist, some component must read a phase checkpoint from it
  (``config.<component>.phase``), and every such phase must have a committed checkpoint under it.
* A component whose weights would be random (``source="random"`` with no phase checkpoint to replace them) needs
  ``--random-weights``: without it the command stops naming the component, instead of writing noise with exit 0.
"""
from __future__ import annotations

import os
from typing import Optional

from bifrost_jax.train.checkpoint import checkpoint_dir

COMPONENTS = ("mllm", "transformer", "controlnet", "vae", "t5", "clip", "vision")


class WeightsError(ValueError):
    """The configured weights are missing, or random without ``--random-weights``."""


def _has_steps(root: str) -> bool:
    return os.path.isdir(root) and any(n.isdigit() for n in os.listdir(root))


def check_weight_sources(config, workdir: Optional[str], *, random_weights: bool, report=print) -> None:
    sections = {n: config[n] for n in COMPONENTS if n in config and config[n] is not None}
    if workdir is not None and not os.path.isdir(workdir):
        raise WeightsError(f"--checkpoint {workdir}: no such directory (a training WORKDIR holding "
                           f"<phase>/checkpoints)")
    phases = {n: s.get("phase", "") for n, s in sections.items() if s.get("phase", "")}
    if workdir is not None and not phases:
        raise WeightsError(f"--checkpoint {workdir} would not be used: no component of this config reads a phase "
                           f"checkpoint (set config.<component>.phase)")
    trained = set()
    for name, phase in phases.items():
        root = checkpoint_dir(workdir, phase) if workdir else None
        if root and _has_steps(root):
            trained.add(name)
        elif workdir and not random_weights:
            raise WeightsError(f"config.{name}.phase={phase!r}: no checkpoint in {root}; train that phase first, "
                               f"or pass --random-weights to use the configured {sections[name].get('source')!r} "
                               f"weights for {name}")
    random = [n for n, s in sections.items() if s.get("source", "") == "random" and n not in trained]
    if random and not random_weights:
        raise WeightsError(f"component(s) {random} would have random weights (source 'random' and no phase "
                           f"checkpoint): pass --random-weights to generate from random weights anyway, or give "
                           f"--checkpoint WORKDIR / ports in the config")
    if random:
        report(f"using RANDOM weights for {random} (--random-weights)")
