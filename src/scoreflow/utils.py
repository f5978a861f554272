"""Small tensor helpers shared by the whole library."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

# ``score_fn(x [B, ...], t [B]) -> [B, ...]``: the one signature of a score model throughout the library.
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-example ``[B]`` tensor broadcasts against ``[B, ...]``."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor to {ndim} dims")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def flat_dim(x: Tensor) -> int:
    """Number of data dimensions D of a batch ``[B, ...]``."""
    return x[0].numel()


def sum_except_batch(x: Tensor) -> Tensor:
    """``[B, ...] -> [B]``: sum over all but the first dim."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def mean_except_batch(x: Tensor) -> Tensor:
    """``[B, ...] -> [B]``: mean over all but the first dim."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def as_time(t: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """A scalar or ``[B]`` time as a ``[B]`` tensor with ``like``'s dtype and device."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(batch) if t.ndim == 0 else t


@contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 convolutions and matmuls in true IEEE fp32 inside the block (no TF32), restored afterwards.

    cuDNN convolutions default to TF32 on Ampere and later GPUs (10-bit mantissa): fine for training, but it
    moves a network's output by ~1e-3 relative, so likelihoods and Inception features are computed without it.
    A no-op on CPUs.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is None or not hasattr(matmul, "fp32_precision"):  # torch < 2.9: the legacy flags
        old = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = old
        return
    old = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = old
