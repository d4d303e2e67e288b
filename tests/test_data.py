"""Data: TFDS builders (array_record, no TensorFlow), held-out splits, grain pipelines, preprocessing views."""
import io
import json
import logging
import os
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from bifrost_jax.data import captions, imagenet, pipeline, preprocess, shapes

SMALL = shapes.ShapesOptions(resolution=64, train_size=240, validation_size=60, test_size=60, seed=0)


def _text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("shapes"))
    shapes.shapes_builder(data_dir, SMALL).download_and_prepare()
    return data_dir


@pytest.fixture(scope="module")
def train_source(shapes_dir):
    return shapes.shapes_builder(shapes_dir, SMALL).as_data_source("train")


def _records(source):
    return [source[i] for i in range(len(source))]


# ---------------------------------------------------------------------------------------------- shapes builder


def test_shapes_builder_writes_and_reads_array_record_without_tensorflow(shapes_dir):
    builder = shapes.shapes_builder(shapes_dir, SMALL)
    files = sorted(os.listdir(builder.data_dir))
    assert any(f.startswith("bifrost_shapes-train.array_record") for f in files), files
    for split, size in (("train", 240), ("validation", 60), ("test", 60)):
        source = builder.as_data_source(split)
        assert len(source) == size
        element = source[5]
        spec = shapes.SceneSpec.from_features(element)
        assert _text(element["caption"]) == spec.caption
        pixels = np.asarray(Image.open(io.BytesIO(element["image"])))
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        assert _text(element["id"]).startswith(split + "/")
    # Written and read back without TensorFlow ever being imported.
    assert "tensorflow" not in sys.modules


def test_shapes_build_is_deterministic_and_seeded(shapes_dir, tmp_path):
    again = shapes.shapes_builder(str(tmp_path), SMALL)
    again.download_and_prepare()
    first = shapes.shapes_builder(shapes_dir, SMALL)
    for split in ("train", "validation", "test"):
        name = f"bifrost_shapes-{split}.array_record-00000-of-00001"
        with open(os.path.join(first.data_dir, name), "rb") as a, open(os.path.join(again.data_dir, name), "rb") as b:
            assert a.read() == b.read(), f"{split}: two builds differ"
    # The renderer itself is a pure function of (options, split, index); another seed gives other scenes.
    assert shapes.make_example(SMALL, "train", 3)["image"] == shapes.make_example(SMALL, "train", 3)["image"]
    other = shapes.ShapesOptions(**{**SMALL.__dict__, "seed": 1})
    assert [shapes.make_example(other, "train", i)["image"] for i in range(5)] != \
        [shapes.make_example(SMALL, "train", i)["image"] for i in range(5)]


def test_held_out_combinations(shapes_dir):
    builder = shapes.shapes_builder(shapes_dir, SMALL)
    specs = {split: [shapes.SceneSpec.from_features(e) for e in _records(builder.as_data_source(split))]
             for split in ("train", "validation", "test")}
    held = set(shapes.HELD_OUT_PAIRS)
    assert len(held) == 3 and {c for c, _ in held} <= set(shapes.COLORS)
    for split in ("train", "validation"):
        assert not any(obj in held for spec in specs[split] for obj in spec.objects), split
    assert all(any(obj in held for obj in spec.objects) for spec in specs["test"])
    # The rule removes pairings, not attributes: every colour and shape is still trained on.
    train_objects = {obj for spec in specs["train"] for obj in spec.objects}
    assert {c for c, _ in train_objects} == set(shapes.COLORS)
    assert {s for _, s in train_objects} == set(shapes.SHAPES)
    # Both scene kinds, every count and every relation occur.
    assert {spec.count for spec in specs["train"] if spec.relation is None} == {1, 2, 3}
    assert {spec.relation for spec in specs["train"]} == set(shapes.RELATIONS) | {None}


