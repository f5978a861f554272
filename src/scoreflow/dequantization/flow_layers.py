"""Invertible layers of the dequantization flow: splits, ActNorm, 1x1 convolution, logistic-mixture coupling.

Every layer maps ``h -> (h', log|det ∂h'/∂h|)`` with the log-det per example ``[B]`` and has an exact
``inverse`` returning ``(h, log|det ∂h/∂h'|)`` (Dinh et al. 2017; Kingma & Dhariwal 2018; Ho et al. 2019).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scoreflow.dequantization.flow_nets import CouplingNet
from scoreflow.dequantization.logistic_mixture import (
    MixLogisticParams,
    mixture_coupling_forward,
    mixture_coupling_inverse,
)
from scoreflow.utils import sum_except_batch


class CheckerboardSplit(nn.Module):
    """``[B, C, H, W] -> two [B, C, H, W/2]`` halves by pixel parity ``(i + j) mod 2``.

    Pairs of columns are packed side by side (as in Flow++'s split), and odd rows swap the pair first, so
    each half is a true checkerboard: every pixel of one half has its four neighbours in the other.
    ``parity`` picks which half conditions and which is transformed.
    """

    def __init__(self, shape: tuple[int, int, int]):
        super().__init__()
        C, H, W = shape
        if W % 2:
            raise ValueError(f"the checkerboard split needs an even width, got shape {shape}")
        self.half_shape = (C, H, W // 2)

    @staticmethod
    def _swap_odd_rows(p: Tensor) -> Tensor:
        """``[B, C, H, W/2, 2]``: swap each column pair on odd rows (an involution)."""
        swap = (torch.arange(p.shape[2], device=p.device) % 2 == 1).view(1, 1, -1, 1, 1)
        return torch.where(swap, p.flip(-1), p)

    def split(self, x: Tensor, parity: int) -> tuple[Tensor, Tensor]:
        """``(cond, trans)`` halves."""
        a, b = self._swap_odd_rows(x.unflatten(-1, (x.shape[-1] // 2, 2))).unbind(-1)
        return (a, b) if parity == 0 else (b, a)

    def merge(self, cond: Tensor, trans: Tensor, parity: int) -> Tensor:
        a, b = (cond, trans) if parity == 0 else (trans, cond)
        return self._swap_odd_rows(torch.stack([a, b], dim=-1)).flatten(-2)

    def shapes(self, parity: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.half_shape, self.half_shape


class AlternatingSplit(nn.Module):
    """``[B, D]`` -> even / odd coordinates (which one conditions depends on ``parity``).

    For ``D = 1`` the conditioning part is empty and every coupling transforms the one coordinate from the
    context alone.
    """

    def __init__(self, dim: int):
        super().__init__()
        idx = torch.arange(dim)
        self.parts = [(idx[:0], idx), (idx[:0], idx)] if dim == 1 else [(idx[0::2], idx[1::2]), (idx[1::2], idx[0::2])]
        self.inverse_perm = [torch.argsort(torch.cat(p)) for p in self.parts]

    def split(self, x: Tensor, parity: int) -> tuple[Tensor, Tensor]:
        c, t = self.parts[parity]
        return x[:, c.to(x.device)], x[:, t.to(x.device)]

    def merge(self, cond: Tensor, trans: Tensor, parity: int) -> Tensor:
        return torch.cat([cond, trans], dim=1)[:, self.inverse_perm[parity].to(cond.device)]

    def shapes(self, parity: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        c, t = self.parts[parity]
        return (len(c),), (len(t),)


class ActNorm(nn.Module):
    """Elementwise affine ``h e^{s} + b`` with one ``(s, b)`` per element of an example (Flow++'s ``Norm``)."""

    def __init__(self, shape: tuple[int, ...], init_scale: float = 1.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.full(shape, math.log(init_scale)))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, h: Tensor, ctx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return h * torch.exp(self.log_scale) + self.bias, self.log_scale.sum().expand(h.shape[0])

    def inverse(self, y: Tensor, ctx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (y - self.bias) * torch.exp(-self.log_scale), -self.log_scale.sum().expand(y.shape[0])


class InvConv1x1(nn.Module):
    """Invertible channel mixing ``h_c -> Σ_c' W_cc' h_c'`` at every pixel (Glow), init ``I + 0.001 N(0, 1)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels) + 1e-3 * torch.randn(channels, channels))

    def _log_det(self, h: Tensor) -> Tensor:
        return (h.shape[2] * h.shape[3] * torch.linalg.slogdet(self.weight)[1]).expand(h.shape[0])

    def forward(self, h: Tensor, ctx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.einsum("ij,bjhw->bihw", self.weight, h), self._log_det(h)

    def inverse(self, y: Tensor, ctx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(self.weight), y), -self._log_det(y)


class MixLogisticCoupling(nn.Module):
    """Transform one half by the logistic-mixture CDF coupling, parameters from the other half and the context."""

    def __init__(
        self, splitter: CheckerboardSplit | AlternatingSplit, parity: int, net: CouplingNet, bisection_iters: int = 40
    ):
        super().__init__()
        self.splitter, self.parity, self.net, self.iters = splitter, parity, net, bisection_iters

    def forward(self, h: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor]:
        cond, trans = self.splitter.split(h, self.parity)
        y, log_det = mixture_coupling_forward(trans, MixLogisticParams.from_raw(self.net(cond, ctx)))
        return self.splitter.merge(cond, y, self.parity), sum_except_batch(log_det)

    def inverse(self, y: Tensor, ctx: Tensor) -> tuple[Tensor, Tensor]:
        cond, trans = self.splitter.split(y, self.parity)
        x, log_det = mixture_coupling_inverse(trans, MixLogisticParams.from_raw(self.net(cond, ctx)), self.iters)
        return self.splitter.merge(cond, x, self.parity), sum_except_batch(log_det)
