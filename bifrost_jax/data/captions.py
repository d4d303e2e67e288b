"""TFDS builder for users' own image-caption data, written as array_record without TensorFlow.

Two input layouts:
  * a FOLDER of images (searched recursively: .png .jpg .jpeg .webp .bmp .gif .tif .tiff), each with a sidecar
    caption file of the same stem: ``cats/001.jpg`` + ``cats/001.txt``;
  * a JSONL file, one ``{"image": path, "caption": text}`` per line; relative paths are relative to the file.

Elements: {"image": the file's encoded bytes (any size or format PIL reads), "caption": text, "file_name": the
path relative to the source}. Each image is fully decoded once at build time; undecodable images, images without
a caption and malformed JSONL lines are SKIPPED and COUNTED, never fatal: one log line per kind gives the count
and the names, and ``builder.skipped`` holds them after ``download_and_prepare``. (Images that go bad after the
build are skipped and counted by ``data/pipeline.py`` at read time.)

Splits: ``train``, plus ``validation`` when ``validation_fraction > 0`` (chosen by a hash of the file name, so
adding files never moves old ones between splits).

Staleness: ``prepare_captions`` records what the prepared data was built from (every source file with its size
and modification time; for a JSONL source the file itself and every image it names) in ``bifrost_source.json``
beside the prepared files. When the source no longer matches (files added, removed or changed), the prepared data
is rebuilt, with a message saying which files changed (``on_stale="error"`` raises instead).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import zlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from bifrost_jax.data.preprocess import CorruptImageError, decode_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_MAX_NAMES_LOGGED = 50


@dataclasses.dataclass(frozen=True)
class CaptionsOptions:
    """source: a folder of images with .txt sidecars, or a .jsonl file. validation_fraction: share of files in
    the validation split. name: the TFDS config name (default: the source's base name plus a hash of its path)."""

    source: str
    validation_fraction: float = 0.0
    name: str = ""

    def __post_init__(self):
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"CaptionsOptions.validation_fraction must be in [0, 1), got {self.validation_fraction}")

    @property
    def config_name(self) -> str:
        if self.name:
            return self.name
        path = os.path.abspath(self.source)
        stem = "".join(ch if ch.isalnum() else "_" for ch in os.path.basename(path.rstrip("/")))[:40] or "data"
        digest = hashlib.sha1(f"{path}|{self.validation_fraction}".encode()).hexdigest()[:8]
        return f"{stem}_{digest}"


def _split_of(file_name: str, validation_fraction: float) -> str:
    bucket = zlib.crc32(file_name.encode("utf-8")) % 10_000
    return "validation" if bucket < validation_fraction * 10_000 else "train"