def test_caption_grammar_round_trips():
    for i in range(200):
        spec = shapes.SceneSpec.from_features(shapes.make_example(SMALL, "test", i))
        assert shapes.parse_caption(spec.caption) == spec
    assert shapes.SceneSpec((("orange", "circle"),) * 2).caption == "two orange circles"
    assert shapes.SceneSpec((("orange", "circle"), ("red", "square")), "above").caption == \
        "an orange circle above a red square"
    with pytest.raises(ValueError, match="not in the shapes grammar"):
        shapes.parse_caption("a cat on a mat")


# ---------------------------------------------------------------------------------------------- captions builder


def _write_captions_folder(root):
    os.makedirs(os.path.join(root, "sub"))
    rng = np.random.default_rng(0)
    names = []
    for i in range(6):
        rel = f"sub/{i}.png" if i % 2 else f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)).save(os.path.join(root, rel))
        with open(os.path.join(root, os.path.splitext(rel)[0] + ".txt"), "w") as fh:
            fh.write(f"caption {i}\n")
        names.append(rel)
    with open(os.path.join(root, "bad.png"), "wb") as fh:
        fh.write(b"this is not an image")
    with open(os.path.join(root, "sub/1.png"), "rb") as fh:
        truncated = fh.read()[:80]
    with open(os.path.join(root, "trunc.png"), "wb") as fh:
        fh.write(truncated)
    for stem in ("bad", "trunc"):
        with open(os.path.join(root, stem + ".txt"), "w") as fh:
            fh.write("never used")
    Image.new("RGB", (8, 8)).save(os.path.join(root, "no_caption.png"))
    return names


def test_captions_folder_builder_skips_and_counts_undecodable(tmp_path, caplog):
    root = str(tmp_path / "images")
    names = _write_captions_folder(root)
    builder = captions.captions_builder(str(tmp_path / "data"), captions.CaptionsOptions(root))
    with caplog.at_level(logging.WARNING, logger="bifrost_jax.data.captions"):
        builder.download_and_prepare()
    assert sorted(builder.skipped["undecodable image"]) == ["bad.png", "trunc.png"]
    assert builder.skipped["missing caption"] == ["no_caption.png"]
    assert "skipped 2 entries (undecodable image): bad.png, trunc.png" in caplog.text
    source = builder.as_data_source("train")
    got = {_text(e["file_name"]): e for e in _records(source)}
    assert sorted(got) == sorted(names)
    for name, element in got.items():
        with open(os.path.join(root, name), "rb") as fh:
            assert element["image"] == fh.read()  # stored as the original encoded bytes
        assert _text(element["caption"]) == f"caption {os.path.splitext(os.path.basename(name))[0]}"
    assert "tensorflow" not in sys.modules


def test_captions_jsonl_builder_and_validation_split(tmp_path):
    root = str(tmp_path / "images")
    names = _write_captions_folder(root)
    jsonl = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"image": f"images/{n}", "caption": f"text {n}"}) for n in names]
    lines += ["{broken", json.dumps({"image": "images/bad.png", "caption": "x"}), json.dumps({"caption": "no image"})]
    jsonl.write_text("\n".join(lines) + "\n")
    builder = captions.captions_builder(str(tmp_path / "data"),
                                        captions.CaptionsOptions(str(jsonl), validation_fraction=0.5))
    builder.download_and_prepare()
    assert builder.skipped["undecodable image"] == ["images/bad.png"]
    assert len(builder.skipped["malformed jsonl line"]) == 2
    splits = {s: {_text(e["file_name"]) for e in _records(builder.as_data_source(s))}
              for s in builder.info.splits}
    assert set().union(*splits.values()) == {f"images/{n}" for n in names}
    assert sum(len(v) for v in splits.values()) == len(names)


# ---------------------------------------------------------------------------------------------- imagenet


