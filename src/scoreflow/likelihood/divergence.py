"""Divergence of a vector field ``x -> F(x)`` per example: exact (autograd loop) or Hutchinson.

Both functions take the output ``out = F(x)`` already computed from ``x`` with ``requires_grad``; ``x`` is
``[B, ...]`` and ``out`` is shaped like ``x``. Examples must not interact inside ``F`` (no batch norm in
train mode), since the divergence of example ``b`` is read off gradients of batch sums.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from scoreflow.utils import sum_except_batch

Divergence = Literal["exact", "rademacher", "gaussian"]
DIVERGENCES: tuple[str, ...] = ("exact", "rademacher", "gaussian")


def exact_divergence(out: Tensor, x: Tensor, *, create_graph: bool = False) -> Tensor:
    """``tr(dF/dx)`` per example ``[B]`` by ``D`` backward passes (use only for small ``D``)."""
    B = x.shape[0]
    flat = out.reshape(B, -1)
    D = flat.shape[1]
    div = torch.zeros(B, dtype=out.dtype, device=out.device)
    for i in range(D):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True, create_graph=create_graph)
        div = div + g.reshape(B, -1)[:, i]
    return div


def divergence_hutchinson(fn_out: Tensor, x: Tensor, probe: Tensor, *, create_graph: bool) -> Tensor:
    """``probe^T (d fn / d x) probe`` per example ``[B]`` (Hutchinson); ``fn_out`` must be computed from ``x``."""
    (vjp,) = torch.autograd.grad((fn_out * probe).sum(), x, create_graph=create_graph)
    return sum_except_batch(vjp * probe)


def randn_like(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like ``like``, drawn on ``generator``'s device, then moved to ``like``'s."""
    device = like.device if generator is None else generator.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def draw_probe(kind: Divergence, like: Tensor, *, generator: torch.Generator | None = None) -> Tensor | None:
    """A Hutchinson probe shaped like ``like`` with ``E[v v^T] = I``: Rademacher ``+-1`` or standard normal.

    Returns ``None`` for ``kind="exact"``. Draw it once per ODE solve and keep it fixed: a probe
    resampled inside the ODE function makes the right-hand side random, and an adaptive solver then
    rejects step after step (docs/reference.md §4.1).
    """
    if kind == "exact":
        return None
    if kind == "rademacher":
        device = like.device if generator is None else generator.device
        bits = torch.randint(0, 2, like.shape, generator=generator, device=device)
        return (2 * bits - 1).to(like)
    if kind == "gaussian":
        return randn_like(like, generator)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")


def estimate_divergence(out: Tensor, x: Tensor, probe: Tensor | None, *, create_graph: bool = False) -> Tensor:
    """Exact divergence if ``probe`` is ``None``, else the Hutchinson estimate ``v^T (dF/dx) v``. ``[B]``."""
    if probe is None:
        return exact_divergence(out, x, create_graph=create_graph)
    return divergence_hutchinson(out, x, probe, create_graph=create_graph)
