"""Predictors: one step of a numerical solver of the reverse-time SDE (Song et al. 2021, Sec. 4.2).

All predictors share one signature, ``step(score_fn, sde, x, t, t_next, rng) -> x_next``, move ``x`` of
shape ``[B, ...]`` from time ``t`` to ``t_next < t`` (both ``[B]``) and cost ``nfe`` score evaluations.
They are written once for any :class:`~scoreflow.sde.SDE` with a linear drift, so every SDE (VP, subVP,
VE, or a new one) gets every predictor; nothing branches on the SDE type.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

from torch import Tensor

from scoreflow.sampling.noise import NoiseSource
from scoreflow.sde import SDE
from scoreflow.utils import ScoreFn, append_dims


class Predictor(ABC):
    """One reverse-time step ``t -> t_next``; ``nfe`` is the number of score evaluations it makes."""

    nfe: int = 1

    @abstractmethod
    def step(self, score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, t_next: Tensor, rng: NoiseSource) -> Tensor:
        """``x [B, ...]`` at time ``t [B]`` -> a sample at ``t_next [B]`` (``t_next < t``)."""

    def _z(self, x: Tensor, rng: NoiseSource) -> Tensor:
        return rng.randn(tuple(x.shape), dtype=x.dtype, device=x.device)


class NonePredictor(Predictor):
    """The identity: PC sampling with it is corrector-only (SMLD's annealed Langevin, "C2000" in Table 1)."""

    nfe = 0

    def step(self, score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, t_next: Tensor, rng: NoiseSource) -> Tensor:
        return x


class EulerMaruyama(Predictor):
    """Euler-Maruyama on the reverse SDE ``dx = [f - g^2 s] dt + g dw_bar`` (Eq. 6), with ``dt = t_next - t < 0``."""

    def step(self, score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, t_next: Tensor, rng: NoiseSource) -> Tensor:
        dt = append_dims(t - t_next, x.ndim)  # |dt| > 0
        x_mean = x - sde.reverse_drift(x, t, score_fn(x, t)) * dt
        return x_mean + append_dims(sde.diffusion(t), x.ndim) * dt.sqrt() * self._z(x, rng)


class ReverseDiffusion(Predictor):
    """Reverse diffusion (App. E, Eq. 46): ``x <- x - f_i + G_i^2 s + G_i z``.

    ``(f_i, G_i)`` is the SDE's own forward discretization (DDPM for VP, SMLD for VE, Euler otherwise) of
    the step ``t_next -> t`` that this reverse step undoes; for VP it is Algorithm 3's predictor
    ``(2 - sqrt(1 - beta)) x + beta s + sqrt(beta) z`` and for VE Algorithm 2's.
    """

    def step(self, score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, t_next: Tensor, rng: NoiseSource) -> Tensor:
        f, G = sde.discretize(x, t_next, t - t_next)
        G = append_dims(G, x.ndim)
        return x - f + G**2 * score_fn(x, t) + G * self._z(x, rng)


class PlugInReverseSDE(Predictor):
    """Euler-Maruyama on Huang et al.'s lambda-family of plug-in reverse SDEs (Huang et al. 2021, Eq. 27, App. G):

    ``dx = [f - (1 - lam / 2) g^2 s] dt + sqrt(1 - lam) g dw_bar`` (reverse time, ``dt = t_next - t < 0``).

    For the exact score every ``lam <= 1`` has the marginals ``p_t`` of the forward SDE (the Fokker-Planck
    equation is rearranged, App. G, Eqs. 46-49): ``lam = 0`` is the reverse SDE of Song et al. (2021, Eq. 6),
    i.e. :class:`EulerMaruyama`, and ``lam = 1`` the probability-flow ODE (Euler). ``lam < 0`` adds noise.
    With a learnt score the members differ, and their CT-ELBO falls as ``lam`` grows (Theorem 6, Eq. 28).
    """

    def __init__(self, lam: float = 0.0):
        lam = float(lam)
        if not lam <= 1.0:
            raise ValueError(f"the plug-in reverse SDE family needs lam <= 1 (Huang et al. 2021, Eq. 27); got {lam}")
        self.lam = lam

    def coefficients(self) -> tuple[float, float]:
        """``(c_s, c_w)``: the score enters the drift as ``c_s g^2 s`` and the noise as ``c_w g dw_bar``."""
        return 1.0 - self.lam / 2.0, math.sqrt(1.0 - self.lam)

    def step(self, score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, t_next: Tensor, rng: NoiseSource) -> Tensor:
        c_s, c_w = self.coefficients()
        dt = append_dims(t - t_next, x.ndim)  # |dt| > 0
        drift = sde.drift(x, t) - c_s * append_dims(sde.g2(t), x.ndim) * score_fn(x, t)
        x_mean = x - drift * dt
        if c_w == 0.0:  # the ODE member: nothing to draw
            return x_mean
        return x_mean + c_w * append_dims(sde.diffusion(t), x.ndim) * dt.sqrt() * self._z(x, rng)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return f"PlugInReverseSDE(lam={self.lam})"


class ProbabilityFlow(Predictor):
    """Deterministic discretization of the probability-flow ODE (App. D.3, Eqs. 43-44): ``x - f_i + G_i^2 s / 2``."""

    def step(self, score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, t_next: Tensor, rng: NoiseSource) -> Tensor:
        f, G = sde.discretize(x, t_next, t - t_next)
        return x - f + 0.5 * append_dims(G**2, x.ndim) * score_fn(x, t)


ANCESTRAL_VARIANCES = ("auto", "posterior", "forward")


class Ancestral(Predictor):
    """Ancestral sampling for any linear SDE: draw ``x_s ~ q(x_s | x_t, x0_hat)`` with ``s = t_next``.

    With the kernel ``x_t | x_s ~ N(a x_s, b^2 I)``, ``(a, b) = sde.transition(s, t)``, and
    ``x_s | x0 ~ N(alpha_s x0, sigma_s^2 I)``, the Gaussian posterior is
    ``N((a sigma_s^2 x_t + alpha_s b^2 x0) / sigma_t^2, sigma_s^2 b^2 / sigma_t^2 I)``. Plugging in
    Tweedie's ``x0_hat = (x_t + sigma_t^2 s) / alpha_t`` the mean simplifies (``alpha_s / alpha_t = 1 / a``,
    ``sigma_t^2 = a^2 sigma_s^2 + b^2``) to ``(x_t + b^2 s) / a``, which is
      - VP: DDPM's Eq. (4) with ``beta_i = b^2 = 1 - alpha_t^2 / alpha_s^2``;
      - VE: SMLD ancestral sampling, App. F Eq. (47), with ``b^2 = sigma_t^2 - sigma_s^2``.
    ``variance="posterior"`` uses the posterior variance (Eq. 47's ``tau_i^2``; DDPM's beta-tilde);
    ``"forward"`` uses ``b^2`` (DDPM's ``sigma_i^2 = beta_i`` of Eq. 4); ``"auto"`` (default) is what the paper
    writes and the reference runs for each SDE: ``"forward"`` for VP and subVP (Eq. 4), ``"posterior"`` for VE
    (Eq. 47). Releases before 2026-11-28 used ``"posterior"`` for every SDE.
    """

    def __init__(self, variance: Literal["auto", "posterior", "forward"] = "auto"):
        if variance not in ANCESTRAL_VARIANCES:
            raise ValueError(f"variance must be one of {', '.join(ANCESTRAL_VARIANCES)}, got {variance!r}")
        self.variance = variance

    def variance_for(self, sde: SDE) -> str:
        """``"posterior"`` or ``"forward"``: ``self.variance`` with ``"auto"`` resolved for ``sde``."""
        if self.variance != "auto":
            return self.variance
        from scoreflow.sde import VESDE

        return "posterior" if isinstance(sde, VESDE) else "forward"

    def step(self, score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, t_next: Tensor, rng: NoiseSource) -> Tensor:
        a, b = sde.transition(t_next, t)
        b2 = b**2
        mean = (x + append_dims(b2, x.ndim) * score_fn(x, t)) / append_dims(a, x.ndim)
        if self.variance_for(sde) == "posterior":
            sigma_s2 = sde.sigma(t_next) ** 2
            var = sigma_s2 * b2 / (a**2 * sigma_s2 + b2)
        else:
            var = b2
        return mean + append_dims(var.sqrt(), x.ndim) * self._z(x, rng)


PREDICTORS: dict[str, type[Predictor]] = {
    "none": NonePredictor,
    "euler_maruyama": EulerMaruyama,
    "reverse_diffusion": ReverseDiffusion,
    "ancestral": Ancestral,
    "probability_flow": ProbabilityFlow,
    "lambda_family": PlugInReverseSDE,
}

PARAMETRIZED: dict[str, tuple[str, ...]] = {"lambda_family": ("lam",), "ancestral": ("variance",)}
"""Predictors that take arguments from the sampler config (``sampler.lam``, ``sampler.variance``), by name."""


def get_predictor(predictor: str | Predictor | None, *, lam: float | None = None,
                  variance: str | None = None) -> Predictor:
    """A predictor from its name (a key of :data:`PREDICTORS`) or an instance; ``None`` means ``"none"``.

    ``lam`` is the ``lambda`` of ``"lambda_family"`` (Huang et al. 2021, Eq. 27; default 0, the reverse SDE);
    ``variance`` that of ``"ancestral"`` (:class:`Ancestral`: auto, posterior or forward). Giving either with
    another predictor is an error rather than silently ignored.
    """
    given = {k: v for k, v in (("lam", lam), ("variance", variance)) if v is not None}
    if isinstance(predictor, Predictor):
        if given:
            raise ValueError(f"{', '.join(f'{k}={v}' for k, v in given.items())} cannot be applied to a predictor "
                             f"instance ({type(predictor).__name__})")
        return predictor
    name = "none" if predictor is None else predictor
    if name not in PREDICTORS:
        raise ValueError(f"unknown predictor {name!r}; choose from {sorted(PREDICTORS)}")
    for key, value in given.items():
        if key not in PARAMETRIZED.get(name, ()):
            users = [p for p, args in PARAMETRIZED.items() if key in args]
            raise ValueError(f"{key}={value} is only used by predictor={' or '.join(users)}, not by predictor={name}")
    return PREDICTORS[name](**given)
