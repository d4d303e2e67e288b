"""ImageNet read back through ``data/imagenet.ImageNetSource`` from a tiny prepared ``imagenet2012`` directory in
the layout ``prepare_imagenet`` produces (tfds array_record shards + dataset_info.json + features.json), written
here with tfds's own feature serializer from JPEG files (preparing from the ILSVRC tars needs TensorFlow; reading
does not). The class names come from ``{manual_dir}/LOC_synset_mapping.txt`` in any line order."""
import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from bifrost_jax.data import imagenet
from bifrost_jax.data.preprocess import decode_image

SPLITS = {"train": [(0, "n01440764_10026.JPEG"), (7, "n01558993_1.JPEG"), (999, "n15075141_9.JPEG")],
          "validation": [(3, "ILSVRC2012_val_00000001.JPEG"), (0, "ILSVRC2012_val_00000002.JPEG")]}


def _jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    data_dir, manual_dir = str(root / "data"), root / "manual"
    builder = imagenet.imagenet_builder(data_dir)
    os.makedirs(builder.data_dir)
    split_infos, jpegs = [], {}
    for split, rows in SPLITS.items():
        template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=builder.name, split=split,
                                                 filetype_suffix="array_record")
        writer = ArrayRecordWriter(os.fspath(template.sharded_filepath(shard_index=0, num_shards=1)),
                                   "group_size:1")
        size = 0
        for i, (label, name) in enumerate(rows):
            jpegs[(split, i)] = _jpeg(len(jpegs))
            record = builder.info.features.serialize_example(
                {"image": io.BytesIO(jpegs[(split, i)]), "label": label, "file_name": name})
            writer.write(record)
            size += len(record)
        writer.close()
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[len(rows)], num_bytes=size,
                                               filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.set_file_format("array_record")
    builder.info.write_to_directory(builder.data_dir)
    # the ILSVRC synset mapping, reversed line order, several names per class
    manual_dir.mkdir()
    lines = [f"{wnid} class {i}, other name" for i, wnid in enumerate(imagenet.synsets())]
    (manual_dir / "LOC_synset_mapping.txt").write_text("\n".join(reversed(lines)) + "\n")
    return data_dir, str(manual_dir), jpegs


@pytest.mark.parametrize("split", ["train", "validation"])
def test_imagenet_source_reads_a_prepared_directory(prepared, split):
    data_dir, manual_dir, jpegs = prepared
    source = imagenet.ImageNetSource(data_dir, split, manual_dir=manual_dir)
    assert len(source) == len(SPLITS[split])
    for i, (label, name) in enumerate(SPLITS[split]):
        element = source[i]
        assert element["label"] == label and element["label"].dtype == np.int32
        assert element["caption"] == f"a photo of a class {label}"  # the first name of the label's synset
        assert element["file_name"] == name
        assert element["image"] == jpegs[(split, i)]  # the JPEG bytes as stored, not decoded
        np.testing.assert_array_equal(np.asarray(decode_image(element["image"], name=name)),
                                      np.asarray(Image.open(io.BytesIO(jpegs[(split, i)])).convert("RGB")))


def test_imagenet_source_needs_class_names(prepared, tmp_path):
    data_dir, _, _ = prepared
    with pytest.raises(ValueError, match="class_names_file"):
        imagenet.ImageNetSource(data_dir, "train")
    with pytest.raises(FileNotFoundError, match="LOC_synset_mapping.txt"):
        imagenet.ImageNetSource(data_dir, "train", manual_dir=str(tmp_path))
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"plain {i}" for i in range(1000)))
    assert imagenet.ImageNetSource(data_dir, "validation", class_names_file=str(names))[0]["caption"] == \
        "a photo of a plain 3"
