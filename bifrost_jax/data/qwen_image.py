"""Image preprocessing for the Qwen2.5-VL vision tower.

Two paths that give the same patches:

- ``preprocess(images)``: host-side NumPy + PIL, matching transformers' ``Qwen2VLImageProcessorPil`` (the
  PIL-based processor of transformers 5.x): ``smart_resize`` (sides multiples of 28, pixel count within
  [min_pixels, max_pixels]), bicubic PIL resize, rescale 1/255, CLIP mean/std, duplication to 2 temporal frames,
  flattening to ``(patches, 3*2*14*14)`` vectors in merge-unit-major order, and ``image_grid_thw``.
- ``patchify(images)``: jnp, for images already at a fixed size (e.g. 448x448) in [0, 1] or [-1, 1], so training
  can build the ViT view on device (no resize). Equal to ``preprocess`` on an image already at that size.

Patch vector layout: (channel, frame, row, col) flattened, i.e. the PyTorch Conv3d weight layout. Patch order:
merged units row-major over the (H/28, W/28) grid, the 2x2 patches of a unit row-major inside it.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# OpenAI CLIP statistics (transformers OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(h, w) multiples of ``factor``, close to the input aspect ratio, with min_pixels <= h*w <= max_pixels
    (the processor's rule: round each side; if too large scale down with floor, if too small scale up with
    ceil)."""
    if min(height, width) <= 0:
        raise ValueError(f"smart_resize: image size {height}x{width} is empty")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"smart_resize: aspect ratio {max(height, width) / min(height, width):.1f} of a "
                         f"{height}x{width} image exceeds 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb_pil(image):
    """A PIL RGB image from a PIL image (transparency composited onto white, as the processor does) or a uint8
    array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"preprocess: arrays must be uint8 (H, W[, C]); got dtype {image.dtype} (convert "
                             "float images with patchify, or to uint8 first)")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"preprocess: expected an (H, W[, 1|3|4]) array, got shape {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"preprocess: expected a PIL image or a uint8 array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _patches(x, xp, patch_size: int, temporal_patch_size: int, merge_size: int):
    """Normalised images (B, H, W, C) -> (B, (H/p)*(W/p), C*T*p*p) with ``xp`` = numpy or jax.numpy."""
    b, height, width, c = x.shape
    p, m = patch_size, merge_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size*merge_size = {p * m}")
    gh, gw = height // p, width // p
    x = x.reshape(b, gh // m, m, p, gw // m, m, p, c)
    x = xp.transpose(x, (0, 1, 4, 2, 5, 7, 3, 6))          # (B, gh/m, gw/m, m, m, C, p, p)
    x = xp.broadcast_to(x[:, :, :, :, :, :, None], x.shape[:6] + (temporal_patch_size, p, p))
    return x.reshape(b, gh * gw, c * temporal_patch_size * p * p)


def preprocess_image(image, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, patch_size: int = 14,
                     temporal_patch_size: int = 2, merge_size: int = 2, do_resize: bool = True,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
    """One image -> (pixel_values (patches, 1176) float32, grid_thw (1, H/14, W/14))."""
    from PIL import Image

    pil = to_rgb_pil(image)
    if do_resize:
        h, w = smart_resize(pil.height, pil.width, patch_size * merge_size, min_pixels, max_pixels)
        if (h, w) != (pil.height, pil.width):
            pil = pil.resize((w, h), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil)                                  # (H, W, 3) uint8
    # the processor's rounding: uint8 * (1/255) in float64, cast to float32, then (x - mean) / std in float32
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    patches = _patches(x[None], np, patch_size, temporal_patch_size, merge_size)[0]
    grid = (1, x.shape[0] // patch_size, x.shape[1] // patch_size)
    return np.ascontiguousarray(patches, dtype=np.float32), grid


def preprocess(images, **kwargs):
    """Images -> (pixel_values (sum of patches, 1176) float32, image_grid_thw (N, 3) int64), concatenated as the
    transformers processor returns them. For a batched ViT call with one shared grid use
    ``pixel_values.reshape(N, -1, 1176)`` (see ``stack_same_grid``)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    out = [preprocess_image(im, **kwargs) for im in images]
    return (np.concatenate([p for p, _ in out], axis=0),
            np.asarray([g for _, g in out], dtype=np.int64))


def stack_same_grid(pixel_values, image_grid_thw):
    """(sum of patches, D), (N, 3) -> (N, patches, D) and the shared (1, h, w); raises if the grids differ."""
    grids = np.asarray(image_grid_thw)
    if not (grids == grids[:1]).all():
        raise ValueError(f"stack_same_grid: images have different grids {grids.tolist()}; resize them to one size")
    n = len(grids)
    return np.asarray(pixel_values).reshape(n, -1, np.shape(pixel_values)[-1]), tuple(int(v) for v in grids[0])


def patchify(images, *, value_range: tuple[float, float] = (0.0, 1.0), patch_size: int = 14,
             temporal_patch_size: int = 2, merge_size: int = 2, mean: Sequence[float] = CLIP_MEAN,
             std: Sequence[float] = CLIP_STD):
    """Fixed-size images (B, H, W, 3) in ``value_range`` ((0, 1) or (-1, 1)) -> ViT pixel_values
    (B, (H/14)*(W/14), 1176) float32, in jnp (jit-able; H and W multiples of 28). No resize."""
    import jax.numpy as jnp

    lo, hi = value_range
    x = (jnp.asarray(images).astype(jnp.float32) - lo) / (hi - lo)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return _patches(x, jnp, patch_size, temporal_patch_size, merge_size)


def grid_thw_for(height: int, width: int, patch_size: int = 14) -> tuple[int, int, int]:
    """The static grid of a fixed-size image: (1, H/14, W/14)."""
    return (1, height // patch_size, width // patch_size)
