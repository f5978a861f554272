"""Correctors: score-based MCMC at a fixed time ``t`` (Song et al. 2021, App. G, Algorithms 4-5).

A corrector runs ``n_steps`` Langevin iterations ``x <- x + eps s(x, t) + sqrt(2 eps) z`` that leave
``p_t`` invariant (up to discretization error). They differ only in the step size ``eps``. The factor
``alpha_i`` comes from :meth:`SDE.langevin_alpha` (``1 - beta_i`` for VP and subVP, 1 for VE), so every
SDE works with every corrector; the reference has no such factor for subVP and crashes (issue #8).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor

from scoreflow.sampling.noise import NoiseSource
from scoreflow.sde import SDE
from scoreflow.utils import ScoreFn, append_dims, flat_dim

LangevinNorm = Literal["auto", "example", "batch"]
LANGEVIN_NORMS: tuple[str, ...] = ("auto", "example", "batch")
AUTO_BATCH_NORM_BELOW_DIM = 64
"""``norm="auto"`` takes batch norms for data of fewer dimensions ``D`` than this, per-example norms from it on."""


def _norm(v: Tensor) -> Tensor:
    """Per-example Euclidean norm, ``[B, ...] -> [B]``."""
    return v.reshape(v.shape[0], -1).norm(dim=1)


class Corrector(ABC):
    """``n_steps`` MCMC iterations at time ``t``; ``nfe == n_steps`` score evaluations per call."""

    def __init__(self, snr: float = 0.16, n_steps: int = 1):
        if snr <= 0 or n_steps < 0:
            raise ValueError(f"need snr > 0 and n_steps >= 0, got snr={snr}, n_steps={n_steps}")
        self.snr = float(snr)
        self.n_steps = int(n_steps)

    @property
    def nfe(self) -> int:
        return self.n_steps

    @abstractmethod
    def step_size(self, sde: SDE, x: Tensor, t: Tensor, dt: Tensor, score: Tensor, z: Tensor) -> Tensor:
        """Langevin step size ``eps``, shape ``[B]``."""

    def __call__(self, score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor, dt: Tensor, rng: NoiseSource) -> Tensor:
        """Correct ``x [B, ...]`` towards ``p_t``; ``t, dt [B]`` (``dt``: the predictor's step, for ``alpha_i``)."""
        for _ in range(self.n_steps):
            score = score_fn(x, t)
            z = rng.randn(tuple(x.shape), dtype=x.dtype, device=x.device)
            eps = append_dims(self.step_size(sde, x, t, dt, score, z), x.ndim)
            x = x + eps * score + (2 * eps).sqrt() * z
        return x


class NoneCorrector(Corrector):
    """No correction (a predictor-only sampler)."""

    def __init__(self, snr: float = 0.16, n_steps: int = 0):
        super().__init__(snr, 0)

    def step_size(self, sde: SDE, x: Tensor, t: Tensor, dt: Tensor, score: Tensor, z: Tensor) -> Tensor:
        return torch.zeros_like(t)


class LangevinCorrector(Corrector):
    """Algorithms 4/5: ``eps = 2 alpha_i (r ||z|| / ||s||)^2`` with ``r = snr``.

    ``norm="batch"`` averages the per-example norms over the mini-batch, as the paper and the reference do
    (score_sde's ``LangevinCorrector``: ``torch.norm(grad.reshape(B, -1), dim=-1).mean()``, the same for the
    noise). ``norm="example"`` takes them per example, so a sample does not depend on the batch it is drawn in
    (per-sample seeds reproduce it in any batch). But the per-example step depends on the state through
    ``||s(x)||``, which biases the chain's stationary law by O(1/D): measured at snr 0.16 on N(0, I), its
    variance comes out 19x / 1.6x / 1.16x / 1.05x for D = 2 / 8 / 32 / 128 against 1.02-1.03x with batch
    norms; in the whole default PC sampler (VP, 200 reverse-diffusion steps, N(0.5, 0.5 I)) 10.9x / 1.49x /
    1.25x / 1.14x / 1.10x / 1.05x for D = 2 / 8 / 16 / 32 / 64 / 128 against 0.98-1.03x. ``norm="auto"`` (default)
    is ``"batch"`` for ``D <`` :data:`AUTO_BATCH_NORM_BELOW_DIM` (64: toy and other low-dimensional data) and
    ``"example"`` from there on, which keeps every image set (8x8 digits, D = 64, and up) batch-independent and
    as before. A batch of one example has only per-example norms: draw low-dimensional samples in batches.
    """

    def __init__(self, snr: float = 0.16, n_steps: int = 1, norm: LangevinNorm = "auto"):
        super().__init__(snr, n_steps)
        if norm not in LANGEVIN_NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, LANGEVIN_NORMS))}, got {norm!r}")
        self.norm = norm

    def resolved_norm(self, x: Tensor) -> str:
        """``"example"`` or ``"batch"``: what ``norm`` means for data ``x [B, ...]`` (``"auto"`` decides by ``D``)."""
        if self.norm != "auto":
            return self.norm
        return "batch" if flat_dim(x) < AUTO_BATCH_NORM_BELOW_DIM else "example"

    def step_size(self, sde: SDE, x: Tensor, t: Tensor, dt: Tensor, score: Tensor, z: Tensor) -> Tensor:
        z_norm, s_norm = _norm(z), _norm(score)
        if self.resolved_norm(x) == "batch":
            z_norm, s_norm = z_norm.mean().expand_as(z_norm), s_norm.mean().expand_as(s_norm)
        ratio = z_norm / s_norm.clamp_min(torch.finfo(x.dtype).tiny)
        return 2 * sde.langevin_alpha(t, dt) * (self.snr * ratio) ** 2


