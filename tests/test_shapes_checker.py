"""The shapes checker reads ground truth back from pixels, and is at (or below) chance when it should be."""
import io

import numpy as np
import pytest
from PIL import Image

from bifrost_jax.data import shapes
from bifrost_jax.eval import shapes_checker as sc


def _ground_truth(resolution, split, n, seed=0, supersample=4):
    options = shapes.ShapesOptions(resolution=resolution, seed=seed, supersample=supersample)
    images, specs = [], []
    for i in range(n):
        example = shapes.make_example(options, split, i)
        images.append(np.asarray(Image.open(io.BytesIO(example["image"]))))
        specs.append(shapes.SceneSpec.from_features(example))
    return images, specs


@pytest.fixture(scope="module")
def gt64():
    return _ground_truth(64, "train", 240)


@pytest.mark.parametrize("resolution,split,n,supersample", [
    (64, "train", 240, 4),      # smallest demo size, anti-aliased
    (64, "test", 80, 1),        # held-out pairs, no anti-aliasing
    (128, "validation", 80, 4),
])
def test_ground_truth_images_score_near_100(resolution, split, n, supersample, gt64):
    images, specs = gt64 if (resolution, split) == (64, "train") else \
        _ground_truth(resolution, split, n, supersample=supersample)
    report = sc.evaluate(images, specs)
    assert report.counts["relation"] > 0.3 * n
    for attr in ("color", "shape", "count", "relation", "position", "overall"):
        assert report.accuracy[attr] >= 0.98, (attr, report.format())


def test_noise_and_blank_images_score_at_most_chance(gt64):
    specs = gt64[1][:120]
    rng = np.random.default_rng(0)
    palette = np.asarray([shapes.PALETTE[c] for c in shapes.COLORS] + [shapes.BACKGROUND], np.uint8)
    fakes = {
        "blank": [np.full((64, 64, 3), 255, np.uint8) for _ in specs],
        "uniform noise": [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in specs],
        # Blocks of palette colours: many colour regions, the case that could fool a lenient checker.
        "palette blocks": [np.repeat(np.repeat(palette[rng.integers(0, 7, (8, 8))], 8, 0), 8, 1) for _ in specs],
    }
    for name, images in fakes.items():
        report = sc.evaluate(images, specs)
        for attr in ("color", "shape", "count", "relation", "overall"):
            assert report.accuracy[attr] <= report.chance[attr] + 0.03, (name, attr, report.format())


def test_mismatched_prompts_score_near_the_computed_chance(gt64):
    # Real images scored against the prompts of OTHER images: this is the "prompt-ignoring generator" that the
    # chance levels model, so accuracy and chance must agree.
    images, specs = gt64
    shifted = specs[7:] + specs[:7]
    report = sc.evaluate(images, shifted, chance_specs=specs)
    for attr in ("color", "shape", "count", "relation", "overall"):
        assert abs(report.accuracy[attr] - report.chance[attr]) <= 0.07, (attr, report.format())
    assert report.chance["color"] < 0.2 and report.chance["overall"] < 0.05


def test_position_scores_the_relation_alone(gt64):
    images, specs = gt64
    relational = [(img, s) for img, s in zip(images, specs) if s.relation is not None]
    flipped = {"to the left of": "to the right of", "to the right of": "to the left of",
               "above": "below", "below": "above"}
    wrong = [shapes.SceneSpec(s.objects, flipped[s.relation]) for _, s in relational]
    report = sc.evaluate([img for img, _ in relational], wrong)
    assert report.accuracy["color"] == report.accuracy["shape"] == report.accuracy["count"] == 1.0
    assert report.accuracy["relation"] == 0.0 and report.accuracy["position"] == 0.0
    assert report.counts["position"] == len(relational)
    # Random relations for the right objects: position at its chance level (~1/4).
    rng = np.random.default_rng(1)
    random_rel = [shapes.SceneSpec(s.objects, shapes.RELATIONS[rng.integers(4)]) for _, s in relational]
    report = sc.evaluate([img for img, _ in relational], random_rel, chance_specs=[s for _, s in relational])
    assert abs(report.accuracy["position"] - report.chance["position"]) < 0.15
    assert 0.2 < report.chance["position"] < 0.3


def test_targeted_errors_are_caught():
    rng = np.random.default_rng(0)
    spec = shapes.SceneSpec((("red", "circle"), ("blue", "square")), "to the left of")
    image = shapes.render(spec, shapes.sample_placement(spec, 96, rng), 96)
    ok = sc.check_image(image, spec)
    assert all(ok.values()), ok
    assert sc.check_image(image, shapes.SceneSpec((("red", "circle"), ("green", "square")), "to the left of")) == \
        {"color": False, "shape": True, "count": True, "relation": False, "overall": False}
    assert sc.check_image(image, shapes.SceneSpec((("red", "triangle"), ("blue", "square")), "to the left of")) == \
        {"color": True, "shape": False, "count": True, "relation": False, "overall": False}
    three = shapes.SceneSpec((("orange", "triangle"),) * 3)
    image3 = shapes.render(three, shapes.sample_placement(three, 96, rng), 96)
    assert sc.check_image(image3, three)["count"]
    assert sc.check_image(image3, shapes.SceneSpec((("orange", "triangle"),) * 2)) == \
        {"color": True, "shape": True, "count": False, "overall": False}


