"""Automatic checker for the shapes data: reads colour, shape, count and relative position from PIXELS.

Pipeline for one (H, W, 3) uint8 image:
  1. colour segmentation: each pixel takes the nearest of the palette colours and the background; it is kept only
     if that is an object colour within ``tolerance`` (RGB distance). Anti-aliased edges (blends with the
     background) fall outside the tolerance and are dropped, which is also why the palette keeps blends far from
     other colours;
  2. per colour, connected components (8-connected), dropping specks smaller than ``min_area`` of the image;
     each kept component gets a 3x3 closing and its holes filled (noise and compression leave pits), on its own
     so that scattered specks never merge into an object;
  3. shape of each component by template matching in its bounding box: the best IoU among an inscribed
     ellipse (circle), the full box (square), a diamond (a rotated square) and isosceles triangles pointing up,
     down, left or right (triangle). Unlike fill-ratio thresholds this survives JPEG-like corner rounding.
     A component that matches no template with IoU >= ``min_iou`` is not an object (clutter, noise);
  4. relation between the components matching the prompt's two objects, from their centroids: the dominant
     axis of the displacement decides left/right vs above/below.

Per prompt (``SceneSpec``) the attributes scored are:
  * color:    the set of detected colours equals the prompt's;
  * shape:    the set of detected shapes equals the prompt's;
  * count:    the number of detected objects equals the prompt's;
  * relation: (relation prompts only) each prompt object is identified (the only detection of its colour, with
              the prompt's shape) and their relation holds (clutter cannot pass it by luck);
  * position: the relation alone, scored only on the relation prompts whose two objects were identified;
  * overall:  the multiset of detected (colour, shape) objects equals the prompt's, and the relation holds.

CHANCE LEVELS are computed honestly from the attribute distribution of the prompts being scored: the expected
score of a "generator" that ignores its prompt and outputs a perfect rendering of ANOTHER prompt drawn from the
same distribution (ideal detections of prompt j scored against prompt i, over many pairs i != j). For a uniform
single-colour attribute that is ~1/num_colours; for sets, counts and relations it is whatever the distribution
makes it. For ``position`` (objects given) the chance level is that of a random relation from the prompts'
relation distribution, sum_r p(r)^2 (~1/4). Reports put each accuracy beside its chance level.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from bifrost_jax.data.shapes import ATTRIBUTE_FEATURES, BACKGROUND, COLORS, PALETTE, SceneSpec

ATTRIBUTES = ("color", "shape", "count", "relation", "position", "overall")


@dataclasses.dataclass(frozen=True)
class CheckerConfig:
    """tolerance: max RGB distance of a pixel to its palette colour; min_area: smallest object, as a fraction of
    the image area; min_iou: least template IoU of an object."""

    tolerance: float = 80.0
    min_area: float = 0.004
    min_iou: float = 0.6


@dataclasses.dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    area: int
    centroid: tuple[float, float]  # (x, y) in pixels


_PALETTE_RGB = np.asarray([PALETTE[c] for c in COLORS] + [BACKGROUND], np.float32)
_STRUCTURE_8 = np.ones((3, 3), bool)


def segment_colors(image: np.ndarray, tolerance: float) -> np.ndarray:
    """(H, W) int: index into COLORS of each pixel's colour, -1 for background / unassigned."""
    pixels = np.asarray(image, np.float32)
    if pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {pixels.shape}")
    dist = np.linalg.norm(pixels[:, :, None, :] - _PALETTE_RGB[None, None], axis=-1)  # (H, W, colours + 1)
    nearest = np.argmin(dist, axis=-1)
    near_enough = np.take_along_axis(dist, nearest[..., None], axis=-1)[..., 0] <= tolerance
    return np.where((nearest < len(COLORS)) & near_enough, nearest, -1)


