"""Dequantization: integer levels ``k`` -> continuous ``x = (k + u) / K`` in ``(0, 1)`` with ``log q(u|k)``."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


class Dequantizer(nn.Module, ABC):
    """Base class. ``forward(k, num_levels)`` returns ``(x, log_q)``.

    ``x = (k + u) / K`` has the shape of ``k`` and lies in ``(0, 1)``; ``log_q`` is ``log q(u | k)`` in
    nats per example, shape ``[B]``. The discrete NLL bound is then
    ``-log P(k) <= E_u[-log p_x(x) + log q(u|k)] + D log K`` (Ho et al. 2019; Song et al. 2021b, Eq. 13).
    """

    @abstractmethod
    def sample_u(self, k: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``u ~ q(u | k)`` in ``(0, 1)`` and return ``(u, log q(u|k))``."""

    def forward(
        self, k: Tensor, num_levels: int, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        u, log_q = self.sample_u(k, generator=generator)
        return (k.to(u.dtype) + u) / num_levels, log_q


def to_model_space(
    k: Tensor,
    dequantizer: Dequantizer | None,
    num_levels: int | None,
    scale: float,
    shift: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Integer levels ``k`` -> ``(y, log_q)``: ``y = scale * (k + u) / K + shift`` with ``u ~ q(u|k)``.

    Continuous data (``dequantizer=None``) are only scaled, with ``log_q = 0``. ``log_q`` is ``log q(u|k)``
    per example (0 for uniform noise), the term that turns ``-log p(y)`` into a bound on ``-log P(k)``.
    """
    if dequantizer is None:
        return scale * k.float() + shift, torch.zeros(k.shape[0], device=k.device)
    x, log_q = dequantizer(k, num_levels, generator=generator)
    return scale * x + shift, log_q