def _jpeg(seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_imagenet_mapping_on_a_fake_element(tmp_path):
    wnids = imagenet.synsets()
    assert len(wnids) == 1000 and wnids[:2] == ["n01440764", "n01443537"]
    mapping = tmp_path / "LOC_synset_mapping.txt"
    # Any order in the file; names are assigned by WordNet id, first comma-separated name.
    mapping.write_text("".join(f"{w} class {i}, alias\n" for i, w in reversed(list(enumerate(wnids)))))
    names = imagenet.load_class_names(str(mapping))
    assert names[0] == "class 0" and names[999] == "class 999"
    data = _jpeg()
    fake = {"image": data, "label": np.int64(1), "file_name": b"n01443537_10.JPEG"}
    element = imagenet.imagenet_to_element(fake, names)
    assert element["caption"] == "a photo of a class 1"
    assert int(element["label"]) == 1 and element["image"] == data and element["file_name"] == "n01443537_10.JPEG"
    views = preprocess.make_preprocess_fn(preprocess.ViewConfig(16, 32), keep=("label",))(element, None)
    assert views["vit_pixels"].shape == (16, 16, 3) and int(views["label"]) == 1
    with pytest.raises(ValueError, match="out of range"):
        imagenet.imagenet_to_element({**fake, "label": np.int64(5)}, names[:3])
    plain = tmp_path / "names.txt"
    plain.write_text("\n".join(f"name {i}" for i in range(999)))
    with pytest.raises(ValueError, match="expected 1000 class names"):
        imagenet.load_class_names(str(plain))


# ---------------------------------------------------------------------------------------------- pipeline

VIEWS = preprocess.ViewConfig(vit_resolution=28, vae_resolution=56)
PREPROCESS = preprocess.make_preprocess_fn(VIEWS, keep=("id",))


def _ids(batch):
    return [_text(v) for v in batch["id"]]


def test_host_shards_are_disjoint_and_cover_the_data(train_source):
    per_host = []
    for host in range(2):
        it = pipeline.make_train_iterator(train_source, 8, seed=0, num_epochs=1, process_index=host,
                                          process_count=2, preprocess_fn=PREPROCESS)
        batches = list(it)
        assert all(b["vit_pixels"].shape == (4, 28, 28, 3) and b["vae_pixels"].shape == (4, 56, 56, 3)
                   for b in batches)
        per_host.append([i for b in batches for i in _ids(b)])
    a, b = (set(ids) for ids in per_host)
    assert len(per_host[0]) == len(a) == 120 and len(per_host[1]) == len(b) == 120
    assert not a & b
    assert a | b == {_text(train_source[i]["id"]) for i in range(len(train_source))}
    with pytest.raises(ValueError, match="global batch size 7 .* process count 2"):
        pipeline.make_train_iterator(train_source, 7, seed=0, process_index=0, process_count=2,
                                     preprocess_fn=PREPROCESS)


def test_batches_are_deterministic_by_seed(train_source):
    def first(seed, n=3):
        it = pipeline.make_train_iterator(train_source, 4, seed=seed, process_index=0, process_count=1,
                                          preprocess_fn=PREPROCESS)
        return [next(it) for _ in range(n)]

    x, y, z = first(0), first(0), first(1)
    for bx, by in zip(x, y):
        assert _ids(bx) == _ids(by)
        np.testing.assert_array_equal(bx["vae_pixels"], by["vae_pixels"])
    assert [_ids(b) for b in x] != [_ids(b) for b in z]
    # Shuffled, and each epoch in a different order.
    it = pipeline.make_train_iterator(train_source, 240, seed=0, num_epochs=2, process_index=0, process_count=1,
                                      preprocess_fn=PREPROCESS)
    e1, e2 = _ids(next(it)), _ids(next(it))
    assert sorted(e1) == sorted(e2) and e1 != e2 and e1 != sorted(e1)


def test_resume_from_saved_state_continues_exactly(train_source):
    views = preprocess.make_preprocess_fn(preprocess.ViewConfig(28, 56, random_crop=True, min_crop_scale=0.6),
                                          keep=("id",))

    def make():
        return pipeline.make_train_iterator(train_source, 6, seed=5, process_index=1, process_count=2,
                                            preprocess_fn=views)

    it = make()
    for _ in range(3):
        next(it)
    state = pipeline.iterator_state(it)
    assert isinstance(state, bytes) and json.loads(state)
    expected = [next(it) for _ in range(4)]
    resumed = pipeline.restore_iterator(make(), state)
    for want in expected:
        got = next(resumed)
        assert _ids(got) == _ids(want)
        np.testing.assert_array_equal(got["vit_pixels"], want["vit_pixels"])  # random crops resume too
        np.testing.assert_array_equal(got["vae_pixels"], want["vae_pixels"])
    # A fresh iterator does NOT continue there (the restore is what does it).
    assert _ids(next(make())) != _ids(expected[0])


class _Corrupting:
    """A source whose elements at ``bad`` have garbage image bytes."""

    def __init__(self, source, n, bad):
        self.source, self.n, self.bad = source, n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        element = dict(self.source[i])
        if i in self.bad:
            element["image"] = b"\x89PNG\r\n\x1a\n garbage"
        return element


def test_corrupt_image_is_skipped_and_counted(train_source, caplog):
    source = _Corrupting(train_source, 40, bad={3, 17})
    bad_ids = {_text(train_source[i]["id"]) for i in (3, 17)}
    it = pipeline.make_train_iterator(source, 2, seed=0, num_epochs=1, process_index=0, process_count=1,
                                      preprocess_fn=PREPROCESS)
    with caplog.at_level(logging.WARNING, logger="bifrost_jax.data.pipeline"):
        ids = [i for b in it for i in _ids(b)]
    assert len(ids) == 38 and not set(ids) & bad_ids
    assert set(ids) | bad_ids == {_text(train_source[i]["id"]) for i in range(40)}
    assert pipeline.corrupt_count(it) == 2
    assert all(name in caplog.text for name in bad_ids)
    # The count is part of the saved state, so it survives a restore.
    restored = pipeline.restore_iterator(
        pipeline.make_train_iterator(source, 2, seed=0, num_epochs=1, process_index=0, process_count=1,
                                     preprocess_fn=PREPROCESS), pipeline.iterator_state(it))
    assert pipeline.corrupt_count(restored) == 2
    # Bugs are not "corrupt data": any other exception propagates.
    def broken(element, rng):
        raise KeyError("typo")
    with pytest.raises(KeyError):
        next(pipeline.make_train_iterator(source, 2, seed=0, process_index=0, process_count=1, preprocess_fn=broken))
    # An all-corrupt source is an error, not an endless loop.
    all_bad = _Corrupting(train_source, 8, bad=range(8))
    with pytest.raises(RuntimeError, match="consecutive corrupt"):
        next(pipeline.make_train_iterator(all_bad, 2, seed=0, process_index=0, process_count=1,
                                          preprocess_fn=PREPROCESS, max_consecutive_skips=20))


def test_corrupt_count_crosses_worker_processes(train_source):
    # One grain worker process: the skip counter lives in the worker and reaches us through the state.
    source = [dict(train_source[i]) for i in range(12)]
    source[4]["image"] = b"not an image"
    it = pipeline.make_train_iterator(source, 2, seed=0, num_epochs=1, process_index=0, process_count=1,
                                      preprocess_fn=PREPROCESS, worker_count=1)
    try:
        ids = [i for b in it for i in _ids(b)]
        assert len(ids) == 10 and pipeline.corrupt_count(it) == 1
    finally:
        it.close()


def test_eval_iterator_fixed_order_sharded_and_padded(train_source):
    source = [train_source[i] for i in range(21)]
    seen = []
    for host in range(2):
        batches = list(pipeline.make_eval_iterator(source, 8, process_index=host, process_count=2,
                                                   preprocess_fn=PREPROCESS))
        assert len(batches) == 3  # ceil(21 / 8) on every host
        for b, batch in enumerate(batches):
            assert batch["vae_pixels"].shape == (4, 56, 56, 3)
            expect = [b * 8 + host * 4 + j for j in range(4)]
            np.testing.assert_array_equal(batch["example_index"], [i if i < 21 else -1 for i in expect])
            np.testing.assert_array_equal(batch["valid"], [i < 21 for i in expect])
            for j, i in enumerate(expect):
                if i < 21:
                    assert _text(batch["id"][j]) == _text(source[i]["id"])
                else:
                    assert not batch["vae_pixels"][j].any()
            seen += [int(i) for i in batch["example_index"][batch["valid"]]]
    assert sorted(seen) == list(range(21))


# ---------------------------------------------------------------------------------------------- preprocess


def _smooth_image(width, height, seed=0):
    noise = np.random.default_rng(seed).integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))


