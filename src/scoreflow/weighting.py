"""Time samplers for the three weightings of Song et al. 2021b, Table 1.

Each sampler returns ``(t, weight)`` so that the training loss is always
``(weight * dsm_loss(..., form="eps")).mean()`` with the eps-form per-example term
``||sigma_t s_theta + z||^2`` (= ``sigma_t^2 * l(t)``):

============  ==========================  ==================  ====================
name          t distribution              weight              lambda(t)
============  ==========================  ==================  ====================
original      U[eps, T]                   1                   sigma_t^2
likelihood    U[eps, T]                   g^2 / sigma_t^2     g^2
lw_is         p(t) = g^2 / (sigma^2 Z)    1 (or Z/(T-eps))    g^2 (up to Z)
============  ==========================  ==================  ====================

``lw_is`` inverts the closed-form CDF of ``g^2/sigma^2`` (the reference uses 100 bisection steps).
For VE, ``g^2/sigma^2`` is constant, so ``lw_is`` *is* uniform sampling and ``likelihood`` equals
``original`` up to the constant ``2 log(sigma_max/sigma_min)``: it is supported, not an error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from scoreflow.sde import SDE


class TimeSampler(ABC):
    """Draws times in ``[eps, T]`` with per-example loss weights.

    Args:
        sde: the forward SDE.
        eps: smallest time; defaults to ``sde.default_eps``.
    """

    def __init__(self, sde: SDE, eps: float | None = None):
        self.sde = sde
        self.eps = sde.check_eps(sde.default_eps if eps is None else float(eps))
        self.T = sde.T

    def sample(
        self,
        batch: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(t, weight)``, both ``[batch]``."""
        u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
        t = self.icdf(u)
        return t.to(dtype), self.weight(t).to(dtype)

    @abstractmethod
    def icdf(self, u: Tensor) -> Tensor:
        """Quantile function of the time distribution, ``u in [0, 1]``."""

    @abstractmethod
    def density(self, t: Tensor) -> Tensor:
        """Density ``p(t)`` of the time distribution on ``[eps, T]``."""

    @abstractmethod
    def weight(self, t: Tensor) -> Tensor:
        """Per-example weight multiplying the eps-form DSM term."""

    @property
    def objective_scale(self) -> float:
        """The constant that puts ``weight * term`` on the scale of the objective this sampler estimates (1 but for
        an unnormalized importance sampler, whose dropped ``Z / (T - eps)`` it restores): per-example losses times
        it have the objective's mean, and their variances compare across samplers (Song et al. 2021b, Sec. 5.1)."""
        return 1.0


class UniformTime(TimeSampler):
    """``t ~ U[eps, T]``; base of ``original`` and ``likelihood``."""

    def icdf(self, u: Tensor) -> Tensor:
        return self.eps + u * (self.T - self.eps)

    def density(self, t: Tensor) -> Tensor:
        return torch.full_like(t, 1.0 / (self.T - self.eps))

    def weight(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class OriginalWeighting(UniformTime):
    """lambda(t) = sigma_t^2 (Song et al. 2021): uniform time, unit weight on the eps-form."""


class LikelihoodWeighting(UniformTime):
    """lambda(t) = g(t)^2 (Song et al. 2021b, Theorem 1): uniform time, weight ``g^2/sigma^2``."""

    def weight(self, t: Tensor) -> Tensor:
        return self.sde.is_ratio(t)


class ImportanceSampledLikelihood(TimeSampler):
    """lambda(t) = g^2 with ``t ~ g^2 / (sigma^2 Z)`` (Song et al. 2021b, Sec. 5.1, Eq. 12).

    Args:
        normalize: if ``True`` the weight is ``Z / (T - eps)`` so the loss equals the ``likelihood``
            loss in expectation; if ``False`` (the reference's choice) the weight is 1 and ``Z`` is
            dropped. Either way :attr:`Z` is exposed, and the likelihood bound always uses it.
    """

    def __init__(self, sde: SDE, eps: float | None = None, normalize: bool = False):
        super().__init__(sde, eps)
        self.normalize = normalize
        ends = torch.tensor([self.eps, self.T], dtype=torch.float64)
        F = sde.is_antiderivative(ends)
        self._F_eps = F[0]
        self.Z = float(F[1] - F[0])

    def icdf(self, u: Tensor) -> Tensor:
        v = self._F_eps.to(u.device) + u.double() * self.Z
        return self.sde.is_antiderivative_inv(v).clamp(self.eps, self.T)

    def cdf(self, t: Tensor) -> Tensor:
        return (self.sde.is_antiderivative(t.double()) - self._F_eps.to(t.device)) / self.Z

    def density(self, t: Tensor) -> Tensor:
        return self.sde.is_ratio(t) / self.Z

    def weight(self, t: Tensor) -> Tensor:
        w = self.Z / (self.T - self.eps) if self.normalize else 1.0
        return torch.full_like(t, w)

    @property
    def objective_scale(self) -> float:
        return 1.0 if self.normalize else self.Z / (self.T - self.eps)


WEIGHTINGS: dict[str, type[TimeSampler]] = {
    "original": OriginalWeighting,
    "likelihood": LikelihoodWeighting,
    "lw_is": ImportanceSampledLikelihood,
}


def get_time_sampler(name: str, sde: SDE, eps: float | None = None, **kwargs) -> TimeSampler:
    """Build a time sampler by name (``original``, ``likelihood``, ``lw_is``)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](sde, eps, **kwargs)
