"""Synthetic "coloured shapes" data: scene sampling, a deterministic renderer, captions and a TFDS builder.

A scene is either
  * a COUNT scene: 1..max_count identical objects, caption "a red circle" / "three blue squares", or
  * a RELATION scene: two objects of different colours, caption "a red circle to the left of a blue square"
    (relations: "to the left of", "to the right of", "above", "below"; object 0 REL object 1),
drawn as flat colours from ``PALETTE`` on a plain ``BACKGROUND``, axis-aligned, never touching. Every attribute is
also stored as a structured feature, so ``eval/shapes_checker.py`` can be validated against ground truth.

Held-out combinations (generalisation is measured on ``test``):
  colour-shape pair (COLORS[c], SHAPES[s]) is HELD OUT iff ``c == (2 * s + 1) % len(COLORS)``, i.e.
  green circle, yellow square, orange triangle. Every colour and every shape still occurs in training, only these
  pairings do not.
  * ``train`` and ``validation``: no object uses a held-out pair (validation = in-distribution, other seed).
  * ``test``: every scene contains at least one object with a held-out pair.
Each example is sampled from its own generator ``default_rng([seed, split, index])`` (rejection sampling for the
split rule), so a build is deterministic (same PNG bytes every time) and independent of example order.

Images are stored as PNG bytes (flat colours compress ~50x; raw uint8 tensors would make the default train
split a gigabyte). Storage is array_record through TFDS with plain ``Tensor``/``Text`` features, which TFDS
writes and reads without TensorFlow (``tfds.features.Image`` would need TensorFlow to encode).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import threading
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

import tensorflow_datasets as tfds

# Colours are spread in hue and kept >= 100 apart in RGB (closest pair: orange-yellow), and no blend of a colour
# with the background comes within the checker's tolerance of another colour (tests/test_shapes_checker.py).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (250, 220, 0),
    "purple": (140, 40, 180),
    "orange": (255, 120, 0),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
MAX_OBJECTS = 4
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
# The structured attributes of an element (what SceneSpec.from_features reads); pass them through the pipeline
# with ``make_preprocess_fn(..., keep=ATTRIBUTE_FEATURES)`` to score generations with eval/shapes_checker.py.
ATTRIBUTE_FEATURES = ("num_objects", "object_colors", "object_shapes", "relation")


def is_held_out(color: str | int, shape: str | int) -> bool:
    """The held-out colour-shape rule (see the module docstring)."""
    c = COLORS.index(color) if isinstance(color, str) else int(color)
    s = SHAPES.index(shape) if isinstance(shape, str) else int(shape)
    return c == (2 * s + 1) % len(COLORS)


HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for s in SHAPES for c in COLORS if is_held_out(c, s))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """What a caption says: the objects (colour, shape) and, for two-object scenes, their relation.

    A COUNT scene has ``relation=None`` and ``len(objects)`` identical objects; a RELATION scene has two objects
    of different colours and ``relation`` in RELATIONS, meaning "objects[0] <relation> objects[1]".
    """

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None

    def __post_init__(self):
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"SceneSpec needs 1..{MAX_OBJECTS} objects, got {len(self.objects)}")
        for color, shape in self.objects:
            if color not in PALETTE or shape not in SHAPES:
                raise ValueError(f"SceneSpec object ({color!r}, {shape!r}): colour must be one of {COLORS}, "
                                 f"shape one of {SHAPES}")
        if self.relation is None:
            if len(set(self.objects)) != 1:
                raise ValueError(f"a count scene has identical objects, got {self.objects}")
        else:
            if self.relation not in RELATIONS:
                raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
            if len(self.objects) != 2 or self.objects[0][0] == self.objects[1][0]:
                raise ValueError(f"a relation scene has two objects of different colours, got {self.objects}")

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def caption(self) -> str:
        if self.relation is None:
            color, shape = self.objects[0]
            if self.count == 1:
                return f"{_article(color)} {color} {shape}"
            return f"{NUMBER_WORDS[self.count]} {color} {shape}s"
        (c0, s0), (c1, s1) = self.objects
        return f"{_article(c0)} {c0} {s0} {self.relation} {_article(c1)} {c1} {s1}"

    def to_features(self) -> dict[str, np.ndarray]:
        colors = np.full((MAX_OBJECTS,), -1, np.int32)
        shapes = np.full((MAX_OBJECTS,), -1, np.int32)
        for i, (c, s) in enumerate(self.objects):
            colors[i], shapes[i] = COLORS.index(c), SHAPES.index(s)
        relation = -1 if self.relation is None else RELATIONS.index(self.relation)
        return {"num_objects": np.int32(self.count), "object_colors": colors, "object_shapes": shapes,
                "relation": np.int32(relation)}

    @classmethod
    def from_features(cls, features: Mapping[str, Any]) -> "SceneSpec":
        n = int(np.asarray(features["num_objects"]))
        colors = np.asarray(features["object_colors"])[:n]
        shapes = np.asarray(features["object_shapes"])[:n]
        relation = int(np.asarray(features["relation"]))
        return cls(tuple((COLORS[int(c)], SHAPES[int(s)]) for c, s in zip(colors, shapes)),
                   None if relation < 0 else RELATIONS[relation])


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_REL_RE = "|".join(re.escape(r) for r in RELATIONS)
_COUNT_CAPTION = re.compile(rf"^(a|an|one|two|three|four) ({_COLOR_RE}) ({_SHAPE_RE})s?$")
_RELATION_CAPTION = re.compile(rf"^an? ({_COLOR_RE}) ({_SHAPE_RE}) ({_REL_RE}) an? ({_COLOR_RE}) ({_SHAPE_RE})$")


def parse_caption(caption: str) -> SceneSpec:
    """The inverse of ``SceneSpec.caption`` (so free-text eval prompts in this grammar can be checked)."""
    text = " ".join(caption.strip().lower().rstrip(".").split())
    m = _COUNT_CAPTION.match(text)
    if m:
        word, color, shape = m.groups()
        count = 1 if word in ("a", "an") else NUMBER_WORDS.index(word)
        return SceneSpec(((color, shape),) * count)
    m = _RELATION_CAPTION.match(text)
    if m:
        c0, s0, rel, c1, s1 = m.groups()
        return SceneSpec(((c0, s0), (c1, s1)), rel)
    raise ValueError(f"caption {caption!r} is not in the shapes grammar ('two red circles', "
                     f"'a red circle to the left of a blue square')")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the objects of a scene go: centres (x, y) and half-extents, in pixels of the output image."""

    centers: tuple[tuple[float, float], ...]
    half_sizes: tuple[float, ...]