def test_both_views_come_from_the_same_crop():
    image = _smooth_image(240, 160)
    config = preprocess.ViewConfig(vit_resolution=32, vae_resolution=64, random_crop=True, min_crop_scale=0.5)
    for seed in range(4):
        views = preprocess.make_views(image, config, np.random.default_rng(seed))
        assert views["vit_pixels"].dtype == np.uint8 and views["vit_pixels"].shape == (32, 32, 3)
        vae = views["vae_pixels"]
        assert vae.dtype == np.float32 and vae.shape == (64, 64, 3) and vae.min() >= -1 and vae.max() <= 1
        vae_u8 = np.clip(np.round((vae + 1) * 127.5), 0, 255).astype(np.uint8)
        down = np.asarray(Image.fromarray(vae_u8).resize((32, 32), Image.Resampling.BICUBIC), np.float32)
        same = np.abs(down - views["vit_pixels"]).mean()
        # The same comparison against a view of a crop shifted by 1/16 of its side must be clearly worse.
        box = preprocess.crop_box(240, 160, random=True, rng=np.random.default_rng(seed), min_scale=0.5)
        side = box[2] - box[0]
        shift = min(side / 16, 240 - box[2]) if box[2] < 240 else -side / 16
        shifted = preprocess.resize_crop(image, (box[0] + shift, box[1], box[2] + shift, box[3]), 32)
        other = np.abs(down - shifted.astype(np.float32)).mean()
        assert same < 2.0 and other > 3 * same, (seed, same, other)


