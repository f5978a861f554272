"""Per-datapoint upper bound on ``-log p^SDE(x)``: ``L^DSM`` of Theorem 3 (Song et al. 2021b).

On ``[eps, T]``, with ``w = sigma_t s(x_t, t) + z``, ``x_t = alpha_t x + sigma_t z``:

    L(x) = -E[log pi(x_T)]                                                  (prior term)
         + 1/2 int_eps^T g^2 E||s - grad log p_0t(x_t|x)||^2 dt              (DSM term)
         - 1/2 int_eps^T E[g^2 ||grad log p_0t||^2 + 2 div f] dt.            (constant term)

For the linear drifts here the prior and constant terms are Gaussian expectations with closed forms:
``-E[log pi(x_T)]`` is :meth:`SDE.prior_cross_entropy`, and since ``E||grad log p_0t||^2 = D / sigma_t^2`` and
``div f = a(t) D`` with ``int a dt = log alpha_T - log alpha_eps``, the constant term is
``-D Z / 2 - D (log alpha_T - log alpha_eps)`` with ``Z = int g^2/sigma^2 dt`` (:meth:`SDE.is_normalizer`).
Only the DSM term is left to Monte Carlo, ``1/2 E_t[W(t) ||w||^2]`` with ``W = (g^2/sigma^2) / p(t)``:
``W = Z`` under importance sampling ``p(t) = g^2/(sigma^2 Z)`` and ``W = (T - eps) g^2/sigma^2`` under
uniform time; each time sample gets a fresh ``z``.

Estimators (``estimator=``), all unbiased, differing in variance only:

* ``"closed_form"`` (default): the above.
* ``"paired"``: the constant term by Monte Carlo on the *same* ``(t, z)`` as the DSM term, i.e.
  ``1/2 W (||w||^2 - ||z||^2) - D a(t) / p(t)`` per sample (prior term still closed). The ``||z||^2`` part is a
  control variate for ``||w||^2`` (``w ~ z`` where ``sigma_t s`` is small: low noise, poor models), the
  ``a(t)/p(t)`` part cancels the drift of the per-time mean across ``t`` (VP, subVP).
* ``"monte_carlo"``: as ``"paired"`` plus ``-log pi(x_T)``, ``x_T ~ p_0T(.|x)``, per time sample. ScoreFlow's
  ``bound_likelihood.py`` computes the same per-time integrand but draws *one* prior sample per image, which
  adds ``N Var(-log pi(x_T))`` per call (``bench/bound_variance.py`` re-implements it as written).

``stratified=True`` draws one time per stratum ``u in [k/n, (k+1)/n)`` of the sampler's CDF; this removes
the variation of the per-time mean from the variance (``nll_se`` then comes from differences of adjacent
strata, a slightly conservative estimate).

Measured by ``bench/likelihood.py`` (variance of one time sample, float64; closed / paired / all-MC).
Exact score of a 2-d mixture, VP eps=1e-5: IS i.i.d. 378 / 312 / 313, IS stratified 268 / 300 / 301,
uniform i.i.d. 2.0e4 / 232 / 230; VE, IS: 164 / 227 / 226. Random tiny MLP (D=16, VP, IS): i.i.d.
4633 / 7301 / 7322, stratified 4615 / 60 / 68. So the closed forms remove the prior and ``div f`` noise and
are the best choice for an accurate score (VE; VP and subVP once stratified), but they keep the
``||z||^2`` fluctuation ``~ 2 D (Z/2)^2`` that only the paired control variate cancels: for a poor model,
paired + stratified is ~77x lower. Importance sampling is the largest effect for the closed forms (~50x on
the oracle, ~170x on the MLP at eps=1e-5); under uniform time only the paired estimators are usable.

A trained model sits between the two: its ``||w||^2`` follows ``||z||^2`` at small ``t`` (below the
dequantization scale the score is ~0) and not at large ``t``. ``plan=`` (:class:`BoundPlan`, fitted once by
:func:`fit_bound_plan` on pilot images) uses the least-variance coefficient ``c(u)`` of ``||z||^2`` per bin of
the IS quantile, a Neyman time density ``q(u)`` and a mean baseline ``h(u)`` that keeps ``q`` compatible with
stratification; ``antithetic=True`` pairs ``z`` with ``-z``. Measured by ``bench/bound_variance.py`` on the
default run's checkpoint (64 test images, 50 calls each, variance per call in bpd^2 from 8 independent repeats):
ScoreFlow's estimator 26.5, paired + stratified 5.9, closed_form + stratified 3.35 (7.9x fewer calls than
ScoreFlow's for the same standard error), plan ``c`` + stratified 0.64 (41x), plan ``c, q, h`` + stratified 0.34
(77x), the same with antithetic pairs 0.27 (97x; 0.30 vs 0.35 at 20 calls). ``q`` without ``h`` *hurts* (1.15:
the strata then see the steep per-time mean), and antithetic pairs hurt the estimators without ``c(u)``
(closed_form + stratified 6.5, paired + stratified 13.0): the ``||z||^2`` part is even in ``z`` and dominates.

``truncation_correction=True`` adds ``E_{x_eps ~ p_0eps(.|x)}[-log q(x|x_eps)] - H(p_0eps(.|x))`` with the
Tweedie decoder (:mod:`scoreflow.likelihood.truncation`), turning the bound on ``-log p_eps`` into one on
``-log p_0(x)``. Why adding it to ``L_[eps,T](x)`` (computed with the ``p_0t`` kernels) is valid: the bound
of Theorem 3 applied to the data point ``x_eps`` with the kernels ``p_eps,t`` gives ``-log p_eps(x_eps) <=
L'(x_eps)``; ``L'`` in its ``L^SM`` form only depends on the law of ``x_t`` given ``x_eps``, and averaged over
``x_eps ~ p_0eps(.|x)`` that law is ``p_0t(.|x)`` (equivalently, Fisher's identity ``grad log p_0t(x_t|x) =
E[grad log p_eps,t(x_t|x_eps) | x_t, x]`` makes the ``L^DSM`` forms agree), so ``E_{x_eps|x}[L'(x_eps)] =
L_[eps,T](x) >= E_{x_eps|x}[-log p_eps(x_eps)]``, and Jensen with the decoder finishes the bound:
``-log p_0(x) <= L_[eps,T](x) + E[-log q(x|x_eps)] - H(p_0eps(.|x))``.

With the exact score of data ``p_0``: ``E_{x~p_0}[L_[eps,T](x)] = H(p_eps) + KL(p_T || pi)`` (Theorem 2's
tightness plus the entropy identity of Theorem 4); the tests check exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from scoreflow.likelihood.divergence import randn_like
from scoreflow.likelihood.truncation import truncation_correction as _truncation_correction
from scoreflow.sde import SDE
from scoreflow.utils import ScoreFn, append_dims, call_score, flat_dim, shape_checked, sum_except_batch
from scoreflow.weighting import ImportanceSampledLikelihood, TimeSampler, UniformTime

Estimator = Literal["closed_form", "paired", "monte_carlo"]
BOUND_ESTIMATORS: tuple[str, ...] = ("closed_form", "paired", "monte_carlo")


@dataclass
class BoundResult:
    """Result of :func:`likelihood_bound`; every tensor is ``[B]``, in nats per example.

    ``nll = prior_term + dsm_term + const_term + correction``. ``nll_se`` is the Monte-Carlo standard error of
    ``nll`` (squared and converted to the reported units, the per-image ``mc_var`` of
    :func:`scoreflow.likelihood.units.split_standard_error`); ``sample_var`` is the variance per score call,
    ``num_t * nll_se^2`` without the correction's spread: compare estimators, plans and antithetic pairs on it
    (for i.i.d. times it is the variance of one time sample).
    """

    nll: Tensor
    nll_se: Tensor
    prior_term: Tensor
    dsm_term: Tensor
    const_term: Tensor
    correction: Tensor
    sample_var: Tensor
    num_t: int
    eps: float
    importance_sampling: bool
    estimator: str
    stratified: bool
    truncation_correction: bool
    antithetic: bool = False
    plan: BoundPlan | None = None


@dataclass
class BoundPlan:
    """How to spend a fixed number of score calls on the bound: a density and a control variate over the IS quantile.

    ``u in [0, 1]`` is the quantile of the importance sampler ``p(t) = g^2/(sigma^2 Z)`` (``t = F^-1(u)``), cut
    into ``M`` equal bins. ``density[M]`` (mean 1) is a piecewise-constant density ``q(u)`` to draw ``u`` from
    (weight ``Z / q(u)``): more calls where the estimator is noisy (Neyman allocation). ``cv[M]`` is the
    coefficient ``c(u)`` of the mean-zero control variate ``-c(u) W/2 (||z||^2 - D)``: ``c = 0`` is the closed
    form, ``c = 1`` the paired estimator's ``||z||^2`` term; a trained model wants ``c ~ 1`` at small ``t``
    (the score is ~0 below the dequantization scale, so ``||w||^2 ~ ||z||^2``) and ``c ~ 0`` at large ``t``.
    ``mean[M]`` (optional, nats) is a baseline ``h(u)``, linear between bin centres, for the per-time mean of the
    DSM integrand: each sample gets ``-h(u)/q(u) + int_0^1 h du`` (mean zero), which flattens what stratification
    sees when ``q`` is far from uniform (the integrand falls from ~D Z/2 at small ``t`` to ~0).
    Every fixed plan gives an unbiased estimate; fit one with :func:`fit_bound_plan` on draws that the
    evaluated estimate does not reuse.
    """

    cv: Tensor
    density: Tensor
    mean: Tensor | None = None

    def __post_init__(self):
        self.cv = torch.as_tensor(self.cv, dtype=torch.float64).reshape(-1)
        d = torch.as_tensor(self.density, dtype=torch.float64).reshape(-1)
        if d.shape != self.cv.shape or not bool((d > 0).all()):
            raise ValueError(f"need density > 0 and one value per bin like cv {tuple(self.cv.shape)}")
        self.density = d / d.mean()
        self._cdf = torch.cat([d.new_zeros(1), (self.density / len(d)).cumsum(0)])
        if self.mean is not None:
            self.mean = torch.as_tensor(self.mean, dtype=torch.float64).reshape(-1)
            if self.mean.shape != self.cv.shape:
                raise ValueError(f"need one mean per bin like cv {tuple(self.cv.shape)}")

    def baseline(self, u: Tensor) -> Tensor:
        """``h(u)``: linear between the bin centres, constant beyond the outer ones (0 without ``mean``)."""
        if self.mean is None:
            return torch.zeros_like(u)
        M, h = self.num_bins, self.mean.to(u.device)
        pos = (u * M - 0.5).clamp(0.0, M - 1.0)
        k = pos.floor().long().clamp(max=max(M - 2, 0))
        frac = pos - k
        return h[k] * (1 - frac) + h[(k + 1).clamp(max=M - 1)] * frac

    @property
    def baseline_integral(self) -> float:
        """``int_0^1 h(u) du`` in closed form (trapezoids between centres, half bins at the ends)."""
        if self.mean is None:
            return 0.0
        h, M = self.mean, self.num_bins
        inner = float(((h[:-1] + h[1:]) / 2).sum()) if M > 1 else 0.0
        return (inner + 0.5 * float(h[0] + h[-1])) / M

    @property
    def num_bins(self) -> int:
        return len(self.cv)

    def _bin(self, u: Tensor) -> Tensor:
        return (u * self.num_bins).long().clamp(0, self.num_bins - 1)

    def pdf(self, u: Tensor) -> Tensor:
        return self.density.to(u.device)[self._bin(u)]

    def coef(self, u: Tensor) -> Tensor:
        return self.cv.to(u.device)[self._bin(u)]

    def icdf(self, s: Tensor) -> Tensor:
        """Quantile function of ``q``: ``s in [0, 1] -> u`` (linear inside each bin)."""
        cdf = self._cdf.to(s.device)
        k = (torch.searchsorted(cdf, s.double(), right=True) - 1).clamp(0, self.num_bins - 1)
        u = k / self.num_bins + (s - cdf[k]) / self.density.to(s.device)[k]
        return u.clamp(0.0, 1.0)

    def as_dict(self) -> dict[str, list[float] | None]:
        """Plain lists (JSON, a checkpoint, a resumed evaluation): ``BoundPlan(**plan.as_dict())`` rebuilds it."""
        return {
            "cv": self.cv.tolist(),
            "density": self.density.tolist(),
            "mean": None if self.mean is None else self.mean.tolist(),
        }

    @classmethod
    def uniform(cls, num_bins: int = 1, cv: float = 0.0) -> BoundPlan:
        """The plain IS sampler with a constant coefficient (``cv=0``: closed form)."""
        return cls(torch.full((num_bins,), float(cv)), torch.ones(num_bins))


def fit_bound_plan(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    eps: float | None = None,
    num_bins: int = 20,
    draws: int = 4,
    neyman: bool = True,
    baseline: bool = True,
    floor: float = 0.1,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
) -> BoundPlan:
    """Fit a :class:`BoundPlan` from ``B * num_bins * draws`` pilot score calls on the pilot data ``x [B, ...]``.

    In every bin of the IS quantile, ``draws`` times per image (uniform in the bin, fresh ``z``) give
    ``a = W/2 ||w||^2`` and ``b = W/2 (||z||^2 - D)``; ``cv`` is the pooled regression coefficient of ``a`` on
    ``b`` within (image, bin) cells, the least-variance ``c`` for that bin. With ``neyman`` the density is
    proportional to the residual standard deviation per bin, mixed with ``floor`` of the uniform density
    (so no region is left with a huge weight); with ``baseline`` the plan's ``mean`` is the pooled per-bin mean of
    ``a - cv b``. Use pilot images or draws that the evaluation does not reuse.
    """
    if draws < 2:
        raise ValueError(f"need draws >= 2 per bin to fit the control variate, got {draws}")
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must lie in [0, 1], got {floor}")
    eps = sde.check_eps(sde.default_eps if eps is None else float(eps))
    B, D, M = x.shape[0], flat_dim(x), num_bins
    sampler = ImportanceSampledLikelihood(sde, eps)
    dev = x.device if generator is None else generator.device
    r = torch.rand(B, M, draws, generator=generator, dtype=torch.float64, device=dev).to(x.device)
    u = (torch.arange(M, dtype=torch.float64, device=x.device)[:, None] + r) / M
    t_flat = sampler.icdf(u).reshape(-1).to(x.dtype)
    rows = torch.arange(B, device=x.device).repeat_interleave(M * draws)
    a, b = [], []
    with torch.no_grad():
        for start in range(0, len(rows), chunk_size):
            sl = slice(start, start + chunk_size)
            x0, t = x[rows[sl]], t_flat[sl]
            z = randn_like(x0, generator)
            x_t = sde.perturb(x0, t, z)
            w = append_dims(sde.sigma(t), x0.ndim) * call_score(score_fn, x_t, t).to(x.dtype) + z
            a.append(0.5 * sampler.Z * sum_except_batch(w**2).double())
            b.append(0.5 * sampler.Z * (sum_except_batch(z**2).double() - D))
    A, Bz = torch.cat(a).reshape(B, M, draws), torch.cat(b).reshape(B, M, draws)
    Ac, Bc = A - A.mean(2, keepdim=True), Bz - Bz.mean(2, keepdim=True)
    cv = (Ac * Bc).sum((0, 2)) / (Bc * Bc).sum((0, 2))
    resid = A - cv[None, :, None] * Bz
    mean = resid.mean((0, 2)).cpu() if baseline else None
    if not neyman:
        return BoundPlan(cv.cpu(), torch.ones(M, dtype=torch.float64), mean)
    sd = resid.var(dim=2).mean(0).sqrt()
    density = (1 - floor) * sd / sd.mean().clamp_min(1e-300) + floor
    return BoundPlan(cv.cpu(), density.cpu(), mean)


def likelihood_bound(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    eps: float | None = None,
    num_t: int = 1000,
    importance_sampling: bool = True,
    truncation_correction: bool = False,
    num_eps_samples: int = 4,
    estimator: Estimator = "closed_form",
    stratified: bool = False,
    plan: BoundPlan | None = None,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    dtype: torch.dtype | None = None,
) -> BoundResult:
    """Monte-Carlo estimate of ``L^DSM_[eps,T](x)`` (Theorem 3), optionally eps-corrected.

    Args:
        score_fn: ``score_fn(x [N, ...], t [N]) -> [N, ...]``, shaped like its ``x`` (else ``ValueError``).
        x: data ``[B, ...]`` on the model's scale. Not detached: the result is differentiable w.r.t. ``x``
            (and the model), e.g. for variational dequantization; wrap the call in ``torch.no_grad()`` to evaluate.
        eps: smallest time (default ``sde.default_eps``).
        num_t: time samples per example (>= 1), each with a fresh ``z``.
        importance_sampling: ``t ~ g^2/(sigma^2 Z)`` if ``True`` (Song et al. 2021b, Sec. 5.1, Eq. 12), else
            ``U[eps, T]``.
        truncation_correction: add the Tweedie-decoder correction (Song et al. 2021b, Sec. 4.3) from
            ``num_eps_samples`` draws of ``x_eps`` (their spread enters ``nll_se`` when there are at least two).
        estimator: ``"closed_form"``, ``"paired"`` or ``"monte_carlo"`` (see the module docstring).
        stratified: one time per quantile stratum instead of i.i.d. times.
        plan: a :class:`BoundPlan` (see :func:`fit_bound_plan`): time density over the IS quantile and the
            per-time control-variate coefficient of ``||z||^2``; needs ``importance_sampling`` and
            ``estimator="closed_form"``. Unbiased for any fixed plan; fit it on other images or other draws.
        antithetic: each time gets the pair ``z, -z`` (``num_t`` even: ``num_t / 2`` times, ``num_t`` calls).
        chunk_size: rows per score call (``B * num_t`` rows in all); bounds the memory.
        dtype: compute precision (defaults to ``x.dtype``).
    """
    if estimator not in BOUND_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}")
    if plan is not None and (estimator != "closed_form" or not importance_sampling):
        raise ValueError(
            f"plan= needs estimator='closed_form' and importance_sampling=True, got {estimator!r}, "
            f"importance_sampling={importance_sampling}"
        )
    if num_t < 1:
        raise ValueError(f"num_t must be >= 1 (time samples per example), got {num_t}")
    if antithetic and num_t % 2:
        raise ValueError(f"antithetic=True needs an even num_t, got {num_t}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if truncation_correction and num_eps_samples < 1:
        raise ValueError(f"num_eps_samples must be >= 1 with truncation_correction=True, got {num_eps_samples}")
    eps = sde.check_eps(sde.default_eps if eps is None else float(eps))
    x = x if dtype is None else x.to(dtype)
    B, D, T = x.shape[0], flat_dim(x), sde.T
    sampler: TimeSampler = ImportanceSampledLikelihood(sde, eps) if importance_sampling else UniformTime(sde, eps)
    Z = sde.is_normalizer(eps)

    # one "unit" = one time with its noise (or its antithetic pair): units are the i.i.d. / stratified samples
    pair = 2 if antithetic else 1
    n_units = num_t // pair
    # times [B, n_units] in float64 (the IS quantile near eps needs it), then the weight W = (g^2/sigma^2) / p(t)
    dev = x.device if generator is None else generator.device
    u = torch.rand(B, n_units, generator=generator, dtype=torch.float64, device=dev).to(x.device)
    if stratified:
        u = (torch.arange(n_units, dtype=torch.float64, device=x.device) + u) / n_units
    if plan is not None:  # t = F^-1(u), u ~ q on [0, 1]: p(t) = g^2/(sigma^2 Z) q(u), so W = Z / q(u)
        u = plan.icdf(u)
        W64, cv64 = Z / plan.pdf(u), plan.coef(u)
        base64 = plan.baseline_integral - plan.baseline(u) / plan.pdf(u)  # mean-zero baseline, per unit
    t64 = sampler.icdf(u)
    if plan is None:
        W64 = torch.full_like(t64, Z) if importance_sampling else sde.is_ratio(t64) / sampler.density(t64)
        cv64 = None

    rows = torch.arange(B, device=x.device).repeat_interleave(n_units)
    t_flat, W_flat = t64.reshape(-1).to(x.dtype), W64.reshape(-1).to(x.dtype)
    cv_flat = None if cv64 is None else cv64.reshape(-1).to(x.dtype)
    base_flat = None if plan is None or plan.mean is None else base64.reshape(-1).to(x.dtype)
    parts: dict[str, list[Tensor]] = {"dsm": [], "cv": [], "noise": [], "div_f": [], "prior": []}
    step = max(1, chunk_size // pair)

    def unit(v: Tensor) -> Tensor:  # per call -> per unit (the mean of an antithetic pair)
        return v.reshape(pair, -1).mean(0)

    for start in range(0, B * n_units, step):
        sl = slice(start, start + step)
        x0, t, W = x[rows[sl]], t_flat[sl], W_flat[sl]
        z, n = randn_like(x0, generator), x0.shape[0]
        if antithetic:  # the calls (t, z) and (t, -z), paired back up by `unit`
            x0, t, W, z = torch.cat([x0, x0]), torch.cat([t, t]), torch.cat([W, W]), torch.cat([z, -z])
        sigma = append_dims(sde.sigma(t), x0.ndim)
        x_t = sde.perturb(x0, t, z)
        w = sigma * call_score(score_fn, x_t, t).to(x.dtype) + z
        parts["dsm"].append(unit(0.5 * W * sum_except_batch(w**2)))  # Theorem 3: g^2 ||s - grad log p_0t||^2 / 2
        if cv_flat is not None:  # control variate c(t) (||z||^2 - D), mean zero at every t
            cv = -cv_flat[sl] * 0.5 * W[:n] * (sum_except_batch(z[:n] ** 2) - D)
            parts["cv"].append(cv if base_flat is None else cv + base_flat[sl])
        if estimator != "closed_form":  # the constant term's integrand on the same (t, z)
            parts["noise"].append(unit(-0.5 * W * sum_except_batch(z**2)))  # -g^2 ||grad log p_0t||^2 / 2 / p(t)
            parts["div_f"].append(unit(-D * sde.drift_coef(t) * W / sde.is_ratio(t)))  # -div f / p(t) = -a D / p
        if estimator == "monte_carlo":  # -log pi(x_T), x_T ~ p_0T(.|x)
            x_T = sde.perturb(x0, torch.full_like(t, T), randn_like(x0, generator))
            parts["prior"].append(unit(-sde.prior_logp(x_T)))
    k = {name: torch.cat(p).reshape(B, n_units) for name, p in parts.items() if p}
    zeros = torch.zeros(B, dtype=x.dtype, device=x.device)

    # closed forms (linear drift): E[-log pi(x_T)], -D Z / 2 and -int div f = -D (log alpha_T - log alpha_eps)
    ends = torch.tensor([eps, T], dtype=torch.float64, device=x.device)
    log_alpha = sde.log_alpha(ends)
    int_div_f = D * float(log_alpha[1] - log_alpha[0])
    prior = k["prior"].mean(1) if "prior" in k else sde.prior_cross_entropy(x)
    noise = k["noise"].mean(1) if "noise" in k else zeros - 0.5 * D * Z
    div_f = k["div_f"].mean(1) if "div_f" in k else zeros - int_div_f
    dsm_term = k["dsm"].mean(1) + (k["cv"].mean(1) if "cv" in k else 0.0)
    const = noise + div_f

    v = sum(k.values()).detach()  # one Monte-Carlo sample (unit) of the whole estimator, per example
    if n_units < 2:
        var_mean = torch.full_like(zeros, float("nan"))
    elif stratified:  # E(v_2j - v_2j+1)^2 >= var_2j + var_2j+1: adjacent strata give n_units * Var(mean)
        m = n_units // 2
        var_mean = (v[:, 0 : 2 * m : 2] - v[:, 1 : 2 * m : 2]).pow(2).sum(1) / (2 * m) / n_units
    else:
        var_mean = v.var(dim=1) / n_units
    sample_var = var_mean * num_t  # per network call: comparable across estimators, pairs and plans
    se2 = var_mean

    correction = zeros
    if truncation_correction:
        checked = shape_checked(score_fn)
        c = torch.stack(
            [_truncation_correction(checked, sde, x, eps, generator=generator)[0] for _ in range(num_eps_samples)], 1
        )
        correction = c.mean(1)
        se2 = se2 + (c.detach().var(dim=1) / num_eps_samples if num_eps_samples > 1 else 0.0)

    return BoundResult(
        nll=prior + dsm_term + const + correction,
        nll_se=se2.sqrt(),
        prior_term=prior,
        dsm_term=dsm_term,
        const_term=const,
        correction=correction,
        sample_var=sample_var,
        num_t=num_t,
        eps=eps,
        importance_sampling=importance_sampling,
        estimator=estimator,
        stratified=stratified,
        truncation_correction=truncation_correction,
        antithetic=antithetic,
        plan=plan,
    )
