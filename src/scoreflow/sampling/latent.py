"""Latent codes of the probability-flow ODE (Song et al. 2021, Sec. 4.3, App. D.4-D.5).

The ODE is a bijection between ``x(eps)`` and ``x(T)``, so data have a uniquely identifiable latent code:
:func:`encode` integrates forwards ``eps -> T`` and :func:`decode` backwards ``T -> eps``. Latents are
Gaussian under the prior, so they are interpolated on the sphere (:func:`interpolate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scoreflow.sampling.ode import solve_probability_flow
from scoreflow.sde import SDE
from scoreflow.utils import ScoreFn, append_dims


def _flow(
    score_fn: ScoreFn, sde: SDE, x: Tensor, eps: float | None, solver: dict, *, to_latent: bool
) -> tuple[Tensor, int]:
    """``(x_end, nfe)`` of the probability-flow ODE from ``eps`` to ``T`` (``to_latent``) or from ``T`` to ``eps``
    (``eps`` defaults to ``sde.default_sample_eps``); ``solver`` holds the ``method``/``rtol``/``atol``/``steps``
    keywords of :func:`solve_probability_flow`."""
    eps = sde.check_eps(sde.default_sample_eps if eps is None else eps)
    t0, t1 = (eps, sde.T) if to_latent else (sde.T, eps)
    return solve_probability_flow(score_fn, sde, x, t0, t1, **solver)


def encode(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    eps: float | None = None,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
) -> Tensor:
    """Latent ``z = x(T)`` of data ``x = x(eps)`` of shape ``[B, ...]`` (eps defaults to ``sde.default_sample_eps``)."""
    return _flow(score_fn, sde, x, eps, dict(method=method, rtol=rtol, atol=atol, steps=steps), to_latent=True)[0]


def decode(
    score_fn: ScoreFn,
    sde: SDE,
    z: Tensor,
    *,
    eps: float | None = None,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
) -> Tensor:
    """Data ``x(eps)`` of latents ``z = x(T)`` of shape ``[B, ...]``; no denoising (the exact inverse of encode)."""
    return _flow(score_fn, sde, z, eps, dict(method=method, rtol=rtol, atol=atol, steps=steps), to_latent=False)[0]


@dataclass
class RoundTrip:
    """``encode`` then ``decode``: the latents, the reconstruction, its errors and the NFE of each way."""

    z: Tensor  # [B, ...]
    x_rec: Tensor  # [B, ...]
    max_abs_error: Tensor  # [B]: max_i |x_rec - x|
    rel_error: Tensor  # [B]: ||x_rec - x|| / ||x||
    nfe_encode: int
    nfe_decode: int


def round_trip(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    eps: float | None = None,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
) -> RoundTrip:
    """Encode ``x [B, ...]``, decode the latents again and report the per-example reconstruction error."""
    solver = dict(method=method, rtol=rtol, atol=atol, steps=steps)
    z, nfe_e = _flow(score_fn, sde, x, eps, solver, to_latent=True)
    x_rec, nfe_d = _flow(score_fn, sde, z, eps, solver, to_latent=False)
    diff = (x_rec - x).reshape(x.shape[0], -1)
    rel = diff.norm(dim=1) / x.reshape(x.shape[0], -1).norm(dim=1).clamp_min(torch.finfo(x.dtype).tiny)
    return RoundTrip(z, x_rec, diff.abs().amax(dim=1), rel, nfe_e, nfe_d)


def interpolate(z0: Tensor, z1: Tensor, n: int) -> Tensor:
    """``n`` spherical interpolants from ``z0`` to ``z1`` (both of one shape ``S``), shape ``[n, *S]``.

    ``slerp(l) = sin((1 - l) theta) / sin(theta) z0 + sin(l theta) / sin(theta) z1`` with ``theta`` the angle
    between the flattened latents: Gaussian latents concentrate on a sphere, and a straight line between
    two of them would pass through atypically small norms (App. D.4, Fig. 6). Falls back to linear
    interpolation when the two directions (nearly) coincide.
    """
    if z0.shape != z1.shape:
        raise ValueError(f"z0 {tuple(z0.shape)} and z1 {tuple(z1.shape)} must have one shape")
    lam = torch.linspace(0, 1, n, dtype=z0.dtype, device=z0.device)
    a, b = z0.reshape(-1), z1.reshape(-1)
    cos = (a @ b / (a.norm() * b.norm())).clamp(-1, 1)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-6:
        w0, w1 = 1 - lam, lam
    else:
        w0, w1 = torch.sin((1 - lam) * theta) / torch.sin(theta), torch.sin(lam * theta) / torch.sin(theta)
    return append_dims(w0, z0.ndim + 1) * z0 + append_dims(w1, z0.ndim + 1) * z1
