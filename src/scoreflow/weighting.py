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
lw_is_trunc   q(t) ~ r(max(t, s)) on      1 (or Z/T)          g^2 on [s, T] (up to Z),
              [0, T], r = g^2/sigma^2                         sigma_t^2 r(s) below s
============  ==========================  ==================  ====================

``lw_is`` inverts the closed-form CDF of ``g^2/sigma^2`` (the reference uses 100 bisection steps). ``lw_is_trunc`` is
the truncated importance sampler of Huang et al. 2021 (App. I, Eq. 56-60): the same density on ``[s, T]``, flat below
the truncation point ``s``, so times in ``[0, eps)`` that ``lw_is`` never draws are trained on, with bounded weight.
For VE, ``g^2/sigma^2`` is constant, so ``lw_is`` *is* uniform sampling and ``likelihood`` equals
``original`` up to the constant ``2 log(sigma_max/sigma_min)``: it is supported, not an error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from scoreflow.sde import SDE


class TimeSampler(ABC):
    """Draws times in ``[t_min, T]`` with per-example loss weights.

    Args:
        sde: the forward SDE.
        eps: smallest time of the likelihood (and of training, where ``t_min = eps``); defaults to
            ``sde.default_eps``.
    """

    def __init__(self, sde: SDE, eps: float | None = None):
        self.sde = sde
        self.eps = sde.check_eps(sde.default_eps if eps is None else float(eps))
        self.T = sde.T

    @property
    def t_min(self) -> float:
        """Smallest training time: ``eps`` but for a sampler whose support reaches below it."""
        return self.eps

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
        """Density ``p(t)`` of the time distribution on ``[t_min, T]``."""

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


class TruncatedImportanceSampledLikelihood(TimeSampler):
    """Huang et al. 2021's truncated importance sampling of time (App. I, Eq. 56-60; sdeflow-light's "debias").

    ``t`` on ``[0, T]`` with density ``q(t) = r(max(t, s)) / Z``, ``r = g^2 / sigma^2``: ``lw_is``'s density on
    ``[s, T]`` and the constant ``r(s)`` below the truncation point ``s`` (``r`` itself is not integrable at 0 for
    VP/subVP). Unit weight on the eps-form term gives ``lambda(t) = sigma_t^2 r(max(t, s))``: the likelihood
    weighting ``g^2`` on ``[s, T]`` and ``sigma_t^2 g^2(s) / sigma_s^2`` below ``s`` (for VP/subVP it falls to 0
    about linearly in ``t``: the small bias Huang et al. accept for a bounded weight). For VE ``r`` is constant:
    uniform time on ``[0, T]`` with ``lambda = g^2`` exactly.

    Args:
        eps: the likelihood's smallest time (evaluation starts there); training times reach below it, to 0.
        truncation: ``s``; ``None`` is ``eps`` (``lw_is`` on ``[eps, T]`` plus a flat head), Huang et al. use 1e-3.
        normalize: weight ``Z / T`` (the loss is ``(1/T) int_0^T lambda l dt`` in expectation, the scale of uniform
            time on ``[0, T]``) instead of 1.
    """

    def __init__(self, sde: SDE, eps: float | None = None, truncation: float | None = None,
                 normalize: bool = False):
        super().__init__(sde, eps)
        s = self.eps if truncation is None else float(truncation)
        if not 0.0 < s < self.T:
            raise ValueError(f"truncation must satisfy 0 < truncation < T={self.T}, got truncation={truncation}")
        self.truncation, self.normalize = s, normalize
        F = sde.is_antiderivative(torch.tensor([s, self.T], dtype=torch.float64))
        self._F_s = F[0]
        self._r_s = float(sde.is_ratio(torch.tensor([s], dtype=torch.float64)))
        self.head = s * self._r_s  # unnormalized mass of [0, s)
        self.Z = self.head + float(F[1] - F[0])

    @property
    def t_min(self) -> float:
        return 0.0

    def icdf(self, u: Tensor) -> Tensor:
        v = u.double() * self.Z
        tail = self.sde.is_antiderivative_inv(self._F_s.to(u.device) + (v - self.head).clamp_min(0))
        t = torch.where(v < self.head, v / self._r_s, tail.clamp(self.truncation, self.T))
        # t = 0 only for u = 0 exactly (2^-53): kept positive so that log sigma_t and 1/sigma_t stay finite
        return t.clamp_min(torch.finfo(torch.float32).tiny)

    def cdf(self, t: Tensor) -> Tensor:
        t = t.double()
        tail = self.head + self.sde.is_antiderivative(t.clamp_min(self.truncation)) - self._F_s.to(t.device)
        return torch.where(t < self.truncation, t * self._r_s, tail) / self.Z

    def density(self, t: Tensor) -> Tensor:
        return self.sde.is_ratio(t.clamp_min(self.truncation)) / self.Z

    def weight(self, t: Tensor) -> Tensor:
        return torch.full_like(t, self.Z / self.T if self.normalize else 1.0)

    @property
    def objective_scale(self) -> float:
        return 1.0 if self.normalize else self.Z / self.T


WEIGHTINGS: dict[str, type[TimeSampler]] = {
    "original": OriginalWeighting,
    "likelihood": LikelihoodWeighting,
    "lw_is": ImportanceSampledLikelihood,
    "lw_is_trunc": TruncatedImportanceSampledLikelihood,
}


def get_time_sampler(name: str, sde: SDE, eps: float | None = None, **kwargs) -> TimeSampler:
    """Build a time sampler by name (``original``, ``likelihood``, ``lw_is``, ``lw_is_trunc``)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {sorted(WEIGHTINGS)}")
    return WEIGHTINGS[name](sde, eps, **kwargs)