# Shape templates on the unit square (u right, v down), as functions of pixel-centre coordinates.
_TEMPLATES = (
    ("circle", lambda u, v: (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25),
    ("square", lambda u, v: np.ones_like(u, dtype=bool)),
    ("square", lambda u, v: np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5),  # diamond: a square rotated 45 degrees
    ("triangle", lambda u, v: np.abs(u - 0.5) <= v / 2),  # apex up (as rendered)
    ("triangle", lambda u, v: np.abs(u - 0.5) <= (1 - v) / 2),
    ("triangle", lambda u, v: np.abs(v - 0.5) <= u / 2),
    ("triangle", lambda u, v: np.abs(v - 0.5) <= (1 - u) / 2),
)


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """(circle / square / triangle, IoU) of one component's boolean mask: the template of best IoU in its box."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    v, u = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    best_iou, best = -1.0, "square"
    for name, template in _TEMPLATES:
        t = template(u, v)
        iou = np.logical_and(t, box).sum() / np.logical_or(t, box).sum()
        if iou > best_iou:
            best_iou, best = iou, name
    return best, float(best_iou)


def detect_objects(image: np.ndarray, config: CheckerConfig = CheckerConfig()) -> list[Detection]:
    """All objects in ``image``: colour, shape, area and centroid, largest first."""
    labels = segment_colors(image, config.tolerance)
    min_pixels = max(4, int(round(config.min_area * labels.size)))
    found = []
    for ci, color in enumerate(COLORS):
        components, n = ndimage.label(labels == ci, structure=_STRUCTURE_8)
        if n == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        boxes = ndimage.find_objects(components)
        for k in np.nonzero(sizes >= min_pixels)[0]:
            if k == 0:
                continue
            rows, cols = boxes[k - 1]
            # Pad by one pixel so the closing can act at the box edge.
            component = np.pad(components[rows, cols] == k, 1)
            component = ndimage.binary_fill_holes(component | ndimage.binary_closing(component, _STRUCTURE_8))
            shape, iou = classify_shape(component)
            if iou < config.min_iou:
                continue
            ys, xs = np.nonzero(component)
            found.append(Detection(color, shape, int(xs.size),
                                   (float(xs.mean() + cols.start - 1), float(ys.mean() + rows.start - 1))))
    return sorted(found, key=lambda d: -d.area)


def relation_between(a: tuple[float, float], b: tuple[float, float]) -> str:
    """The relation of a point ``a`` to ``b`` (image y grows downwards), by the dominant axis."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _identify(detections: Sequence[Detection], color: str, shape: str) -> Detection | None:
    # The prompt object is identified only if it is the ONE detection of its colour and has the right shape:
    # with several candidates "the red circle" is ambiguous, and clutter would pass the relation by luck.
    same_color = [d for d in detections if d.color == color]
    return same_color[0] if len(same_color) == 1 and same_color[0].shape == shape else None


def score(detections: Sequence[Detection], spec: SceneSpec) -> dict[str, bool]:
    """Per-attribute correctness of ``detections`` for the prompt ``spec`` (relation only for relation prompts)."""
    result = {
        "color": {d.color for d in detections} == {c for c, _ in spec.objects},
        "shape": {d.shape for d in detections} == {s for _, s in spec.objects},
        "count": len(detections) == spec.count,
    }
    same_objects = (collections.Counter((d.color, d.shape) for d in detections)
                    == collections.Counter(spec.objects))
    if spec.relation is not None:
        first, second = (_identify(detections, c, s) for c, s in spec.objects)
        identified = first is not None and second is not None
        result["relation"] = identified and relation_between(first.centroid, second.centroid) == spec.relation
        if identified:
            result["position"] = result["relation"]
        result["overall"] = same_objects and result["relation"]
    else:
        result["overall"] = same_objects
    return result


def check_image(image: np.ndarray, spec: SceneSpec, config: CheckerConfig = CheckerConfig()) -> dict[str, bool]:
    """Reads ``image`` and scores it against the prompt ``spec``."""
    return score(detect_objects(image, config), spec)


def ideal_detections(spec: SceneSpec, centers: np.ndarray | None = None) -> list[Detection]:
    """What a perfect image of ``spec`` reads as (for chance levels); ``centers`` (N, 2) or a canonical layout."""
    if centers is None:
        # Any layout satisfying the relation; count scenes need no positions.
        offset = {"to the left of": (-1, 0), "to the right of": (1, 0), "above": (0, -1), "below": (0, 1),
                  None: (0, 0)}[spec.relation]
        centers = np.asarray([offset, (0, 0)] + [(i, i) for i in range(2, spec.count)], np.float32)[:spec.count]
    return [Detection(c, s, 1, (float(x), float(y))) for (c, s), (x, y) in zip(spec.objects, centers)]


def chance_levels(specs: Sequence[SceneSpec], *, num_shifts: int = 64) -> dict[str, float]:
    """Expected per-attribute score when each prompt gets a perfect image of a different prompt from ``specs``.

    Pairs prompt i with the ideal image of prompt (i + k) mod n for k = 1..num_shifts (every pair once when
    n <= num_shifts + 1), i.e. an estimate of the attribute-distribution chance level (module docstring).
    """
    n = len(specs)
    if n < 2:
        raise ValueError(f"chance_levels needs at least 2 prompts, got {n}")
    ideal = [ideal_detections(s) for s in specs]
    totals: dict[str, list[int]] = {a: [0, 0] for a in ATTRIBUTES}
    for k in range(1, min(num_shifts, n - 1) + 1):
        for i, spec in enumerate(specs):
            for attr, ok in score(ideal[(i + k) % n], spec).items():
                totals[attr][0] += int(ok)
                totals[attr][1] += 1
    chance = {a: (hit / cnt if cnt else float("nan")) for a, (hit, cnt) in totals.items()}
    relations = collections.Counter(s.relation for s in specs if s.relation is not None)
    total = sum(relations.values())
    chance["position"] = sum((k / total) ** 2 for k in relations.values()) if total else float("nan")
    return chance


def specs_from_batch(batch: dict) -> list[SceneSpec]:
    """The prompts of a batch that kept ``shapes.ATTRIBUTE_FEATURES`` (padding slots with valid=False dropped)."""
    valid = np.asarray(batch.get("valid", np.ones(len(batch["num_objects"]), bool)))
    return [SceneSpec.from_features({k: np.asarray(batch[k])[i] for k in ATTRIBUTE_FEATURES})
            for i in np.nonzero(valid)[0]]


@dataclasses.dataclass
class ShapesReport:
    """Per-attribute accuracy with its chance level and the number of prompts it applies to."""

    accuracy: dict[str, float]
    chance: dict[str, float]
    counts: dict[str, int]

    def format(self) -> str:
        lines = [f"{'attribute':<10} {'accuracy':>9} {'chance':>9} {'n':>6}"]
        for a in ATTRIBUTES:
            if self.counts.get(a):
                lines.append(f"{a:<10} {self.accuracy[a]:>9.4f} {self.chance[a]:>9.4f} {self.counts[a]:>6d}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, float]:
        out = {}
        for a in ATTRIBUTES:
            if self.counts.get(a):
                out[f"{a}_accuracy"], out[f"{a}_chance"] = self.accuracy[a], self.chance[a]
        return out


def evaluate(images: Iterable[np.ndarray], specs: Sequence[SceneSpec], *, config: CheckerConfig = CheckerConfig(),
             chance_specs: Sequence[SceneSpec] | None = None) -> ShapesReport:
    """Scores generated ``images`` against their prompts ``specs``.

    Chance levels come from ``chance_specs`` (default: ``specs`` themselves, i.e. the evaluated distribution).
    """
    totals: dict[str, list[int]] = {a: [0, 0] for a in ATTRIBUTES}
    n_images = 0
    for image, spec in zip(images, specs, strict=True):
        n_images += 1
        for attr, ok in check_image(image, spec, config).items():
            totals[attr][0] += int(ok)
            totals[attr][1] += 1
    if n_images == 0:
        raise ValueError("evaluate got no images")
    accuracy = {a: (hit / cnt if cnt else float("nan")) for a, (hit, cnt) in totals.items()}
    counts = {a: cnt for a, (_, cnt) in totals.items()}
    return ShapesReport(accuracy, chance_levels(list(chance_specs or specs)), counts)