def list_pairs(source: str, skipped: dict[str, list[str]]) -> list[tuple[str, str, str]]:
    """(file_name, absolute image path, caption) for every usable entry of ``source``, sorted by file name.

    Entries without a caption or with a malformed JSONL line are recorded in ``skipped`` (kind -> names).
    """
    pairs = []
    if os.path.isdir(source):
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for f in sorted(files):
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                path = os.path.join(root, f)
                rel = os.path.relpath(path, source)
                txt = os.path.splitext(path)[0] + ".txt"
                if not os.path.isfile(txt):
                    skipped.setdefault("missing caption", []).append(rel)
                    continue
                with open(txt, encoding="utf-8", errors="replace") as fh:
                    pairs.append((rel, path, fh.read().strip()))
    elif os.path.isfile(source):
        base = os.path.dirname(os.path.abspath(source))
        with open(source, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    image, caption = record["image"], record["caption"]
                    if not isinstance(image, str) or not isinstance(caption, str):
                        raise TypeError("'image' and 'caption' must be strings")
                except (ValueError, KeyError, TypeError) as e:
                    skipped.setdefault("malformed jsonl line", []).append(f"line {line_no} ({e})")
                    continue
                path = image if os.path.isabs(image) else os.path.join(base, image)
                pairs.append((image, path, caption.strip()))
    else:
        raise FileNotFoundError(f"captions source {source!r} is neither a folder nor a .jsonl file")
    return sorted(pairs)


def read_image_bytes(path: str, name: str) -> bytes:
    """The file's bytes, after checking that they decode completely; ``CorruptImageError`` if not."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise CorruptImageError(f"cannot read {name}: {e}") from e
    decode_image(data, name=name)
    return data


def log_skipped(skipped: dict[str, list[str]], what: str) -> None:
    for kind, names in sorted(skipped.items()):
        shown = ", ".join(names[:_MAX_NAMES_LOGGED]) + (" ..." if len(names) > _MAX_NAMES_LOGGED else "")
        log.warning("%s: skipped %d entries (%s): %s", what, len(names), kind, shown)


class CaptionsConfig(tfds.core.BuilderConfig):
    def __init__(self, options: CaptionsOptions, **kwargs):
        super().__init__(name=options.config_name, version="1.0.0",
                         description=f"image-caption data from {options.source}", **kwargs)
        self.options = options


class BifrostCaptions(tfds.core.GeneratorBasedBuilder):
    """Image-caption pairs from a folder or a JSONL file (see the module docstring). Use ``captions_builder``."""

    VERSION = tfds.core.Version("1.0.0")
    # See BifrostShapes.code_path: tfds 4.9.10's checksum lookup needs a package missing on Python 3.11.
    code_path = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.skipped: dict[str, list[str]] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded bytes, any format
                "caption": tfds.features.Text(),
                "file_name": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        options = self.builder_config.options
        self.skipped = {}
        by_split: dict[str, list] = {"train": [], "validation": []}
        for file_name, path, caption in list_pairs(options.source, self.skipped):
            try:
                read_image_bytes(path, file_name)  # full decode now, so empty splits are known before writing
            except CorruptImageError as e:
                log.debug("%s", e)
                self.skipped.setdefault("undecodable image", []).append(file_name)
                continue
            by_split[_split_of(file_name, options.validation_fraction)].append((file_name, path, caption))
        if not by_split["train"]:
            log_skipped(self.skipped, f"captions builder ({options.source})")
            raise ValueError(f"captions source {options.source!r} has no usable image-caption pair for the train "
                             f"split (skipped: { {k: len(v) for k, v in self.skipped.items()} })")
        # TFDS cannot write an empty split: leave out a validation split that drew no files.
        return {split: self._generate_examples(entries) for split, entries in by_split.items() if entries}

    def _generate_examples(self, entries) -> Iterator[tuple[str, dict]]:
        for file_name, path, caption in entries:
            with open(path, "rb") as fh:
                yield file_name, {"image": fh.read(), "caption": caption, "file_name": file_name}

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config=download_config)
        log_skipped(self.skipped, f"captions builder ({self.builder_config.options.source})")


def captions_builder(data_dir: str, options: CaptionsOptions) -> BifrostCaptions:
    """The array_record builder for ``options`` under ``data_dir`` (call ``download_and_prepare()``)."""
    return BifrostCaptions(data_dir=data_dir, config=CaptionsConfig(options), file_format="array_record")


# ----------------------------------------------------------------------------------------------------------------
# what a prepared dataset was built from

FINGERPRINT_FILE = "bifrost_source.json"


def source_fingerprint(source: str) -> dict[str, list[int]]:
    """``{file: [size, mtime_ns]}`` of everything the build reads: every file under a folder source, or a JSONL
    file and the images it names."""
    if os.path.isdir(source):
        paths = [os.path.join(root, f) for root, _, files in os.walk(source) for f in files]
        names = {os.path.relpath(p, source): p for p in paths}
    elif os.path.isfile(source):
        names = {os.path.basename(source): source}
        names.update({name: path for name, path, _ in list_pairs(source, {})})
    else:
        raise FileNotFoundError(f"captions source {source!r} is neither a folder nor a .jsonl file")
    out = {}
    for name, path in sorted(names.items()):
        try:
            st = os.stat(path)
            out[name] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[name] = [-1, -1]  # named but unreadable: recorded so that its repair counts as a change
    return out


def fingerprint_changes(old: dict, new: dict) -> str:
    """A short description of the differences between two fingerprints."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(k for k in set(old) & set(new) if list(old[k]) != list(new[k]))
    parts = []
    for what, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            parts.append(f"{len(names)} {what} ({', '.join(names[:10])}{' ...' if len(names) > 10 else ''})")
    return "; ".join(parts) or "no file differs"


def prepare_captions(data_dir: str, options: CaptionsOptions, *, on_stale: str = "rebuild",
                     report=print) -> BifrostCaptions:
    """The prepared builder for ``options`` under ``data_dir``: built on first use, and rebuilt (or, with
    ``on_stale="error"``, refused) when its source changed since (see the module docstring)."""
    if on_stale not in ("rebuild", "error"):
        raise ValueError(f"on_stale={on_stale!r}: use 'rebuild' or 'error'")
    builder = captions_builder(data_dir, options)
    current = source_fingerprint(options.source)
    record = os.path.join(builder.data_dir, FINGERPRINT_FILE)
    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        try:
            with open(record) as fh:
                saved = json.load(fh)["files"]
        except (OSError, ValueError, KeyError):
            saved = None
        if saved != current:
            why = ("it records no source (built by an older version)" if saved is None
                   else f"its source {options.source} changed: {fingerprint_changes(saved, current)}")
            if on_stale == "error":
                raise ValueError(f"prepared captions dataset {builder.data_dir} is stale: {why}; delete it to "
                                 f"rebuild")
            report(f"prepared captions dataset {builder.data_dir} is stale ({why}): rebuilding it")
            shutil.rmtree(builder.data_dir)
            builder = captions_builder(data_dir, options)
    builder.download_and_prepare()
    if not os.path.exists(record):
        tmp = record + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"source": os.path.abspath(options.source), "files": current}, fh)
        os.replace(tmp, record)
    return builder
