"""Image helpers of generation and evaluation: fitting inputs to the pipeline's size, PNG files, grids."""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np
from PIL import Image


def fit_images(images, size: tuple[int, int]) -> np.ndarray:
    """uint8 (B, H, W, 3) -> (B, size[0], size[1], 3): the centred crop of the target aspect ratio, bicubic-resized
    with PIL (unchanged when already at ``size``)."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {images.shape}")
    th, tw = size
    if images.shape[1:3] == (th, tw):
        return images
    out = []
    for im in images:
        h, w = im.shape[:2]
        scale = min(h / th, w / tw)
        ch, cw = th * scale, tw * scale
        top, left = (h - ch) / 2.0, (w - cw) / 2.0
        pil = Image.fromarray(im).resize((tw, th), resample=Image.Resampling.BICUBIC,
                                         box=(left, top, left + cw, top + ch))
        out.append(np.asarray(pil, np.uint8))
    return np.stack(out)


def save_png(path: str, image: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) PNG atomically (temporary file in the same directory, then rename)."""

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".png", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            Image.fromarray(np.asarray(image, np.uint8)).save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def make_grid(images: np.ndarray, cols: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 (B, H, W, 3) -> one (rows*H + ..., cols*W + ..., 3) grid image, white padding between cells."""
    images = np.asarray(images)
    b, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = im
    return grid
