"""Uniform dequantization: ``u ~ U(0, 1)^D``, ``log q = 0`` (Theis et al. 2016)."""

from __future__ import annotations

import torch
from torch import Tensor

from scoreflow.dequantization.base import Dequantizer


class UniformDequantizer(Dequantizer):
    """``u ~ U(0, 1)`` in ``k``'s dtype for floating levels, else in ``dtype`` (default: torch's default dtype)."""

    def __init__(self, dtype: torch.dtype | None = None):
        super().__init__()
        self.dtype = torch.get_default_dtype() if dtype is None else dtype

    def sample_u(self, k: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        dtype = k.dtype if k.is_floating_point() else self.dtype
        u = torch.rand(k.shape, generator=generator, dtype=dtype, device=k.device)
        return u, torch.zeros(k.shape[0], dtype=dtype, device=k.device)
