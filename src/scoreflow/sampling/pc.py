"""Predictor-Corrector sampling (Song et al. 2021, Sec. 4.2, Algorithm 1) and Tweedie noise removal."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreflow.sampling.correctors import Corrector, LangevinNorm, get_corrector
from scoreflow.sampling.noise import NoiseSource, initial_state, make_noise
from scoreflow.sampling.predictors import Predictor, get_predictor
from scoreflow.sampling.registry import register_sampler
from scoreflow.sde import SDE
from scoreflow.utils import ScoreFn, append_dims, call_score, shape_checked

Projection = Callable[[Tensor, Tensor, NoiseSource], Tensor]
"""``project(x [B, ...], t [B], rng) -> x``: a constraint applied after every update (e.g. inpainting)."""


@dataclass
class SampleResult:
    """Samples ``[B, ...]`` and ``nfe``, the number of (batched) score evaluations spent on them; ``known_error``
    (imputation only): the sampler's largest distance from the known entries before they were put back."""

    samples: Tensor
    nfe: int
    known_error: float | None = None


def time_grid(sde: SDE, steps: int, eps: float, *, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    """``steps + 1`` uniformly spaced times from ``T`` down to ``eps``, shape ``[steps + 1]``."""
    if steps < 1:
        raise ValueError(f"need steps >= 1, got {steps}")
    sde.check_eps(eps)
    return torch.linspace(sde.T, eps, steps + 1, dtype=dtype, device=device)


def tweedie_denoise(score_fn: ScoreFn, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """Noise removal by Tweedie's formula: ``E[x0 | x_t] = (x_t + sigma_t^2 s(x_t, t)) / alpha_t`` (App. G).

    One score evaluation; ``x [B, ...]``, ``t [B]``. For VE (``alpha = 1``) it is ``x + sigma^2 s``.
    """
    alpha, sigma = sde.marginal(t)
    return (x + append_dims(sigma**2, x.ndim) * call_score(score_fn, x, t)) / append_dims(alpha, x.ndim)


def describe_pc(o: Mapping[str, Any]) -> str:
    norm = o.get("corrector_norm")
    norm = f", norm={norm}" if o.get("corrector") == "langevin" and norm not in (None, "auto") else ""
    return (f"PC {o.get('predictor')} + {o.get('corrector')} (snr={o.get('snr')}, n_steps={o.get('n_steps')}{norm}),"
            f" steps={o.get('steps') or 'N'}, denoise={o.get('denoise')}")


@register_sampler("pc", describe=describe_pc)
def pc_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape: Sequence[int] | None = None,
    *,
    predictor: str | Predictor | None = "reverse_diffusion",
    corrector: str | Corrector | None = "langevin",
    lam: float | None = None,
    variance: str | None = None,
    snr: float = 0.16,
    n_steps: int = 1,
    corrector_norm: LangevinNorm = "auto",
    steps: int | None = None,
    eps: float | None = None,
    denoise: bool = True,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    project: Projection | None = None,
) -> SampleResult:
    """Sample ``[B, ...]`` by alternating a predictor and ``n_steps`` corrector iterations (Algorithm 1).

    Args:
        score_fn: ``score_fn(x [B, ...], t [B])`` -> score shaped like ``x``.
        sde: the forward SDE the score belongs to.
        shape: ``(B, ...)``; may be omitted when ``noise`` is given.
        predictor: a name in :data:`~scoreflow.sampling.predictors.PREDICTORS` or an instance.
        lam: ``lambda`` of ``predictor="lambda_family"``, Huang et al.'s plug-in reverse SDEs (Eq. 27):
            0 the reverse SDE, 1 the probability-flow ODE; ``None`` for every other predictor.
        variance: the noise variance of ``predictor="ancestral"`` (:class:`~scoreflow.sampling.predictors.Ancestral`):
            ``"auto"`` (``None``: the default) is Eq. 4's ``beta_i`` for VP/subVP and Eq. 47's posterior variance for
            VE, as the paper and the reference; ``"posterior"`` / ``"forward"`` force one for every SDE.
        corrector: a name in :data:`~scoreflow.sampling.correctors.CORRECTORS` or an instance
            (``snr``, ``n_steps`` and, for ``"langevin"``, ``corrector_norm`` configure a named one).
        corrector_norm: how the ``"langevin"`` corrector takes its norms ``||z||``, ``||s||``
            (:class:`~scoreflow.sampling.correctors.LangevinCorrector`): ``"auto"`` (default) is ``"batch"``,
            the reference's mean over the batch, for data of fewer than 64 dimensions, where per-example norms
            bias the samples, and ``"example"`` from 64 on (every image set), so a sample depends on its seed only.
        steps: number of predictor steps on a uniform grid from ``T`` to ``eps`` (default ``sde.N``).
        eps: last time (default ``sde.default_sample_eps``).
        denoise: finish with Tweedie's ``E[x0 | x_eps]`` (one more score evaluation). The reference instead
            returns the noise-free mean of a last predictor step; Tweedie is what the paper states (App. G)
            and is exact for the posterior mean.
        noise: the prior sample ``x_T`` to start from (default: drawn from the noise source).
        generator / seeds: one generator for the batch, or one seed per example (an example then depends
            on its seed only, whatever the batch size, unless the Langevin corrector takes batch norms).
        project: optional constraint applied to ``x_T`` and after every predictor and corrector update.

    Returns:
        :class:`SampleResult` with ``nfe = steps * (predictor.nfe + corrector.nfe) + denoise``.
    """
    pred = get_predictor(predictor, lam=lam, variance=variance)
    corr = get_corrector(corrector, snr=snr, n_steps=n_steps, norm=corrector_norm)
    score_fn = shape_checked(score_fn)  # its first evaluation checks the score is shaped like x
    rng = make_noise(generator=generator, seeds=seeds, device=device if noise is None else noise.device)
    x = initial_state(sde, None if shape is None else tuple(shape), noise, rng, dtype=dtype, device=device)
    eps = sde.default_sample_eps if eps is None else eps
    ts = time_grid(sde, sde.N if steps is None else steps, eps, dtype=x.dtype, device=x.device)
    B, nfe = x.shape[0], 0

    def constrain(x: Tensor, t: Tensor) -> Tensor:
        return x if project is None else project(x, t, rng)

    x = constrain(x, ts[0].expand(B))
    with torch.no_grad():
        for i in tqdm(range(len(ts) - 1), disable=not progress, desc="pc sampling"):
            t, t_next = ts[i].expand(B), ts[i + 1].expand(B)
            x = constrain(pred.step(score_fn, sde, x, t, t_next, rng), t_next)
            if corr.n_steps:
                x = constrain(corr(score_fn, sde, x, t_next, t - t_next, rng), t_next)
            nfe += pred.nfe + corr.nfe
        if denoise:
            x = tweedie_denoise(score_fn, sde, x, ts[-1].expand(B))
            nfe += 1
    return SampleResult(samples=x, nfe=nfe)