def _allowed_pair(split: str, rng: np.random.Generator) -> tuple[str, str]:
    while True:
        pair = (COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
        if split == "test" or not is_held_out(*pair):
            return pair


def sample_spec(rng: np.random.Generator, split: str, *, max_count: int = 3, relation_prob: float = 0.5) -> SceneSpec:
    """One scene description following the split's held-out rule (see the module docstring)."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {tuple(_SPLIT_CODES)}")
    while True:
        if rng.random() < relation_prob:
            first = _allowed_pair(split, rng)
            second = _allowed_pair(split, rng)
            if first[0] == second[0]:
                continue
            spec = SceneSpec((first, second), RELATIONS[rng.integers(len(RELATIONS))])
        else:
            spec = SceneSpec((_allowed_pair(split, rng),) * int(rng.integers(1, max_count + 1)))
        if split != "test" or any(is_held_out(c, s) for c, s in spec.objects):
            return spec


def _boxes_apart(c0, r0, c1, r1, gap) -> bool:
    # Axis-aligned bounding boxes separated by at least `gap` pixels along some axis, so no two shapes touch.
    return abs(c0[0] - c1[0]) >= r0 + r1 + gap or abs(c0[1] - c1[1]) >= r0 + r1 + gap


# The "fixed" layout: where each object of a scene goes, as fractions of the image side (x, y), and its half size.
# Count scenes sit in a row (four: a 2x2 block); relation scenes on the relation's axis, object 0 on its side.
_FIXED_COUNT_CENTERS = {1: ((0.5, 0.5),), 2: ((0.28, 0.5), (0.72, 0.5)), 3: ((0.18, 0.5), (0.5, 0.5), (0.82, 0.5)),
                        4: ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7))}
_FIXED_RELATION_CENTERS = {"to the left of": ((0.28, 0.5), (0.72, 0.5)), "to the right of": ((0.72, 0.5), (0.28, 0.5)),
                           "above": ((0.5, 0.28), (0.5, 0.72)), "below": ((0.5, 0.72), (0.5, 0.28))}
LAYOUTS = ("random", "fixed")


def fixed_placement(spec: SceneSpec, resolution: int, rng: np.random.Generator, *, jitter: float = 0.0) -> Placement:
    """The "fixed" layout: the caption determines the picture up to a uniform +-``jitter`` (fraction of the side)
    shift of each object. A text-to-latent regressor (the MLLM's MSE, docs/design.md §6) then has one target per caption
    instead of the blank-canvas mean over random positions: what lets a tiny system trained for minutes on CPU
    learn colour and shape. Still never touching, and relation scenes keep their margin (jitter <= 0.03)."""
    if not 0.0 <= jitter <= 0.03:
        raise ValueError(f"ShapesOptions.jitter must be in [0, 0.03] (objects would touch), got {jitter}")
    half = (0.16 if spec.count <= 2 else 0.11) * resolution
    centers = (_FIXED_COUNT_CENTERS[spec.count] if spec.relation is None
               else _FIXED_RELATION_CENTERS[spec.relation])
    out = []
    for x, y in centers:
        dx, dy = rng.uniform(-jitter, jitter, size=2) if jitter else (0.0, 0.0)
        out.append(((x + dx) * resolution, (y + dy) * resolution))
    return Placement(tuple(out), (half,) * spec.count)


def sample_placement(spec: SceneSpec, resolution: int, rng: np.random.Generator) -> Placement:
    """The "random" layout: sizes and non-touching positions drawn at random; for relation scenes the relation
    holds with a clear margin."""
    gap = max(2.0, 0.04 * resolution)
    margin = max(1.0, 0.02 * resolution)
    lo, hi = (0.10, 0.17) if spec.count <= 2 else (0.08, 0.12)
    for _ in range(1000):
        half = [float(rng.uniform(lo, hi)) * resolution for _ in spec.objects]
        centers = [(float(rng.uniform(r + margin, resolution - r - margin)),
                    float(rng.uniform(r + margin, resolution - r - margin))) for r in half]
        if any(not _boxes_apart(centers[i], half[i], centers[j], half[j], gap)
               for i in range(len(half)) for j in range(i)):
            continue
        if spec.relation is not None:
            dx = centers[1][0] - centers[0][0]  # > 0: object 0 is left of object 1
            dy = centers[1][1] - centers[0][1]  # > 0: object 0 is above object 1 (image y grows downwards)
            along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                             "above": (dy, dx), "below": (-dy, dx)}[spec.relation]
            # Object 0 entirely on its side of object 1 along the relation axis, and that axis dominant.
            if along < half[0] + half[1] + gap or abs(across) > 0.5 * along:
                continue
        return Placement(tuple(centers), tuple(half))
    raise RuntimeError(f"could not place {spec.caption!r} at resolution {resolution} after 1000 tries")


def render(spec: SceneSpec, placement: Placement, resolution: int, *, supersample: int = 4) -> np.ndarray:
    """Draw the scene: uint8 (resolution, resolution, 3). ``supersample`` > 1 anti-aliases (box downscale)."""
    ss = max(1, int(supersample))
    size = resolution * ss
    canvas = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for (color, shape), (cx, cy), r in zip(spec.objects, placement.centers, placement.half_sizes):
        fill = PALETTE[color]
        x0, y0, x1, y1 = (cx - r) * ss, (cy - r) * ss, (cx + r) * ss, (cy + r) * ss
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle, apex up
            draw.polygon([(cx * ss, y0), (x1, y1), (x0, y1)], fill=fill)
    if ss > 1:
        canvas = canvas.resize((resolution, resolution), resample=Image.Resampling.BOX)
    return np.asarray(canvas, dtype=np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class ShapesOptions:
    """Everything that determines a build (part of the TFDS config name, so different options never mix)."""

    resolution: int = 128
    train_size: int = 20_000
    validation_size: int = 1_000
    test_size: int = 1_000
    seed: int = 0
    max_count: int = 3
    relation_prob: float = 0.5
    supersample: int = 4  # 1 = no anti-aliasing
    layout: str = "random"  # "random" positions and sizes, or "fixed" by the caption (see ``fixed_placement``)
    jitter: float = 0.0     # "fixed" layout only: uniform shift of each object, fraction of the side

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"ShapesOptions.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "random" and self.jitter:
            raise ValueError("ShapesOptions.jitter applies to layout='fixed' only")
        if not 0.0 <= self.jitter <= 0.03:
            raise ValueError(f"ShapesOptions.jitter must be in [0, 0.03] (objects would touch), got {self.jitter}")
        if not 1 <= self.max_count <= MAX_OBJECTS:
            raise ValueError(f"ShapesOptions.max_count must be in 1..{MAX_OBJECTS}, got {self.max_count}")
        if self.resolution < 32:
            raise ValueError(f"ShapesOptions.resolution must be >= 32 pixels, got {self.resolution}")

    def split_size(self, split: str) -> int:
        return {"train": self.train_size, "validation": self.validation_size, "test": self.test_size}[split]

    @property
    def name(self) -> str:
        return (f"r{self.resolution}_n{self.train_size}-{self.validation_size}-{self.test_size}_s{self.seed}"
                f"_c{self.max_count}_p{self.relation_prob:g}_aa{self.supersample}"
                + ("" if self.layout == "random" else f"_fixed{self.jitter:g}"))


def make_example(options: ShapesOptions, split: str, index: int) -> dict[str, Any]:
    """Example ``index`` of ``split``: a pure function of (options, split, index)."""
    rng = np.random.default_rng([options.seed, _SPLIT_CODES[split], index])
    spec = sample_spec(rng, split, max_count=options.max_count, relation_prob=options.relation_prob)
    if options.layout == "fixed":
        placement = fixed_placement(spec, options.resolution, rng, jitter=options.jitter)
    else:
        placement = sample_placement(spec, options.resolution, rng)
    pixels = render(spec, placement, options.resolution, supersample=options.supersample)
    centers = np.zeros((MAX_OBJECTS, 2), np.float32)
    half_sizes = np.zeros((MAX_OBJECTS,), np.float32)
    centers[:spec.count] = np.asarray(placement.centers, np.float32) / options.resolution
    half_sizes[:spec.count] = np.asarray(placement.half_sizes, np.float32) / options.resolution
    return {"image": encode_png(pixels), "caption": spec.caption, "id": f"{split}/{index:07d}",
            **spec.to_features(), "object_centers": centers, "object_half_sizes": half_sizes}


class ShapesConfig(tfds.core.BuilderConfig):
    """A TFDS config carrying ``ShapesOptions``; its name is derived from the options."""

    def __init__(self, options: ShapesOptions | None = None, **kwargs):
        options = options or ShapesOptions()
        super().__init__(name=options.name, version="1.0.0", description=f"shapes {options}", **kwargs)
        self.options = options


class BifrostShapes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the shapes data (see the module docstring). Use ``shapes_builder`` to make one."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ShapesConfig(ShapesOptions())]
    # tfds 4.9.10 looks for a checksums file next to the builder's code through `importlib_resources`, a
    # backport it only installs for Python < 3.9, so on 3.11 the lookup crashes. Nothing is downloaded here.
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        res = self.builder_config.options.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__ + f"\nResolution {res}x{res}; held-out pairs {HELD_OUT_PAIRS}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes
                "caption": tfds.features.Text(),
                "id": tfds.features.Text(),
                "num_objects": tfds.features.Scalar(dtype=np.int32),
                "object_colors": tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=np.int32),
                "object_shapes": tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=np.int32),
                "relation": tfds.features.Scalar(dtype=np.int32),
                "object_centers": tfds.features.Tensor(shape=(MAX_OBJECTS, 2), dtype=np.float32),
                "object_half_sizes": tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=np.float32),
            }),
            homepage="https://arxiv.org/abs/2508.05954",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated locally
        options = self.builder_config.options
        return {split: self._generate_examples(split) for split in _SPLIT_CODES if options.split_size(split) > 0}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        options = self.builder_config.options
        for index in range(options.split_size(split)):
            yield f"{index:07d}", make_example(options, split, index)


class _DropRecord(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _without_custom_config_warning():
    """TFDS logs (absl) a warning for every config outside ``BUILDER_CONFIGS``; every options set but the default
    is one by design here. Drops that one message, nothing else, while a builder is made."""
    logger, drop = logging.getLogger("absl"), _DropRecord("Using custom data configuration")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


_PREPARE_LOCK = threading.Lock()


def shapes_builder(data_dir: str, options: ShapesOptions | None = None) -> BifrostShapes:
    """The array_record shapes builder for ``options`` under ``data_dir`` (call ``download_and_prepare()``)."""
    options = options or ShapesOptions()
    # TFDS refuses a custom config named like a predefined one: name the predefined one instead.
    predefined = {c.name for c in BifrostShapes.BUILDER_CONFIGS}
    config = options.name if options.name in predefined else ShapesConfig(options)
    with _without_custom_config_warning():
        return BifrostShapes(data_dir=data_dir, config=config, file_format="array_record")


def load_shapes(data_dir: str, split: str, options: ShapesOptions | None = None):
    """Builds the data if needed and returns the random-access source of ``split`` (for grain). One thread at a
    time: phases training at once in one process (``bifrost demo``) share the data directory, and TFDS's
    preparation of one dataset must not race with itself."""
    with _PREPARE_LOCK:
        builder = shapes_builder(data_dir, options)
        builder.download_and_prepare()
    return builder.as_data_source(split)


def attribute_distribution(specs: Sequence[SceneSpec]) -> dict[str, dict[Any, float]]:
    """Empirical marginals of colours, shapes, counts and relations over ``specs`` (for reports)."""
    out: dict[str, dict[Any, float]] = {"color": {}, "shape": {}, "count": {}, "relation": {}}
    for spec in specs:
        for c, s in spec.objects:
            out["color"][c] = out["color"].get(c, 0) + 1
            out["shape"][s] = out["shape"].get(s, 0) + 1
        out["count"][spec.count] = out["count"].get(spec.count, 0) + 1
        if spec.relation is not None:
            out["relation"][spec.relation] = out["relation"].get(spec.relation, 0) + 1
    return {k: {v: n / max(1, sum(d.values())) for v, n in sorted(d.items())} for k, d in out.items()}
