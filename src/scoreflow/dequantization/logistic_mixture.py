"""Elementwise logistic-mixture CDF coupling transform (Ho et al. 2019, Flow++, Sec. 3.1).

For one scalar ``x`` with mixture parameters ``(π, μ, s)`` over ``M`` components and an affine ``(a, b)``:

    y = σ^{-1}(F(x)) · exp(a) + b,      F(x) = Σ_m π_m σ((x − μ_m) / s_m).

``logit ∘ F`` maps ℝ onto ℝ monotonically, so the transform is a bijection of ℝ. Everything is computed
in log space (``logsigmoid``/``logsumexp``), so neither ``F ≈ 0`` nor ``F ≈ 1`` loses precision, and the
inverse is found by bisection inside an exact bracket, followed by one Newton step that both polishes the
root and gives the implicit-function gradient with respect to the mixture parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Flow++ clamps log s_m from below (a step-like component has no usable inverse). We also clamp from above: far
# in the tails a conditioner sees huge inputs, and exp(log s_m) must not overflow into inf/nan in log_prob_u.
LOG_SCALE_RANGE = (-7.0, 7.0)


@dataclass
class MixLogisticParams:
    """Per-element transform parameters; ``a``/``b`` have the data's shape ``S``, the rest ``[*S, M]``."""

    log_pi: Tensor
    means: Tensor
    log_scales: Tensor
    a: Tensor
    b: Tensor

    @classmethod
    def from_raw(cls, raw: Tensor) -> MixLogisticParams:
        """Split a network output ``[*S, 2 + 3M]`` into parameters; ``a = tanh(·)`` bounds the affine log-scale."""
        log_pi, means, log_scales = raw[..., 2:].chunk(3, dim=-1)
        return cls(
            log_pi=F.log_softmax(log_pi, dim=-1),
            means=means,
            log_scales=log_scales.clamp(*LOG_SCALE_RANGE),
            a=torch.tanh(raw[..., 0]),
            b=raw[..., 1],
        )


def logit_mixture_cdf(x: Tensor, p: MixLogisticParams) -> tuple[Tensor, Tensor]:
    """``h = logit(F(x))`` and ``log dh/dx`` elementwise, both shaped like ``x``."""
    z = (x.unsqueeze(-1) - p.means) * torch.exp(-p.log_scales)
    log_cdf_m, log_sf_m = F.logsigmoid(z), F.logsigmoid(-z)
    log_F = torch.logsumexp(p.log_pi + log_cdf_m, dim=-1)
    log_1mF = torch.logsumexp(p.log_pi + log_sf_m, dim=-1)  # 1 − F = Σ π σ(−z): no cancellation
    log_pdf = torch.logsumexp(p.log_pi + log_cdf_m + log_sf_m - p.log_scales, dim=-1)
    # d logit(F)/dx = f / (F (1 − F))
    return log_F - log_1mF, log_pdf - log_F - log_1mF


def inverse_logit_mixture_cdf(h: Tensor, p: MixLogisticParams, iters: int = 40) -> Tensor:
    """Solve ``logit(F(x)) = h`` for ``x``, differentiably in ``h`` and the parameters.

    Bracket: component ``m`` has logit ``h`` at ``μ_m + s_m h``, so ``F(x) ≤ σ(h)`` for ``x`` below every such
    point and ``F(x) ≥ σ(h)`` above every one; the root lies between their min and max.
    """
    with torch.no_grad():
        knots = p.means + torch.exp(p.log_scales) * h.unsqueeze(-1)
        lo, hi = knots.amin(dim=-1), knots.amax(dim=-1)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            below = logit_mixture_cdf(mid, p)[0] < h
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        x0 = 0.5 * (lo + hi)
    # One Newton step x0 − (G(x0) − h)/G'(x0): value ≈ x0, gradients are those of the implicit function.
    g, log_dg = logit_mixture_cdf(x0, p)
    return x0 - (g - h) * torch.exp(-log_dg.detach())


def mixture_coupling_forward(x: Tensor, p: MixLogisticParams) -> tuple[Tensor, Tensor]:
    """``y = logit(F(x)) · e^a + b`` and the elementwise ``log dy/dx`` (Flow++ Eq. 6)."""
    h, log_dh = logit_mixture_cdf(x, p)
    return h * torch.exp(p.a) + p.b, log_dh + p.a


def mixture_coupling_inverse(y: Tensor, p: MixLogisticParams, iters: int = 40) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`mixture_coupling_forward`: ``x`` and the elementwise ``log dx/dy``."""
    x = inverse_logit_mixture_cdf((y - p.b) * torch.exp(-p.a), p, iters)
    return x, -(logit_mixture_cdf(x, p)[1] + p.a)
