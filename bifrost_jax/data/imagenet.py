"""ImageNet-1k (tfds ``imagenet2012``) in the element format of every builder in ``data/``.

Elements: {"image": the JPEG bytes as stored (never decoded here), "caption": "a photo of a {class name}",
"label": int32 class index (tfds order = sorted WordNet ids), "file_name": text}, for class-conditional and
reconstruction runs.

Class names: tfds only ships the WordNet ids, so the human-readable names come from a file: either the ILSVRC
``LOC_synset_mapping.txt`` ("n01440764 tench, Tinca tinca" per line, any order; the first name is used) or 1000
plain lines of names in label order. By default ``{manual_dir}/LOC_synset_mapping.txt``.

Preparing: ``prepare_imagenet`` runs tfds's own ``imagenet2012`` builder on the tars in ``manual_dir``
(ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar) into array_record. In tfds 4.9.10 that builder calls
``tf.io.gfile`` (and its image feature encodes with TensorFlow), so PREPARING needs TensorFlow installed, once,
on any machine; READING the prepared array_record files does not (``ImageNetSource`` below, PIL decodes later).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

NAME = "imagenet2012"
NUM_CLASSES = 1000
CAPTION_TEMPLATE = "a photo of a {}"


def synsets() -> list[str]:
    """The 1000 WordNet ids in tfds label order (from the tfds package; no TensorFlow needed)."""
    path = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
    names = path.read_text().split()
    if len(names) != NUM_CLASSES:
        raise ValueError(f"{path}: expected {NUM_CLASSES} WordNet ids, found {len(names)}")
    return names


def load_class_names(path: str) -> list[str]:
    """Human-readable class names in label order, from a synset mapping file or a 1000-line names file."""
    with open(path, encoding="utf-8") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    ids = synsets()
    first = lines[0].split(maxsplit=1)[0] if lines else ""
    if first.startswith("n") and first[1:].isdigit():  # "n01440764 tench, Tinca tinca"
        by_id = {}
        for line in lines:
            wnid, _, names = line.partition(" ")
            by_id[wnid] = names.split(",")[0].strip()
        missing = [w for w in ids if w not in by_id]
        if missing:
            raise ValueError(f"{path}: no name for {len(missing)} ImageNet classes, e.g. {missing[:5]}")
        return [by_id[w] for w in ids]
    if len(lines) != NUM_CLASSES:
        raise ValueError(f"{path}: expected {NUM_CLASSES} class names (one per line, in label order) or a "
                         f"'<wnid> <names>' synset mapping, found {len(lines)} lines")
    return lines


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def imagenet_to_element(example: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """One tfds imagenet2012 example (image NOT decoded: bytes) -> {"image", "caption", "label", "file_name"}."""
    label = int(np.asarray(example["label"]))
    if not 0 <= label < len(class_names):
        raise ValueError(f"ImageNet label {label} out of range for {len(class_names)} class names "
                         f"(file {_text(example.get('file_name', '?'))})")
    image = example["image"]
    if isinstance(image, np.ndarray) and image.dtype == object:
        image = image.item()
    return {"image": image, "caption": CAPTION_TEMPLATE.format(class_names[label]), "label": np.int32(label),
            "file_name": _text(example.get("file_name", ""))}


def imagenet_builder(data_dir: str) -> tfds.core.DatasetBuilder:
    return tfds.builder(NAME, data_dir=data_dir, file_format="array_record")


def prepare_imagenet(data_dir: str, manual_dir: str) -> None:
    """Writes array_record ImageNet under ``data_dir`` from the tars in ``manual_dir`` (needs TensorFlow)."""
    imagenet_builder(data_dir).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


class ImageNetSource:
    """Random-access ImageNet split in our element format (grain ``MapDataset.source`` takes it as is)."""

    def __init__(self, data_dir: str, split: str, *, class_names_file: str | None = None,
                 manual_dir: str | None = None):
        if class_names_file is None:
            if manual_dir is None:
                raise ValueError("ImageNetSource needs class_names_file (LOC_synset_mapping.txt or 1000 names), "
                                 "or a manual_dir that contains LOC_synset_mapping.txt")
            class_names_file = os.path.join(manual_dir, "LOC_synset_mapping.txt")
        if not os.path.isfile(class_names_file):
            raise FileNotFoundError(f"ImageNet class names file {class_names_file!r} not found (the ILSVRC "
                                    f"LOC_synset_mapping.txt, or 1000 names one per line in label order)")
        self.class_names = load_class_names(class_names_file)
        builder = imagenet_builder(data_dir)
        # SkipDecoding keeps the JPEG bytes: the pipeline decodes (and skips corrupt files) in its workers.
        self._source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return imagenet_to_element(self._source[index], self.class_names)

    def __repr__(self) -> str:
        return f"ImageNetSource({self._source!r})"
