"""Reconstruction quality (paper Figure 4, docs/design.md §10.3): real image -> ViT patch-level latents -> ControlNet + FLUX ->
image, scored against the real image at the output size.

Metrics, per image then averaged over the split (sums and counts all-reduced across hosts, so every host reports
the same numbers):

* PSNR = 10 log10(255^2 / MSE) over all pixels and channels (skimage ``peak_signal_noise_ratio``, data_range 255);
* SSIM as skimage ``structural_similarity(..., channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`` (Wang et al. 2004): 11-tap Gaussian window, K1 0.01, K2 0.03, the map averaged
  over the interior (5 px border cropped) and over channels;
* FID between the real and reconstructed images, with a feature extractor (``feature_fn``): the statistics (sum of
  features and of their outer products) are all-reduced, then the Frechet distance of the two Gaussians.
  ``inception_feature_fn(weights)`` is the standard one: pytorch-fid's Inception-v3 (``models.inception``; the
  user's ``pt_inception-2015-12-05-6726825d.pth``, see ``port.inception``), 2048-d pool3 features of the uint8
  images resized to 299x299 as pytorch-fid does. FID over few images is biased (the covariances are rank-deficient
  below ~2048 images): compare FIDs only at equal, large image counts.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from scipy import ndimage

from bifrost_jax import port
from bifrost_jax.data.preprocess import decode_image, element_name
from bifrost_jax.parallel.rules import axis_rules, logical_to_mesh_spec
from bifrost_jax.sample.images import fit_images

SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03


def psnr(a, b, data_range: float = 255.0) -> np.ndarray:
    """Per-image PSNR (dB) of (B, H, W, C) arrays (inf for identical images)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range ** 2 / mse)


