"""Image helpers of generation and evaluation: fitting inputs to the pipeline's size, PNG files, grids."""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont


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


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines no wider than ``width`` pixels (a longer single word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def make_labelled_grid(images: np.ndarray, col_labels, row_labels, *, pad: int = 2,
                       label_width: int = 200) -> np.ndarray:
    """``make_grid`` with ``len(col_labels)`` columns, a header line naming each column above it and each row's
    label (e.g. its prompt, word-wrapped into ``label_width`` pixels) written to its left, black on white in PIL's
    built-in bitmap font (no font file needed). ``images`` holds the cells row by row."""
    images = np.asarray(images)
    cols, rows = len(col_labels), len(row_labels)
    if images.ndim != 4 or images.shape[0] != cols * rows:
        raise ValueError(f"make_labelled_grid: {len(row_labels)} row labels x {cols} column labels need "
                         f"{rows * cols} images, got an array of shape {images.shape}")
    grid = make_grid(images, cols=cols, pad=pad)
    h, w = images.shape[1:3]
    font = ImageFont.load_default_imagefont()
    line = font.getbbox("Ag")[3] + 2
    header = line + 2 * pad
    canvas = Image.new("RGB", (label_width + pad + grid.shape[1], header + grid.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (label_width + pad, header))
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels):
        x = label_width + pad + c * (w + pad) + (w - font.getlength(text)) / 2
        draw.text((max(x, label_width + pad + c * (w + pad)), pad), text, fill=(0, 0, 0), font=font)
    for r, text in enumerate(row_labels):
        lines = _wrap(text, font, label_width - 2 * pad)[:max(1, h // line)]
        y = header + r * (h + pad) + (h - len(lines) * line) / 2
        for i, t in enumerate(lines):
            draw.text((pad, y + i * line), t, fill=(0, 0, 0), font=font)
    return np.asarray(canvas, np.uint8)
