"""GenEval image generation, sharded over hosts and resumable (docs/design.md §10.1).

Layout (what GenEval's ``evaluate_images.py`` reads), for prompt ``index`` of ``evaluation_metadata.jsonl``::

    OUT/<index:05d>/metadata.jsonl          the prompt's JSON line, unchanged
    OUT/<index:05d>/samples/<i:04d>.png     num_images samples
    OUT/<index:05d>/grid.png                optional

Prompts are dealt round-robin to the hosts (``index % process_count == process_index``); each host generates its
share in batches of ``batch_size`` prompts on its local devices (the pipeline's mesh shards a batch over them), so
hosts never wait on each other until the final barrier. Every file is written atomically (temporary file + rename)
and ``metadata.jsonl`` LAST, so a prompt is finished iff its metadata file exists together with all its samples:
rerunning the same command skips finished prompts and redoes the rest. Since the pipeline seeds every prompt the
same way (``sample.pipeline``), the images do not depend on how prompts were distributed or batched.

Each host appends the indices it generated to ``OUT/.geneval_log/process_<i>.jsonl`` (a record of who did what).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from bifrost_jax.configs import flatten_dotted
from bifrost_jax.data.preprocess import CorruptImageError, decode_image
from bifrost_jax.sample.images import make_grid, save_png

GenerateFn = Callable[[Sequence[str], int, int], np.ndarray]  # (prompts, num_images, seed) -> uint8 (P*K, H, W, 3)
LOG_DIR = ".geneval_log"
SETTINGS_FILE = "run_settings.json"


def read_prompts(path: str, limit: Optional[int] = None) -> list[tuple[str, dict]]:
    """[(raw JSON line, parsed)] of an ``evaluation_metadata.jsonl`` (first ``limit`` lines)."""
    out = []
    with open(path) as fh:
        for n, line in enumerate(fh):
            line = line.strip()
            if not line:
                continue
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n + 1}: not a JSON line ({e})") from None
            if "prompt" not in meta:
                raise ValueError(f"{path}:{n + 1}: no 'prompt' field")
            out.append((line, meta))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def prompt_dir(out: str, index: int) -> str:
    return os.path.join(out, f"{index:05d}")


def sample_path(out: str, index: int, i: int) -> str:
    return os.path.join(prompt_dir(out, index), "samples", f"{i:04d}.png")


def decodable(path: str) -> bool:
    """The file exists and decodes completely as an image."""
    try:
        with open(path, "rb") as fh:
            decode_image(fh.read(), name=path)
        return True
    except (OSError, CorruptImageError):
        return False


def is_finished(out: str, index: int, num_images: int) -> bool:
    """All samples and (written last) the metadata file exist, and every sample decodes."""
    return (os.path.isfile(os.path.join(prompt_dir(out, index), "metadata.jsonl"))
            and all(decodable(sample_path(out, index, i)) for i in range(num_images)))


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_run_settings(out: str, settings: Mapping[str, Any], write: bool = True) -> None:
    """Refuse (``ValueError`` naming every differing key with both values) to continue an output folder made
    with other settings; record ``settings`` in a new folder (``write``: this process writes the file)."""
    path = os.path.join(out, SETTINGS_FILE)
    current = json.loads(json.dumps(settings))
    if os.path.isfile(path):
        with open(path) as fh:
            saved = json.load(fh)
        a, b = flatten_dotted(saved), flatten_dotted(current)
        diffs = [f"{k}: folder {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"
                 for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if diffs:
            raise ValueError(f"{out} holds samples generated with other settings; continuing would mix two runs:"
                             f"\n  " + "\n  ".join(diffs) + "\nUse another --out, or the same settings.")
        return
    if write:
        write_text_atomic(path, json.dumps(current, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=directory)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_prompt(out: str, index: int, metadata_line: str, images: np.ndarray, grid: bool = True) -> None:
    """One prompt's outputs; the metadata file last (it marks the prompt finished)."""
    for i, image in enumerate(images):
        save_png(sample_path(out, index, i), image)
    if grid:
        save_png(os.path.join(prompt_dir(out, index), "grid.png"), make_grid(images))
    write_text_atomic(os.path.join(prompt_dir(out, index), "metadata.jsonl"), metadata_line + "\n")


def barrier(name: str) -> None:
    """Wait for every host (no-op on one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def assigned(num_prompts: int, process_index: int, process_count: int) -> list[int]:
    """The prompt indices of one host (round-robin)."""
    return list(range(process_index, num_prompts, process_count))


def generate_assigned(label: str, count: int, out: str, *, is_finished: Callable[[int], bool],
                      generate: Callable[[list[int]], np.ndarray], write: Callable[[int, np.ndarray], None],
                      images_per_prompt: int, batch_size: int, process_index: int = 0, process_count: int = 1,
                      log_dir: str = LOG_DIR, log_fields: Callable[[int], dict] = lambda i: {},
                      progress: bool = True) -> list[int]:
    """The sharded, resumable generation loop of the image benchmarks (GenEval, DPG-Bench): this host's share of
    prompts ``0..count-1`` (``assigned``) minus the finished ones, in batches of ``batch_size`` (a short last batch
    padded with its last prompt, so every call has one static shape). ``generate(indices)`` -> uint8
    (len * images_per_prompt, H, W, 3); ``write(index, images)`` stores one prompt's images; each written prompt is
    appended to ``out/log_dir/process_<i>.jsonl``. Returns the indices generated now."""
    mine = assigned(count, process_index, process_count)
    todo = [i for i in mine if not is_finished(i)]
    print(f"{label}: process {process_index}/{process_count}: {len(mine)} prompts, {len(mine) - len(todo)} already "
          f"finished, {len(todo)} to generate")
    log_path = os.path.join(out, log_dir, f"process_{process_index}.jsonl")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    if progress:
        batches = tqdm(batches, desc=f"{label}[{process_index}]", unit="batch")
    done = []
    k = images_per_prompt
    for batch in batches:
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        images = np.asarray(generate(padded))
        for j, index in enumerate(batch):
            write(index, images[j * k:(j + 1) * k])
            with open(log_path, "a") as fh:
                fh.write(json.dumps({"index": index, **log_fields(index), "time": time.time()}) + "\n")
            done.append(index)
    return done


def run_geneval(generate_fn: GenerateFn, prompts: Sequence[tuple[str, dict]], out: str, *, num_images: int,
                batch_size: int, seed: int, process_index: int = 0, process_count: int = 1, grid: bool = True,
                progress: bool = True, settings: Optional[Mapping[str, Any]] = None) -> list[int]:
    """Generate this host's unfinished prompts; returns the indices generated now. ``settings`` (recorded and
    checked with ``check_run_settings``) default to the seed and the image count."""
    check_run_settings(out, dict(settings or {}, seed=seed, num_images=num_images), write=process_index == 0)
    return generate_assigned(
        "geneval", len(prompts), out, is_finished=lambda i: is_finished(out, i, num_images),
        generate=lambda idx: generate_fn([prompts[i][1]["prompt"] for i in idx], num_images, seed),
        write=lambda i, images: write_prompt(out, i, prompts[i][0], images, grid=grid),
        images_per_prompt=num_images, batch_size=batch_size, process_index=process_index,
        process_count=process_count, progress=progress)


def missing_prompts(out: str, num_prompts: int, num_images: int) -> list[int]:
    return [i for i in range(num_prompts) if not is_finished(out, i, num_images)]