def _gaussian_taps(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(a, b, data_range: float = 255.0) -> np.ndarray:
    """Per-image SSIM of (B, H, W, C) arrays (see the module docstring for the exact variant)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    taps = _gaussian_taps()
    pad = (len(taps) - 1) // 2
    if min(a.shape[1:3]) < len(taps):
        raise ValueError(f"SSIM needs images of at least {len(taps)} px per side, got {a.shape[1:3]}")

    def blur(x):  # separable Gaussian over H and W (border values are cropped away below)
        return ndimage.correlate1d(ndimage.correlate1d(x, taps, axis=1, mode="reflect"), taps, axis=2,
                                   mode="reflect")

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ux, uy = blur(a), blur(b)
    vx, vy, vxy = blur(a * a) - ux * ux, blur(b * b) - uy * uy, blur(a * b) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    s = s[:, pad:s.shape[1] - pad, pad:s.shape[2] - pad]
    return s.mean(axis=(1, 2, 3))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the FID formula of pytorch-fid's
    ``calculate_frechet_distance``.

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which (for covariances, symmetric
    PSD) equal those of A S2 A^T where S1 = A^T A; A comes from LAPACK's pivoted Cholesky (rank-revealing, so a
    rank-deficient S1 of few images gives a short A). The same number as the trace of pytorch-fid's
    ``scipy.linalg.sqrtm(S1 @ S2)`` (to ~1e-8 relative on full-rank covariances), ~10x faster at 2048 dimensions,
    and stable where sqrtm of a singular product warns and loses digits (no complex parts, no eps retry)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes mu {mu1.shape}/{mu2.shape}, sigma {sigma1.shape}/{sigma2.shape}")
    a = _psd_factor(sigma1)
    m = a @ sigma2 @ a.T
    eigenvalues = np.linalg.eigvalsh(0.5 * (m + m.T)) if m.size else np.zeros(0)
    trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())  # rounding can give tiny negatives
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _psd_factor(s: np.ndarray) -> np.ndarray:
    """(r, d) A with s = A^T A, r = the numerical rank of the symmetric PSD ``s`` (LAPACK ``dpstrf``: P^T s P = U^T U
    with U upper triangular, so A = U P^T)."""
    from scipy.linalg import lapack
    c, piv, rank, info = lapack.dpstrf(np.array(s, np.float64, order="F"), lower=0)
    if info < 0:
        raise ValueError(f"frechet_distance: dpstrf failed (argument {-info})")
    u = np.triu(c)[:rank]
    a = np.zeros_like(u)
    a[:, piv - 1] = u
    return a


def inception_feature_fn(weights: str, *, mesh=None) -> Callable[[np.ndarray], np.ndarray]:
    """``feature_fn`` for FID: uint8 (B, H, W, 3) images -> (B, 2048) float32 pool3 features of pytorch-fid's
    Inception-v3 loaded from ``weights`` (``port`` kind "inception-fid"), jitted; with a ``mesh`` the weights are
    placed by the logical rules and the batch is sharded on "batch" (rows padded to a multiple of its shards)."""


    module, variables = port.load("inception-fid", weights, mesh=mesh)
    apply = jax.jit(lambda v, x: module.apply(v, x))
    shards = 1
    if mesh is not None:
        spec = logical_to_mesh_spec(("batch", None, None, None))
        axes = spec[0] if spec else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1

    def features(images) -> np.ndarray:
        images = np.asarray(images)
        b = images.shape[0]
        pad = (-b) % shards
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        with axis_rules(mesh):
            x = jax.device_put(images, NamedSharding(mesh, spec)) if mesh is not None else images
            return np.asarray(jax.device_get(apply(variables, x)))[:b]
    return features


class FeatureStats:
    """Running sums of features for mean/covariance (all-reducible: plain sums and a count)."""

    def __init__(self, dim: int):
        self.sum = np.zeros((dim,), np.float64)
        self.outer = np.zeros((dim, dim), np.float64)
        self.count = 0

    def add(self, features) -> None:
        f = np.asarray(features, np.float64)
        self.sum += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def packed(self) -> np.ndarray:
        return np.concatenate([self.sum, self.outer.ravel(), [self.count]])

    @staticmethod
    def mean_cov(packed: np.ndarray, dim: int):
        s, outer, n = packed[:dim], packed[dim:dim + dim * dim].reshape(dim, dim), packed[-1]
        mu = s / n
        cov = (outer - n * np.outer(mu, mu)) / (n - 1)  # unbiased, as np.cov
        return mu, cov


def all_reduce_sum(x: np.ndarray) -> np.ndarray:
    """Sum of ``x`` over hosts (identity with one process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(np.asarray(x))).sum(axis=0)


def evaluate_reconstruction(reconstruct_fn: Callable[..., np.ndarray], batches: Iterable[dict], *,
                            feature_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                            use_captions: bool = False, progress: bool = True) -> dict[str, Any]:
    """PSNR/SSIM (and FID with ``feature_fn``) over ``batches`` of this host, aggregated over all hosts.

    ``batches``: dicts with "vit_pixels" (the ViT view), "target" (the real image at the output size), "valid",
    "example_index" and optionally "caption" (from ``data.pipeline.make_eval_iterator``; every host must yield the
    same number of batches). ``reconstruct_fn(vit_images, prompts, indices) -> uint8 images``."""
    totals = np.zeros(3, np.float64)  # sum psnr, sum ssim, count
    stats = None
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc="reconstruction", unit="batch")
    for batch in batches:
        valid = np.asarray(batch["valid"], bool)
        b = len(valid)
        prompts = [_text(c) for c in batch["caption"]] if use_captions else [""] * b
        recon = np.asarray(reconstruct_fn(np.asarray(batch["vit_pixels"]), prompts,
                                          np.maximum(np.asarray(batch["example_index"]), 0)))
        target = np.asarray(batch["target"])
        if valid.any():
            totals += [psnr(recon[valid], target[valid]).sum(), ssim(recon[valid], target[valid]).sum(),
                       valid.sum()]
        if feature_fn is not None:
            real_f, fake_f = np.asarray(feature_fn(target)), np.asarray(feature_fn(recon))
            if stats is None:
                stats = (FeatureStats(real_f.shape[-1]), FeatureStats(real_f.shape[-1]))
            stats[0].add(real_f[valid])
            stats[1].add(fake_f[valid])
    totals = all_reduce_sum(totals)
    n = int(totals[2])
    result: dict[str, Any] = {"num_images": n, "psnr": totals[0] / max(n, 1), "ssim": totals[1] / max(n, 1)}
    if feature_fn is not None and stats is not None:
        dim = stats[0].sum.shape[0]
        real, fake = all_reduce_sum(stats[0].packed()), all_reduce_sum(stats[1].packed())
        if real[-1] < 2:  # a covariance needs two images
            result.update(fid=None, fid_note=f"not computed: FID needs at least 2 images, got {int(real[-1])}")
        else:
            result["fid"] = frechet_distance(*FeatureStats.mean_cov(real, dim), *FeatureStats.mean_cov(fake, dim))
    return result


def _text(value) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, np.bytes_)) else str(value)


def folder_source(directory: str) -> list[dict]:
    """Images of a directory (sorted, recursive) as eval elements {"image": bytes, "caption", "file_name"}; a
    sidecar ``<stem>.txt`` is the caption."""
    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    out = []
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            if name.lower().endswith(exts):
                path = os.path.join(root, name)
                stem = os.path.splitext(path)[0]
                caption = open(stem + ".txt").read().strip() if os.path.isfile(stem + ".txt") else ""
                with open(path, "rb") as fh:
                    out.append({"image": fh.read(), "caption": caption,
                                "file_name": os.path.relpath(path, directory)})
    if not out:
        raise ValueError(f"no images in {directory}")
    return out


def make_preprocess(vision_size: Sequence[int], image_size: Sequence[int]):
    """Element -> {"vit_pixels", "target", "caption"}: the centred crop of each view's aspect ratio, bicubic."""

    def preprocess(element, rng):
        del rng
        image = np.asarray(decode_image(element["image"], name=element_name(element)), np.uint8)[None]
        return {"vit_pixels": fit_images(image, tuple(vision_size))[0],
                "target": fit_images(image, tuple(image_size))[0],
                "caption": _text(element.get("caption", ""))}
    return preprocess

