"""Nats per example -> bits per dimension, at the reporting edge only (docs/reference.md §4.2).

Discrete data with ``K`` levels per dimension are dequantized to ``x = (k + u) / K`` in ``[0, 1]^D`` and then
mapped to the model's space by ``y = scale * x + shift`` (``scale = 2, shift = -1`` for data centred in
``[-1, 1]``). A model density ``p_y`` gives ``p_x(x) = p_y(y) scale^D`` and the dequantization bound
``-log2 P(k) <= E_u[-log2 p_x(x)] + D log2 K`` (Theis et al. 2016), hence

    bpd = NLL_y / (D ln 2) - log2(scale) + log2(K).

For 8-bit data centred in ``[-1, 1]`` the offset is ``-1 + 8 = +7`` (the reference's ``7 - inverse_scaler(-1)``
hack, valid there only); for 17-level digits it is ``log2(17) - 1``. The shift never matters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def bpd_offset(num_levels: int | None = 256, scale: float = 2.0) -> float:
    """Bits per dim added to ``NLL_y / (D ln 2)``: ``log2(K) - log2(scale)``; 0 for continuous data."""
    if num_levels is None:
        return 0.0
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2 (levels per dimension of the discrete data, or None for "
                         f"continuous data), got {num_levels}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (the a of y = a x + b), got {scale}")
    return math.log2(num_levels) - math.log2(scale)


def _check_dim(dim: int) -> None:
    if not dim >= 1:
        raise ValueError(f"dim must be >= 1 (data dimensions D per example), got {dim}")


def nats_per_dim(nll_nats: Tensor | float, dim: int) -> Tensor | float:
    """``NLL / D`` in nats per dimension."""
    _check_dim(dim)
    return nll_nats / dim


def nats_to_bpd(
    nll_nats: Tensor | float, dim: int, *, num_levels: int | None = 256, scale: float = 2.0
) -> Tensor | float:
    """Bits per dimension of data with ``num_levels`` levels scaled by ``scale`` before the model.

    Args:
        nll_nats: ``-log p_y(y)`` in nats per example (any shape; applied elementwise).
        dim: data dimensions ``D >= 1`` per example.
        num_levels: ``K >= 2`` quantization levels of the original data; ``None`` for continuous data, which
            gives plain ``NLL / (D ln 2)`` in the model's space with no offset (``scale`` is then unused).
        scale: the ``a > 0`` of ``y = a x + b`` that took the dequantized ``x in [0, 1]`` to the model's space.
    """
    _check_dim(dim)
    return nll_nats / (dim * math.log(2)) + bpd_offset(num_levels, scale)


def bpd_to_nats(bpd: Tensor | float, dim: int, *, num_levels: int | None = 256, scale: float = 2.0) -> Tensor | float:
    """Inverse of :func:`nats_to_bpd`."""
    _check_dim(dim)
    return (bpd - bpd_offset(num_levels, scale)) * dim * math.log(2)


def mean_and_se(values: Tensor | np.ndarray | Sequence[float]) -> tuple[float, float]:
    """Mean and standard error ``std / sqrt(n)`` (std with Bessel's correction) of ``n`` per-example values.

    The one standard-error function of scoreflow (validation, test phase, ``evaluate.py``, benches). Its
    convention: one value has no spread to estimate, so its standard error is NaN (never 0, which would claim
    an exact result); no values give ``(nan, nan)``.
    """
    v = torch.as_tensor(np.asarray(values, dtype=np.float64) if not isinstance(values, Tensor) else values)
    v = v.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    n = v.numel()
    if n == 0:
        return math.nan, math.nan
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return float(v.mean()), se


@dataclass(frozen=True)
class StandardErrorSplit:
    """The standard error over images of a Monte-Carlo estimate (e.g. the bound), split into its two sources.

    Each image's value is ``L_i + e_i`` with Monte-Carlo noise ``e_i`` of variance ``m_i``, so the variance over
    images of the values estimates ``Var(L) + mean(m)`` and ``se^2 = se_between^2 + se_mc^2``:
    ``se_between = sqrt((var - mean(m)) / n)`` is what a noise-free estimator would report, ``se_mc =
    sqrt(mean(m) / n)`` what the Monte-Carlo noise adds, and ``mc_excess = se / se_between - 1``.
    """

    mean: float
    se: float
    se_between: float
    se_mc: float
    mc_excess: float
    num_images: int
    var_between: float  # per image, Var(L) over images
    mc_var: float  # per image, mean Monte-Carlo variance of one value


def split_standard_error(values, mc_var=None) -> StandardErrorSplit:
    """Split the standard error over images into its between-image and Monte-Carlo parts.

    Args:
        values: ``[n]`` per-image estimates (then ``mc_var`` is needed) or ``[n, R]`` independent repeats per image
            (the per-image value is their mean; its Monte-Carlo variance, ``var over repeats / R``, is used
            unless ``mc_var`` is given).
        mc_var: ``[n]`` (or a scalar) Monte-Carlo variance of each per-image value, e.g. ``BoundResult.nll_se**2``
            converted to the same units.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 2:
        if mc_var is None:
            if v.shape[1] < 2:
                raise ValueError("need mc_var or at least 2 repeats per image")
            mc_var = v.var(axis=1, ddof=1) / v.shape[1]
        v = v.mean(axis=1)
    elif mc_var is None:
        raise ValueError("need mc_var with one value per image")
    n = v.size
    if n < 2:
        raise ValueError("need at least 2 images")
    m = float(np.mean(np.broadcast_to(np.asarray(mc_var, dtype=np.float64), (n,))))
    var = float(v.var(ddof=1))
    between = max(var - m, 0.0)
    se, se_between = math.sqrt(var / n), math.sqrt(between / n)
    excess = se / se_between - 1 if se_between > 0 else float("inf")
    return StandardErrorSplit(float(v.mean()), se, se_between, math.sqrt(m / n), excess, n, between, m)


def num_samples_for_mc_excess(
    var_per_sample: float, var_between: float, max_excess: float = 0.1, repeats: int = 1
) -> int:
    """Smallest number of samples (calls) per image and repeat so that Monte-Carlo noise adds less than
    ``max_excess`` to the standard error over images: ``var_per_sample / (N R) < ((1 + max_excess)^2 - 1) Var(L)``.

    ``var_per_sample`` is the per-image Monte-Carlo variance per sample (``BoundResult.sample_var``, per network
    call) and ``var_between`` the variance of the true per-image values (``StandardErrorSplit.var_between``),
    in the same units.
    """
    if var_between <= 0:
        raise ValueError(f"need var_between > 0, got {var_between}")
    return math.ceil(var_per_sample / (((1 + max_excess) ** 2 - 1) * var_between * repeats))