def test_centre_crop_equals_resize_short_side_then_centre_crop():
    image = _smooth_image(200, 120, seed=1)
    config = preprocess.ViewConfig(vit_resolution=60, vae_resolution=0, vit_dtype="float32")
    views = preprocess.make_views(image, config)
    vit = views["vit_pixels"]
    assert vit.dtype == np.float32 and 0 <= vit.min() and vit.max() <= 1 and "vae_pixels" not in views
    # Reference: resize the short side to 60 (bicubic), then take the centred 60x60.
    resized = np.asarray(image.resize((100, 60), Image.Resampling.BICUBIC), np.float32) / 255
    reference = resized[:, 20:80]
    assert np.abs(vit - reference).mean() < 0.01
    assert np.abs(vit - resized[:, :60]).mean() > 0.03  # a left crop is distinguishable


def test_decode_image_formats_and_errors():
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest transparent -> white
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, "PNG")
    out = np.asarray(preprocess.decode_image(buf.getvalue()))
    assert out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[1, 1], [255, 255, 255])
    gray = np.asarray(preprocess.decode_image(np.full((3, 3), 7, np.uint8)))
    assert gray.shape == (3, 3, 3) and (gray == 7).all()
    for bad in (b"", b"GIF89a garbage", buf.getvalue()[:30]):
        with pytest.raises(preprocess.CorruptImageError, match="x.png"):
            preprocess.decode_image(bad, name="x.png")