def test_robust_to_mild_noise_and_compression(gt64):
    images, specs = gt64
    rng = np.random.default_rng(0)

    def jpeg(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=85)
        return np.asarray(Image.open(buf))

    noisy = [np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8) for a in images[:120]]
    compressed = [jpeg(a) for a in images[:120]]
    for name, degraded in (("noise", noisy), ("jpeg", compressed)):
        report = sc.evaluate(degraded, specs[:120])
        assert report.accuracy["overall"] >= 0.95, (name, report.format())


def test_chance_levels_match_the_exact_formula():
    # All 18 single-object prompts once each: a different prompt has the same colour with prob (3-1)/(18-1).
    specs = [shapes.SceneSpec(((c, s),)) for c in shapes.COLORS for s in shapes.SHAPES]
    chance = sc.chance_levels(specs)
    assert chance["color"] == pytest.approx(2 / 17)
    assert chance["shape"] == pytest.approx(5 / 17)
    assert chance["count"] == pytest.approx(1.0)
    assert chance["overall"] == pytest.approx(0.0)


def test_palette_blends_stay_clear_of_other_colours():
    # An anti-aliased edge is a blend of an object colour and the background; no blend may come within the
    # checker's tolerance of a DIFFERENT colour, or edges would grow rings of phantom objects.
    tolerance = sc.CheckerConfig().tolerance
    table = np.asarray([shapes.PALETTE[c] for c in shapes.COLORS], np.float64)
    background = np.asarray(shapes.BACKGROUND, np.float64)
    for i, color in enumerate(table):
        for t in np.linspace(0, 1, 101):
            blend = (1 - t) * color + t * background
            dist = np.linalg.norm(table - blend, axis=1)
            others = np.delete(dist, i)
            nearest_is_other = others.min() < min(dist[i], np.linalg.norm(background - blend))
            assert not (nearest_is_other and others.min() <= tolerance), (shapes.COLORS[i], t)


def test_report_format_lists_accuracy_beside_chance(gt64):
    images, specs = gt64
    report = sc.evaluate(images[:40], specs[:40])
    text = report.format()
    assert text.splitlines()[0].split() == ["attribute", "accuracy", "chance", "n"]
    values = report.as_dict()
    assert values["color_accuracy"] == 1.0 and 0 < values["color_chance"] < 0.3


def test_end_to_end_through_the_eval_pipeline():
    # Dataset elements -> grain eval batches (attributes kept) -> the checker, on the VAE view.
    from bifrost_jax.data import pipeline, preprocess

    options = shapes.ShapesOptions(resolution=64)
    source = [shapes.make_example(options, "test", i) for i in range(30)]
    fn = preprocess.make_preprocess_fn(preprocess.ViewConfig(32, 64), keep=shapes.ATTRIBUTE_FEATURES)
    images, specs = [], []
    for batch in pipeline.make_eval_iterator(source, 8, process_index=0, process_count=1, preprocess_fn=fn):
        batch_specs = sc.specs_from_batch(batch)
        valid = batch["valid"]
        assert len(batch_specs) == int(valid.sum())
        images += [np.round((v + 1) * 127.5).astype(np.uint8) for v in batch["vae_pixels"][valid]]
        specs += batch_specs
    assert specs == [shapes.SceneSpec.from_features(e) for e in source]
    report = sc.evaluate(images, specs)
    assert report.accuracy["overall"] >= 0.96, report.format()


def test_fixed_layout_is_set_by_the_caption_and_reads_back_at_the_demo_resolution():
    """The demo's "fixed" layout: same caption -> same positions up to the jitter; rendered at 64 px and resized to
    the demo's 32 px VAE view, the checker still reads every attribute back."""
    from bifrost_jax.data.preprocess import crop_box, decode_image, resize_crop

    options = shapes.ShapesOptions(resolution=64, layout="fixed", jitter=0.02)
    by_caption, images, specs = {}, [], []
    for i in range(120):
        example = shapes.make_example(options, "test", i)
        n = int(example["num_objects"])
        centers = np.asarray(example["object_centers"])[:n]
        ref = by_caption.setdefault(example["caption"], centers)
        assert np.abs(centers - ref).max() <= 2 * 0.02 + 1e-6, example["caption"]
        image = decode_image(example["image"])
        images.append(resize_crop(image, crop_box(image.width, image.height), 32))
        specs.append(shapes.SceneSpec.from_features(example))
    assert len(by_caption) < 120  # captions repeat, so the positions comparison above happened
    report = sc.evaluate(images, specs)
    for attr in ("color", "shape", "count", "relation", "overall"):
        assert report.accuracy[attr] >= 0.97, (attr, report.format())
    # a random-layout build is a different TFDS config, and bad options name the field
    assert options.name != shapes.ShapesOptions(resolution=64).name
    with pytest.raises(ValueError, match="layout"):
        shapes.ShapesOptions(layout="grid")
    with pytest.raises(ValueError, match="jitter"):
        shapes.ShapesOptions(layout="fixed", jitter=0.2)
