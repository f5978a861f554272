"""The SDE abstraction shared by VP, subVP and VE (Song et al. 2021, Sec. 3.4).

Every SDE here has a linear drift ``f(x, t) = a(t) x`` and a scalar diffusion ``g(t)``, so the
perturbation kernel is Gaussian, ``p_0t(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)``. Subclasses give the
scalar coefficients (functions of ``t`` of shape ``[B]``); everything at the level of data tensors
``x`` of shape ``[B, ...]`` (toy ``[B, D]`` or images ``[B, C, H, W]``) is derived here once.

Importance sampling of time (Song et al. 2021b, Sec. 5.1) needs an antiderivative of
``g(t)^2 / sigma_t^2`` and its inverse; each subclass provides both in closed form.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from scoreflow.utils import append_dims, flat_dim


class SDE(ABC):
    """A forward diffusion ``dx = a(t) x dt + g(t) dw`` on ``[0, T]``.

    Attributes:
        T: end time (1 for all SDEs here).
        N: default number of discretization steps for samplers.
        default_eps: smallest time for training and likelihood (docs/reference.md §1).
        default_sample_eps: time where samplers stop before the final denoising step.
        ode_grid_rho: exponent of the fixed time grid of ODE solves, evenly spaced in ``t^(1/rho)``: 3 where the
            probability-flow ODE is stiff near ``eps`` (its Jacobian grows like ``1/t``: VP, subVP), 1 where it
            is not (VE: ``g^2 / sigma^2`` is constant).
    """

    T: float = 1.0
    N: int = 1000
    default_eps: float = 1e-5
    default_sample_eps: float = 1e-3
    ode_grid_rho: float = 3.0

    # ----------------------------------------------------------------- scalar coefficients, t: [B]
    @abstractmethod
    def drift_coef(self, t: Tensor) -> Tensor:
        """``a(t)`` with ``f(x, t) = a(t) x``. Shape ``[B]``."""

    @abstractmethod
    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion coefficient ``g(t)^2``. Shape ``[B]``."""

    @abstractmethod
    def log_alpha(self, t: Tensor) -> Tensor:
        """Log mean coefficient ``log alpha_t`` of the perturbation kernel. Shape ``[B]``."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Standard deviation ``sigma_t`` of the perturbation kernel, accurate at ``t = 1e-5``."""

    @property
    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior ``pi = N(0, prior_std^2 I)``."""

    @abstractmethod
    def is_antiderivative(self, t: Tensor) -> Tensor:
        """An antiderivative ``F(t)`` of ``g(t)^2 / sigma_t^2`` (float64 recommended)."""

    @abstractmethod
    def is_antiderivative_inv(self, v: Tensor) -> Tensor:
        """Inverse of :meth:`is_antiderivative`: the ``t`` with ``F(t) = v``."""

    # ----------------------------------------------------------------- derived scalars
    def diffusion(self, t: Tensor) -> Tensor:
        """``g(t)``. Shape ``[B]``."""
        return self.g2(t).sqrt()

    def alpha(self, t: Tensor) -> Tensor:
        return self.log_alpha(t).exp()

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)``, each ``[B]``."""
        return self.alpha(t), self.sigma(t)

    def is_ratio(self, t: Tensor) -> Tensor:
        """``g(t)^2 / sigma_t^2``: the likelihood weight in the eps-form, and the IS density up to Z."""
        return self.g2(t) / self.sigma(t) ** 2

    def is_normalizer(self, eps: float, T: float | None = None) -> float:
        """``Z = int_eps^T g^2 / sigma^2 dt`` (Song et al. 2021b, Sec. 5.1; ~23.864 for VP at eps=1e-5)."""
        T = self.T if T is None else T
        ts = torch.tensor([eps, T], dtype=torch.float64)
        F = self.is_antiderivative(ts)
        return float(F[1] - F[0])

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Kernel of ``x_t | x_s`` for ``s < t``: ``(alpha_{t|s}, sigma_{t|s})``, each ``[B]``.

        For a linear SDE started at a point, ``sigma_t^2 = alpha_{t|s}^2 sigma_s^2 + sigma_{t|s}^2``.
        """
        a_ts = (self.log_alpha(t) - self.log_alpha(s)).exp()
        var = self.sigma(t) ** 2 - a_ts**2 * self.sigma(s) ** 2
        return a_ts, var.clamp_min(0).sqrt()

    # ----------------------------------------------------------------- data-level operations, x: [B, ...]
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """``f(x, t)``, shaped like ``x``."""
        return append_dims(self.drift_coef(t), x.ndim) * x

    def div_drift(self, t: Tensor, dim: int) -> Tensor:
        """``div_x f(x, t) = a(t) D``. Shape ``[B]``."""
        return self.drift_coef(t) * dim

    def perturb(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """A sample of ``p_0t(. | x0)``: ``alpha_t x0 + sigma_t noise``."""
        alpha, sigma = self.marginal(t)
        return append_dims(alpha, x0.ndim) * x0 + append_dims(sigma, x0.ndim) * noise

    def kernel_score(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """``grad log p_0t(x_t | x0) = -(x_t - alpha_t x0) / sigma_t^2``."""
        alpha, sigma = self.marginal(t)
        return -(x_t - append_dims(alpha, x0.ndim) * x0) / append_dims(sigma**2, x0.ndim)

    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        return self.prior_std * torch.randn(shape, generator=generator, dtype=dtype, device=device)

    def prior_logp(self, z: Tensor) -> Tensor:
        """``log pi(z)`` in nats, ``[B]``."""
        D = flat_dim(z)
        s2 = self.prior_std**2
        sq = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * D * math.log(2 * math.pi * s2) - 0.5 * sq / s2

    def prior_cross_entropy(self, x0: Tensor, T: float | None = None) -> Tensor:
        """Closed form ``E_{x_T ~ p_0T(.|x0)}[-log pi(x_T)]`` in nats, ``[B]`` (Theorem 3's first term)."""
        T = self.T if T is None else T
        t = torch.full((x0.shape[0],), T, dtype=x0.dtype, device=x0.device)
        alpha, sigma = self.marginal(t)
        D = flat_dim(x0)
        s2 = self.prior_std**2
        sq = x0.reshape(x0.shape[0], -1).pow(2).sum(dim=1)
        return 0.5 * D * math.log(2 * math.pi * s2) + (alpha**2 * sq + D * sigma**2) / (2 * s2)

    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor, *, probability_flow: bool = False) -> Tensor:
        """Drift of the reverse SDE ``f - g^2 s`` or of the probability-flow ODE ``f - g^2 s / 2``."""
        c = 0.5 if probability_flow else 1.0
        return self.drift(x, t) - c * append_dims(self.g2(t), x.ndim) * score

    def ode_drift(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        """Probability-flow ODE drift ``dx/dt = f - g^2 s / 2`` (Song et al. 2021, Eq. 13)."""
        return self.reverse_drift(x, t, score, probability_flow=True)

    def discretize(self, x: Tensor, t: Tensor, dt: float | Tensor) -> tuple[Tensor, Tensor]:
        """One step of the forward SDE from ``t`` to ``t + dt``: ``x + f_i + G_i z``.

        Returns ``(f_i, G_i)``, ``f_i`` shaped like ``x`` and ``G_i`` of shape ``[B]``. The default is
        Euler-Maruyama; VP and VE override it with the DDPM / SMLD discretizations (Song et al. 2021, App. E).
        """
        dt = torch.as_tensor(dt, dtype=x.dtype, device=x.device)
        f = self.drift(x, t) * (append_dims(dt, x.ndim) if dt.ndim else dt)
        return f, self.diffusion(t) * dt.sqrt()

    def langevin_alpha(self, t: Tensor, dt: float | Tensor) -> Tensor:
        """Step-size factor ``alpha_i`` of the Langevin corrector (Song et al. 2021, Alg. 4/5): 1 by default."""
        return torch.ones_like(t)

    def check_eps(self, eps: float) -> float:
        """Validate a smallest time ``eps`` and return it."""
        if not (0.0 < eps < self.T):
            raise ValueError(f"{type(self).__name__}: eps must satisfy 0 < eps < T={self.T}, got eps={eps}")
        return eps

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