class AnnealedLangevin(Corrector):
    """Annealed Langevin dynamics (Song & Ermon 2019) with ``eps = 2 alpha_i (r sigma_t)^2``.

    ``sigma_t`` is the perturbation kernel's std, so the step shrinks with the noise level as in SMLD
    (``eps_i proportional to sigma_i^2``); ``||z|| / ||s|| ~ sigma_t`` for concentrated data, so this is the
    Langevin corrector with its random ratio replaced by its typical value.
    """

    def step_size(self, sde: SDE, x: Tensor, t: Tensor, dt: Tensor, score: Tensor, z: Tensor) -> Tensor:
        return 2 * sde.langevin_alpha(t, dt) * (self.snr * sde.sigma(t)) ** 2


CORRECTORS: dict[str, type[Corrector]] = {
    "none": NoneCorrector,
    "langevin": LangevinCorrector,
    "ald": AnnealedLangevin,
}


def get_corrector(
    corrector: str | Corrector | None, snr: float = 0.16, n_steps: int = 1, norm: LangevinNorm = "auto"
) -> Corrector:
    """A corrector from its name (a key of :data:`CORRECTORS`) or an instance; ``None`` means ``"none"``.

    ``norm`` configures a named ``"langevin"`` corrector (:class:`LangevinCorrector`); the other correctors
    take no norms and ignore it, but it must still be one of :data:`LANGEVIN_NORMS`.
    """
    if norm not in LANGEVIN_NORMS:
        raise ValueError(f"corrector_norm must be one of {', '.join(map(repr, LANGEVIN_NORMS))}, got {norm!r}")
    if isinstance(corrector, Corrector):
        return corrector
    name = "none" if corrector is None else corrector
    if name not in CORRECTORS:
        raise ValueError(f"unknown corrector {name!r}; choose from {sorted(CORRECTORS)}")
    if CORRECTORS[name] is LangevinCorrector:
        return LangevinCorrector(snr=snr, n_steps=n_steps, norm=norm)
    return CORRECTORS[name](snr=snr, n_steps=n_steps)
