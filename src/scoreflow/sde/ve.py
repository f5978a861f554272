"""Variance-exploding SDE (Song et al. 2021, Eq. 9): the continuous SMLD / NCSN."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scoreflow.sde.base import SDE


class VESDE(SDE):
    """``dx = sqrt(d sigma(t)^2 / dt) dw`` with ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

    As in the reference code, the kernel std is ``sigma(t)`` itself (not ``sqrt(sigma(t)^2 - sigma_min^2)``)
    and the prior is ``N(0, sigma_max^2 I)``. ``g^2 / sigma^2 = 2 log(sigma_max / sigma_min)`` is constant,
    so importance sampling of time is uniform sampling here and the likelihood weighting equals the
    original one up to that constant.
    """

    default_eps = 1e-5
    default_sample_eps = 1e-5
    ode_grid_rho = 1.0  # the ODE is not stiff near eps: g^2 / sigma^2 is constant

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def drift_coef(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return (math.log(self.sigma_min) + t * self._log_ratio).exp()

    def g2(self, t: Tensor) -> Tensor:
        return self.sigma(t) ** 2 * (2 * self._log_ratio)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def is_antiderivative(self, t: Tensor) -> Tensor:
        return 2 * self._log_ratio * t

    def is_antiderivative_inv(self, v: Tensor) -> Tensor:
        return v / (2 * self._log_ratio)

    def discretize(self, x: Tensor, t: Tensor, dt: float | Tensor) -> tuple[Tensor, Tensor]:
        # SMLD discretization (Song et al. 2021, App. E): G_i^2 = sigma(t + dt)^2 - sigma(t)^2
        dt = torch.as_tensor(dt, dtype=t.dtype, device=t.device)
        G2 = self.sigma(t + dt) ** 2 - self.sigma(t) ** 2
        return torch.zeros_like(x), G2.clamp_min(0).sqrt()
