"""DPG-Bench image generation (the official release's second generation benchmark), sharded and resumable.

Input: a folder of prompt files ``<name>.txt`` (the benchmark's 1,065 prompts; a README there is ignored).
Output, what DPG-Bench's scorer reads: ``OUT/<name>.png``, a 2x2 grid of four images of the same resolution with
NO padding, so that the scorer's crops at multiples of the resolution give back exactly the four images. (The
official Bifrost-1 script pads its grids by 2 px, so the scorer's crops of its files are shifted by 2-4 px and
include white padding.)

Every prompt has its own seed (``prompt_seed(seed, name)``: the images depend on the prompt and ``--seed`` only, not
on the host or the batch it was drawn in). Prompts are dealt round-robin to the hosts (``geneval.assigned``), each
PNG is written atomically, so a prompt is finished iff its PNG exists and a rerun of the same command skips it.
Each host appends what it generated to ``OUT/.dpg_log/process_<i>.jsonl``.
"""
from __future__ import annotations

import os
import zlib
from typing import Callable, Optional, Sequence

import numpy as np

from bifrost_jax.eval.geneval import generate_assigned
from bifrost_jax.sample.images import make_grid, save_png

IMAGES_PER_PROMPT = 4
LOG_DIR = ".dpg_log"
GenerateFn = Callable[[Sequence[str], int, Sequence[int]], np.ndarray]  # (prompts, 4, seeds) -> uint8 (P*4, H, W, 3)


def read_prompts(folder: str, limit: Optional[int] = None) -> list[tuple[str, str]]:
    """[(name, prompt)] of every ``<name>.txt`` in ``folder``, sorted by name (first ``limit``)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"DPG-Bench prompts: {folder} is not a directory")
    out = []
    for f in sorted(os.listdir(folder)):
        if not f.endswith(".txt"):
            continue
        with open(os.path.join(folder, f), encoding="utf-8") as fh:
            text = fh.read().strip()
        if not text:
            raise ValueError(f"DPG-Bench prompts: {os.path.join(folder, f)} is empty")
        out.append((f[:-len(".txt")], text))
    if not out:
        raise ValueError(f"DPG-Bench prompts: no <name>.txt files in {folder}")
    return out[:limit] if limit is not None else out


def prompt_seed(seed: int, name: str) -> int:
    """The seed of one prompt: a function of the run's seed and the prompt's name only."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 31)


def grid_path(out: str, name: str) -> str:
    return os.path.join(out, f"{name}.png")


def run_dpg(generate_fn: GenerateFn, prompts: Sequence[tuple[str, str]], out: str, *, seed: int, batch_size: int,
            process_index: int = 0, process_count: int = 1, progress: bool = True) -> list[str]:
    """Generate this host's unfinished prompts; returns the names generated now."""
    k = IMAGES_PER_PROMPT
    done = generate_assigned(
        "dpg", len(prompts), out, is_finished=lambda i: os.path.isfile(grid_path(out, prompts[i][0])),
        generate=lambda idx: generate_fn([prompts[i][1] for i in idx], k,
                                         [prompt_seed(seed, prompts[i][0]) for i in idx]),
        write=lambda i, images: save_png(grid_path(out, prompts[i][0]), make_grid(images, cols=2, pad=0)),
        images_per_prompt=k, batch_size=batch_size, process_index=process_index, process_count=process_count,
        log_dir=LOG_DIR, log_fields=lambda i: {"name": prompts[i][0]}, progress=progress)
    return [prompts[i][0] for i in done]


def missing_prompts(out: str, prompts: Sequence[tuple[str, str]]) -> list[str]:
    return [name for name, _ in prompts if not os.path.isfile(grid_path(out, name))]
