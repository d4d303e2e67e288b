"""Host-side image preprocessing: one decoded image -> the ViT view, the VAE view and the caption.

Both views are cut from the SAME square crop of the source image (docs/design.md §5.4: the ViT grid at ``vit_resolution`` and
the FLUX-VAE grid at ``vae_resolution`` must cover the same pixels, or the ControlNet learns a shifted target).
The crop is the centred square of side ``short side`` (eval) or a random square (training), and each view is
resized from the original pixels with PIL's bicubic filter (antialiased when downscaling, like the reference
``image_transform``), so "resize short side, then centre crop" and "crop, then resize" give the same result.

Views (NHWC, batch-first once batched):
  * ``vit_pixels``: (vit_resolution, vit_resolution, 3), uint8 [0, 255] or float32 [0, 1]. The Qwen
    normalisation and patchify happen on device (``data/qwen_image.py``).
  * ``vae_pixels``: (vae_resolution, vae_resolution, 3), float32 in [-1, 1].

``make_preprocess_fn`` builds the ``fn(element, rng)`` that ``data/pipeline.py`` maps over a data source; its
errors for undecodable images are ``CorruptImageError`` so the pipeline can skip and count them.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image


class CorruptImageError(ValueError):
    """An image could not be decoded (truncated file, not an image, decompression bomb, ...)."""


def decode_image(data: bytes | np.ndarray | Image.Image, *, name: str = "") -> Image.Image:
    """Encoded bytes (any PIL format), an (H, W[, C]) uint8 array or a PIL image -> an RGB PIL image.

    Transparent images are composited onto white (``convert("RGB")`` alone would expose whatever colour the
    transparent pixels happen to hold). Raises ``CorruptImageError`` naming ``name`` if decoding fails.
    """
    where = f" ({name})" if name else ""
    try:
        if isinstance(data, Image.Image):
            image = data
        elif isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim in (2, 3):
            image = Image.fromarray(data)
        elif isinstance(data, (bytes, bytearray, memoryview, np.bytes_)) or (
            isinstance(data, np.ndarray) and data.dtype == object and data.ndim == 0
        ):
            raw = data.item() if isinstance(data, np.ndarray) else data
            if not raw:
                raise CorruptImageError(f"empty image bytes{where}")
            image = Image.open(io.BytesIO(bytes(raw)))
            image.load()  # force the full decode here, so truncation is caught now and not at resize time
        else:
            raise CorruptImageError(f"cannot decode an image from {type(data).__name__}{where}")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.width < 1 or image.height < 1:
            raise CorruptImageError(f"image has size {image.size}{where}")
        return image
    except CorruptImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        # PIL reports bad data as any of these (UnidentifiedImageError is an OSError).
        raise CorruptImageError(f"undecodable image{where}: {type(e).__name__}: {e}") from e


def crop_box(width: int, height: int, *, random: bool = False, rng: np.random.Generator | None = None,
             min_scale: float = 1.0) -> tuple[float, float, float, float]:
    """The square crop (left, top, right, bottom) in source pixels shared by both views.

    Centre crop: the centred square of side min(width, height). Random crop: a square of side
    ``scale * min(width, height)``, scale ~ U[min_scale, 1], at a uniformly random position.
    """
    short = float(min(width, height))
    if not random:
        side = short
        left, top = (width - side) / 2.0, (height - side) / 2.0
    else:
        if rng is None:
            raise ValueError("crop_box(random=True) needs an rng (np.random.Generator)")
        if not 0.0 < min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
        side = short * float(rng.uniform(min_scale, 1.0)) if min_scale < 1.0 else short
        left = float(rng.uniform(0.0, width - side)) if width > side else 0.0
        top = float(rng.uniform(0.0, height - side)) if height > side else 0.0
    return (left, top, left + side, top + side)


def resize_crop(image: Image.Image, box: Sequence[float], resolution: int) -> np.ndarray:
    """Bicubic resize of ``box`` of ``image`` to (resolution, resolution): uint8 (R, R, 3)."""
    out = image.resize((resolution, resolution), resample=Image.Resampling.BICUBIC, box=tuple(box))
    return np.asarray(out, dtype=np.uint8)


def to_vae_range(pixels_uint8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], as the FLUX VAE expects."""
    return pixels_uint8.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """How to turn one image into the two model views.

    vit_resolution / vae_resolution: output sides in pixels (e.g. 448 and 512 for the released model; 0 skips
    that view). random_crop: training-time random square crop (else centred). min_crop_scale: smallest random
    crop side as a fraction of the short side. vit_dtype: "uint8" ([0, 255]) or "float32" ([0, 1]).
    """

    vit_resolution: int = 448
    vae_resolution: int = 512
    random_crop: bool = False
    min_crop_scale: float = 1.0
    vit_dtype: str = "uint8"

    def __post_init__(self):
        if self.vit_dtype not in ("uint8", "float32"):
            raise ValueError(f"ViewConfig.vit_dtype must be 'uint8' or 'float32', got {self.vit_dtype!r}")
        if self.vit_resolution < 0 or self.vae_resolution < 0 or not (self.vit_resolution or self.vae_resolution):
            raise ValueError(f"ViewConfig resolutions must be >= 0 and not both 0, got vit={self.vit_resolution} "
                             f"vae={self.vae_resolution}")


def make_views(image: Image.Image, config: ViewConfig, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """One RGB image -> {"vit_pixels", "vae_pixels"} cut from one shared crop (see the module docstring)."""
    box = crop_box(image.width, image.height, random=config.random_crop, rng=rng, min_scale=config.min_crop_scale)
    views = {}
    if config.vit_resolution:
        vit = resize_crop(image, box, config.vit_resolution)
        views["vit_pixels"] = vit if config.vit_dtype == "uint8" else vit.astype(np.float32) / 255.0
    if config.vae_resolution:
        views["vae_pixels"] = to_vae_range(resize_crop(image, box, config.vae_resolution))
    return views


def as_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def element_name(element: Mapping[str, Any]) -> str:
    """A human-readable id of a source element for log lines ("file_name" or "id" if present)."""
    for key in ("file_name", "id"):
        if key in element:
            return as_text(element[key])
    return ""


def make_preprocess_fn(config: ViewConfig, *,
                       keep: Sequence[str] = ()) -> Callable[[Mapping[str, Any], np.random.Generator], dict]:
    """The per-element map for ``data/pipeline.py``: ``fn(element, rng) -> dict``.

    Input element: {"image": encoded bytes or uint8 array, "caption": text, ...} (every builder in ``data/``).
    Output: the views of ``make_views``, "caption" (str) and the fields named in ``keep`` unchanged (e.g. "label"
    or the shapes attributes). ``rng`` drives the random crop; the pipeline derives it from the seed and the
    element's position, so crops are reproducible and resumable.
    """

    def preprocess(element: Mapping[str, Any], rng: np.random.Generator) -> dict:
        image = decode_image(element["image"], name=element_name(element))
        out = make_views(image, config, rng)
        out["caption"] = as_text(element.get("caption", ""))
        for key in keep:
            if key not in element:
                raise KeyError(f"preprocess keep={tuple(keep)}: element has no field {key!r} "
                               f"(fields: {sorted(element)})")
            out[key] = element[key]
        return out

    return preprocess
