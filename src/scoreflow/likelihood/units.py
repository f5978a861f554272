"""Nats per example -> bits per dimension, at the reporting edge only (SPEC §4.2; STYLE habit 6).

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

import torch
from torch import Tensor


def bpd_offset(num_levels: int | None = 256, scale: float = 2.0) -> float:
    """Bits per dim added to ``NLL_y / (D ln 2)``: ``log2(K) - log2(scale)``; 0 for continuous data."""
    if num_levels is None:
        return 0.0
    if num_levels < 1 or scale <= 0:
        raise ValueError(f"need num_levels >= 1 and scale > 0, got num_levels={num_levels}, scale={scale}")
    return math.log2(num_levels) - math.log2(scale)


def nats_per_dim(nll_nats: Tensor | float, dim: int) -> Tensor | float:
    """``NLL / D`` in nats per dimension."""
    return nll_nats / dim


def nats_to_bpd(
    nll_nats: Tensor | float, dim: int, *, num_levels: int | None = 256, scale: float = 2.0
) -> Tensor | float:
    """Bits per dimension of data with ``num_levels`` levels scaled by ``scale`` before the model.

    Args:
        nll_nats: ``-log p_y(y)`` in nats per example (any shape; applied elementwise).
        dim: data dimensions ``D`` per example.
        num_levels: ``K`` quantization levels of the original data; ``None`` for continuous data, which
            gives plain ``NLL / (D ln 2)`` in the model's space with no offset (``scale`` is then unused).
        scale: the ``a`` of ``y = a x + b`` that took the dequantized ``x in [0, 1]`` to the model's space.
    """
    return nll_nats / (dim * math.log(2)) + bpd_offset(num_levels, scale)


def bpd_to_nats(bpd: Tensor | float, dim: int, *, num_levels: int | None = 256, scale: float = 2.0) -> Tensor | float:
    """Inverse of :func:`nats_to_bpd`."""
    return (bpd - bpd_offset(num_levels, scale)) * dim * math.log(2)


def mean_and_se(values: Tensor | Sequence[float]) -> tuple[float, float]:
    """Mean and standard error ``std / sqrt(n)`` (unbiased std) of per-example values; ``se = nan`` if ``n < 2``."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = v.numel()
    if n == 0:
        raise ValueError("mean_and_se needs at least one value")
    se = float(v.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se
