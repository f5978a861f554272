"""Variance-preserving and sub-VP SDEs (Song et al. 2021, Eqs. 11 and 15)."""

from __future__ import annotations

import torch
from torch import Tensor

from scoreflow.sde.base import SDE
from scoreflow.utils import append_dims


class _BetaSchedule(SDE):
    """Linear ``beta(t) = beta_min + t (beta_max - beta_min)`` and ``B(t) = int_0^t beta``."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (0 < beta_min <= beta_max):
            raise ValueError(f"need 0 < beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def B(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def B_inv(self, B: Tensor) -> Tensor:
        """The ``t >= 0`` with ``B(t) = B``; the cancellation-free root of the quadratic."""
        d = self.beta_max - self.beta_min
        return 2 * B / (self.beta_min + (self.beta_min**2 + 2 * d * B).sqrt())

    def discrete_beta(self, t: Tensor, dt: float | Tensor) -> Tensor:
        """``beta_i = 1 - exp(-(B(t + dt) - B(t)))`` in ``[0, 1)``: the DDPM beta of a step of size ``dt``."""
        dt = torch.as_tensor(dt, dtype=t.dtype, device=t.device)
        return -torch.expm1(-(self.B(t + dt) - self.B(t)))

    def drift_coef(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def log_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * self.B(t)

    @property
    def prior_std(self) -> float:
        return 1.0


class VPSDE(_BetaSchedule):
    """VP SDE ``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw`` (the continuous DDPM).

    ``sigma_t = sqrt(1 - exp(-B(t)))`` computed with ``expm1`` (the float32 precision trap of docs/reference.md §1).
    """

    default_eps = 1e-5
    default_sample_eps = 1e-3

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def sigma(self, t: Tensor) -> Tensor:
        return (-torch.expm1(-self.B(t))).sqrt()

    # g^2/sigma^2 = beta / (1 - e^{-B}) = d/dt log(e^B - 1)
    def is_antiderivative(self, t: Tensor) -> Tensor:
        return torch.log(torch.expm1(self.B(t)))

    def is_antiderivative_inv(self, v: Tensor) -> Tensor:
        return self.B_inv(torch.logaddexp(v, torch.zeros_like(v)))  # B = log(1 + e^v)

    def discretize(self, x: Tensor, t: Tensor, dt: float | Tensor) -> tuple[Tensor, Tensor]:
        # DDPM discretization (Song et al. 2021, App. E): x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z with
        # the exact beta_i = 1 - exp(-(B(t+dt) - B(t))) < 1 (the first-order beta(t) dt exceeds 1 for few steps)
        beta_i = self.discrete_beta(t, dt)
        f = append_dims(torch.sqrt(1.0 - beta_i) - 1.0, x.ndim) * x
        return f, beta_i.sqrt()

    def langevin_alpha(self, t: Tensor, dt: float | Tensor) -> Tensor:
        # alpha_i = 1 - beta_i of the DDPM discretization (Song et al. 2021, Alg. 5)
        return 1.0 - self.discrete_beta(t, dt)


class SubVPSDE(_BetaSchedule):
    """sub-VP SDE ``dx = -beta x / 2 dt + sqrt(beta (1 - e^{-2B})) dw`` (Song et al. 2021, Eq. 15).

    Its kernel std is ``sigma_t = 1 - exp(-B(t))`` itself, with no square root (docs/reference.md §1). SF uses
    eps = 1e-2 for training, likelihood and sampling since ``sigma(1e-5) ~ 1e-6`` is too small.
    """

    default_eps = 1e-2
    default_sample_eps = 1e-2

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t) * (-torch.expm1(-2 * self.B(t)))

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.B(t))

    # g^2/sigma^2 = beta (1 + e^{-B}) / (1 - e^{-B}) = d/dt [2 log(e^B - 1) - B]
    def is_antiderivative(self, t: Tensor) -> Tensor:
        B = self.B(t)
        return 2 * torch.log(torch.expm1(B)) - B

    def is_antiderivative_inv(self, v: Tensor) -> Tensor:
        # (w - 1)^2 / w = e^v with w = e^B  =>  w - 1 = c/2 + sqrt(c + c^2/4), c = e^v
        c = v.exp()
        return self.B_inv(torch.log1p(0.5 * c + (c * (1 + 0.25 * c)).sqrt()))

    def langevin_alpha(self, t: Tensor, dt: float | Tensor) -> Tensor:
        # the reference has no discrete alphas for subVP and crashes (score_sde_pytorch issue #8);
        # use the same DDPM-style factor as VP.
        return 1.0 - self.discrete_beta(t, dt)
