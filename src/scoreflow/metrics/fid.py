"""Fréchet Inception Distance: streaming feature statistics, the float64 distance, cached reference stats.

FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^{1/2}  (Heusel et al. 2017, Eq. 6; Dowson & Landau 1982).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

Images = Tensor | Iterable[Tensor | tuple | list]


class FeatureExtractor(Protocol):
    """uint8 images ``[N, C, H, W]`` -> features ``[N, D]``; ``identity`` names the network and its weights."""

    identity: str

    def __call__(self, images: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian fit of ``n`` feature vectors: ``mu [D]``, ``sigma [D, D]`` (float64), and who extracted them."""

    mu: Tensor
    sigma: Tensor
    n: int
    extractor: str

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically (rename at the end), so concurrent writers never leave half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f,
                mu=self.mu.cpu().numpy(),
                sigma=self.sigma.cpu().numpy(),
                n=np.int64(self.n),
                extractor=self.extractor,
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path, allow_pickle=False) as z:
            return cls(torch.from_numpy(z["mu"]), torch.from_numpy(z["sigma"]), int(z["n"]), str(z["extractor"]))


def to_uint8(x: Tensor, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Float images in ``[low, high]`` -> uint8 ``round(255 (x - low) / (high - low))``, clipped.

    Rounding inverts the training scaling k/255 exactly; SP/SF truncate (``astype(uint8)``), half a level lower.
    """
    return ((x.float() - low) * (255.0 / (high - low))).round().clamp(0, 255).to(torch.uint8)


def _batches(images: Images, batch_size: int) -> Iterator[Tensor]:
    """Regroup a tensor ``[N, C, H, W]`` or an iterable of images ``[C, H, W]`` / batches ``[B, C, H, W]``
    (or ``(x, label)`` tuples, as a DataLoader yields) into batches of ``batch_size`` (the last may be short)."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
        return
    buf: list[Tensor] = []
    count = 0
    for item in images:
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = x.unsqueeze(0) if x.ndim == 3 else x
        buf.append(x)
        count += x.shape[0]
        if count >= batch_size:
            joined, full = torch.cat(buf), count // batch_size * batch_size
            yield from joined[:full].split(batch_size)
            buf, count = [joined[full:]], count - full
    if count:
        yield torch.cat(buf)


def _device_of(extractor: FeatureExtractor) -> torch.device:
    params = getattr(extractor, "parameters", None)
    p = next(iter(params()), None) if callable(params) else None
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _moments(images: Images, extractor: FeatureExtractor, batch_size: int) -> tuple[Tensor, Tensor, int]:
    device = _device_of(extractor)
    shift = s1 = s2 = None
    n = 0
    for batch in _batches(images, batch_size):
        f = extractor(batch.to(device)).to(torch.float64)  # accumulated where the features are
        if shift is None:
            shift = f.mean(0)
            s1 = torch.zeros_like(shift)
            s2 = f.new_zeros(f.shape[1], f.shape[1])
        f = f - shift
        s1 += f.sum(0)
        s2 += f.T @ f
        n += f.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {n}")
    m = s1 / n
    sigma = (s2 - n * torch.outer(m, m)) / (n - 1)
    return (shift + m).cpu(), ((sigma + sigma.T) / 2).cpu(), n


def compute_stats(images: Images, extractor: FeatureExtractor, batch_size: int = 50) -> tuple[Tensor, Tensor]:
    """Stream ``images`` through ``extractor``: returns ``mu [D]`` and the unbiased ``sigma [D, D]``, float64.

    Moments are accumulated in float64 about the first batch's mean (shifted data), which keeps
    ``Σ (x - k)(x - k)^T - n (μ - k)(μ - k)^T`` free of cancellation without holding all features.
    """
    mu, sigma, _ = _moments(images, extractor, batch_size)
    return mu, sigma


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); ``mu [D]``, ``sigma [D, D]``, in float64.

    With Σ1 = V Λ Vᵀ and W = V Λ^{1/2}: tr (Σ1 Σ2)^{1/2} = tr (Wᵀ Σ2 W)^{1/2}, the trace root of a symmetric PSD
    matrix, so two ``eigh`` calls are stable even for the singular covariances of fewer than D samples, where
    ``sqrtm(Σ1 Σ2)`` of the non-symmetric product can go complex (pytorch-fid then adds ε·I). Eigenvalues of Σ1
    below its numerical-rank tolerance are dropped, which also shrinks W to D x rank.
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(a, dtype=torch.float64).cpu() for a in (mu1, mu2, sigma1, sigma2))
    evals, vecs = torch.linalg.eigh((sigma1 + sigma1.T) / 2)
    keep = evals > evals.max().clamp_min(0) * evals.numel() * torch.finfo(torch.float64).eps
    w = vecs[:, keep] * evals[keep].sqrt()
    m = w.T @ sigma2 @ w
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return float(d2)


@functools.lru_cache(maxsize=1)
def default_extractor() -> FeatureExtractor:
    """The Inception network from the first weights source found offline (see ``resolve_inception_weights``)."""
    from scoreflow.metrics.inception import InceptionFeatures

    return InceptionFeatures()


def fid_from_samples(
    samples: Images,
    ref_stats: FeatureStats | tuple[Tensor, Tensor],
    extractor: FeatureExtractor | None = None,
    batch_size: int = 50,
) -> float:
    """FID of uint8 ``samples [N, C, H, W]`` (or batches of them) against reference statistics."""
    extractor = default_extractor() if extractor is None else extractor
    if isinstance(ref_stats, FeatureStats):
        if ref_stats.extractor != extractor.identity:
            raise ValueError(f"reference stats come from {ref_stats.extractor!r}, samples from {extractor.identity!r}")
        ref = (ref_stats.mu, ref_stats.sigma)
    else:
        ref = ref_stats
    mu, sigma = compute_stats(samples, extractor, batch_size)
    return frechet_distance(mu, sigma, *ref)


def ref_stats_path(cache_dir: str | os.PathLike, dataset: str, split: str) -> Path:
    """Where the reference statistics of ``dataset``'s ``split`` live, e.g. ``<cache>/fid_cifar10_train.npz``."""
    return Path(cache_dir) / f"fid_{dataset}_{split}.npz"


def load_or_compute_ref_stats(
    cache_path: str | os.PathLike,
    images_fn: Callable[[], Images],
    extractor: FeatureExtractor | None = None,
    batch_size: int = 50,
    num_images: int | None = None,
) -> FeatureStats:
    """Reference statistics from ``cache_path`` if it was built by the same extractor (and, with ``num_images``,
    from that many images), else computed from ``images_fn()`` (called only on a miss; uint8 images) and written
    there."""
    extractor = default_extractor() if extractor is None else extractor
    path = Path(cache_path)
    if path.is_file():
        stats = FeatureStats.load(path)
        if stats.extractor == extractor.identity and (num_images is None or stats.n == num_images):
            return stats
        why = (f"was built by {stats.extractor!r}, not {extractor.identity!r}" if stats.extractor != extractor.identity
               else f"holds the statistics of {stats.n} images, not {num_images}")
        warnings.warn(f"{path} {why}; recomputing", stacklevel=2)
    mu, sigma, n = _moments(images_fn(), extractor, batch_size)
    stats = FeatureStats(mu, sigma, n, extractor.identity)
    stats.save(path)
    return stats
