"""Dequantization: integer levels ``k`` -> continuous ``x = (k + u) / K`` in ``(0, 1)`` with ``log q(u|k)``."""

from __future__ import annotations

import math
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
        """``(x = (k + u) / K, log q(u|k))`` for levels ``k`` in ``[0, K - 1]`` (checked: :func:`check_levels`)."""
        check_levels(k, num_levels)
        u, log_q = self.sample_u(k, generator=generator)
        return (k.to(u.dtype) + u) / num_levels, log_q


def check_levels(k: Tensor, num_levels: int) -> None:
    """Levels ``k`` must lie in ``[0, num_levels - 1]``, else ``x = (k + u) / K`` leaves ``(0, 1)``.

    On the CPU a ``ValueError`` names the smallest and largest level found (the in-range test itself reads nothing
    back into Python: the training step's host-read tests hold on the CPU too). On a GPU reading them back would stall
    the training step on a host-device sync, so the check is queued with ``torch._assert_async`` instead: no sync,
    and a bad batch stops the run with a device-side assertion at a later kernel launch (rerun on the CPU for the
    ``ValueError``). Other accelerators are not checked. ``uint8`` levels with ``K >= 256`` cannot be out of
    range and are not scanned at all.
    """
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    if k.dtype == torch.uint8 and num_levels >= 256:
        return
    if not (k.is_cuda or k.is_cpu) or k.numel() == 0:  # other accelerators: no asynchronous assertion to queue
        return
    inside = (k <= num_levels - 1).all() if k.dtype == torch.uint8 else ((k >= 0) & (k <= num_levels - 1)).all()
    message = f"dequantizer: levels k outside [0, num_levels - 1] = [0, {num_levels - 1}]"
    if k.is_cuda:  # 2-4 tiny kernels, queued: no host-device sync
        torch._assert_async(inside, message)
        return
    try:  # on the CPU the assertion is checked at once, in C++: no Python-level read of a tensor in the step
        torch._assert_async(inside, message)
        return
    except RuntimeError:
        pass  # out of range (NaN levels too): the ValueError below names what was found
    lo, hi = (float(v) for v in torch.aminmax(k))
    raise ValueError(f"levels k must lie in [0, num_levels - 1] = [0, {num_levels - 1}], got min {lo:g}, max {hi:g} "
                     f"(num_levels={num_levels})")


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


def importance_weighted_nll(nll: Tensor, log_q: Tensor) -> Tensor:
    """``−log (1/S Σ_s p(y_s) / q(u_s|k))`` per example from ``S`` draws ``u_s ~ q(·|k)``.

    Args:
        nll: ``−log p(y_s)`` (ODE NLL or any upper bound of it) in nats, ``[S, B]``.
        log_q: ``log q(u_s|k)`` in nats, ``[S, B]``.

    Returns ``[B]`` nats. With ``S = 1`` it is the usual ``−log p(y) + log q(u|k)``. With the exact ``−log p(y)``
    its expectation decreases monotonically in ``S`` towards ``−log P(k)`` and stays above it (Burda et al. 2016).
    With a Monte-Carlo estimate of it instead (the Theorem-3 bound's random times and noises, a Hutchinson ODE
    NLL) it is **not a bound**: the log-mean-exp over draws is pulled down by about half the estimate's variance
    and can fall below ``−log P(k)`` (a Gaussian oracle, ``tests/unit/test_importance_weighted_bias.py``: 50 bound
    times per draw, ``S = 32``, 1.35 nats below it). Use it with an exact or low-variance ``nll``.
    """
    if nll.shape != log_q.shape or nll.ndim != 2:
        raise ValueError(f"need matching [S, B] tensors, got {tuple(nll.shape)} and {tuple(log_q.shape)}")
    return -(torch.logsumexp(-(nll + log_q), dim=0) - math.log(nll.shape[0]))
