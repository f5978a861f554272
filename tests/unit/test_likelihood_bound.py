"""Theorem 3's bound ``L^DSM`` against quadrature, Theorem 2's tightness, and closed-form oracles."""

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate

from scoreflow.likelihood import likelihood_bound, truncation_correction
from scoreflow.likelihood.bound import BoundPlan, fit_bound_plan
from scoreflow.likelihood.units import num_samples_for_mc_excess, split_standard_error
from scoreflow.oracles import GaussianMixture, gaussian
from scoreflow.sde import VESDE, VPSDE, SubVPSDE
from scoreflow.utils import append_dims

MIX = GaussianMixture(
    torch.tensor([0.4, 0.6]), torch.tensor([[1.0, -0.5], [-1.0, 0.5]]), torch.tensor([[0.1, 0.2], [0.3, 0.05]])
)
BIG = 2**16  # rows per score call: the oracle is cheap


def full(v: float, n: int) -> torch.Tensor:
    return torch.full((n,), v, dtype=torch.float64)


def quadrature_bound(mix: GaussianMixture, sde, x: torch.Tensor, eps: float, n_u: int = 100, n_z: int = 16):
    """``L^DSM_[eps,T](x)`` of Theorem 3 as written, by deterministic quadrature (D = 2).

    Gauss-Hermite over ``z`` for every Gaussian expectation, Gauss-Legendre over ``u = F(t)`` (the IS variable,
    where ``g^2/sigma^2 dt = du``) for the two ``g^2``-weighted integrals and over ``t`` for ``int div f``.
    At the default sizes it agrees with (400, 32) nodes to 2e-4 nats.
    """
    zn, zw = np.polynomial.hermite_e.hermegauss(n_z)
    zw = zw / zw.sum()
    Z1, Z2 = np.meshgrid(zn, zn, indexing="ij")
    z = torch.tensor(np.stack([Z1.ravel(), Z2.ravel()], 1))  # [n_z^2, 2]
    wz = torch.tensor(np.outer(zw, zw).ravel())
    F = sde.is_antiderivative(torch.tensor([eps, sde.T], dtype=torch.float64))
    un, uw = np.polynomial.legendre.leggauss(n_u)
    u = torch.tensor(F[0].item() + (un + 1) / 2 * (F[1] - F[0]).item())
    wu = torch.tensor(uw / 2 * (F[1] - F[0]).item())
    t_u = sde.is_antiderivative_inv(u)
    tn = torch.tensor(eps + (un + 1) / 2 * (sde.T - eps))
    wt = torch.tensor(uw / 2 * (sde.T - eps))
    out = []
    for xi in x.double():
        # prior: -E[log pi(x_T)], x_T = alpha_T x + sigma_T z
        a_T, s_T = sde.marginal(full(sde.T, len(z)))
        prior = -(wz * sde.prior_logp(a_T[:, None] * xi + s_T[:, None] * z)).sum()
        # 1/2 int g^2 E||s - grad log p_0t||^2 dt - 1/2 int g^2 E||grad log p_0t||^2 dt, on the (u, z) grid
        tt = t_u.repeat_interleave(len(z))
        zz = z.repeat(n_u, 1)
        xt = sde.perturb(xi.expand(len(tt), 2), tt, zz)
        k = sde.kernel_score(xt, xi.expand(len(tt), 2), tt)
        s = mix.score(xt, sde, tt)
        sig2 = append_dims(sde.sigma(tt) ** 2, 2)
        dsm = ((sig2 * (s - k) ** 2).sum(1).reshape(n_u, -1) * wz).sum(1)
        noise = ((sig2 * k**2).sum(1).reshape(n_u, -1) * wz).sum(1)
        div_f = (wt * sde.div_drift(tn, 2)).sum()
        out.append(prior + 0.5 * (wu * dsm).sum() - 0.5 * (wu * noise).sum() - div_f)
    return torch.stack(out)


POINTS = torch.tensor([[1.2, -0.4], [-0.8, 0.7], [0.1, 0.0]], dtype=torch.float64)


@pytest.fixture(scope="module")
def vp_quadrature():
    return quadrature_bound(MIX, VPSDE(), POINTS, 1e-5)


@pytest.mark.parametrize(
    "estimator,is_",
    [("closed_form", True), ("paired", True), ("monte_carlo", True), ("paired", False)],
    ids=["closed-is", "paired-is", "mc-is", "paired-uniform"],
)
def test_per_point_estimate_matches_quadrature(estimator, is_, vp_quadrature, gen):
    """Every estimator is unbiased for ``L(x)`` of each data point (catches examples mixed up across rows)."""
    sde, eps, x, ref = VPSDE(), 1e-5, POINTS, vp_quadrature
    res = likelihood_bound(
        MIX.score_fn(sde), sde, x, eps=eps, num_t=20000, importance_sampling=is_, estimator=estimator,
        generator=gen, chunk_size=BIG,
    )  # fmt: skip
    assert bool(((res.nll - ref).abs() < 4 * res.nll_se + 1e-3).all()), (res.nll, ref, res.nll_se)
    assert float(res.nll_se.max()) < 0.2
    torch.testing.assert_close(res.nll, res.prior_term + res.dsm_term + res.const_term + res.correction)


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (VESDE(), 1e-5)], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("is_", [True, False], ids=["is", "uniform"])
def test_exact_score_is_tight_in_expectation(sde, eps, is_, gen):
    """``E_{x~p_0}[L(x)] = H(p_eps) + KL(p_T || pi)`` when ``s = grad log p_t`` (Theorem 2's tightness).

    ``H(p_eps)`` and ``KL(p_T || pi)`` are estimated on the same ``x`` (``y = x_eps``, ``x_T`` drawn from
    ``p_0t(.|x)``) with the oracle. Uniform time uses the paired estimator: with the closed-form constant the
    ``1/t`` weight makes the uniform-time variance 1e4-1e5 per sample for VP at eps=1e-5.
    """
    n = 1500
    x = MIX.sample(n, generator=gen)
    y = sde.perturb(x, full(eps, n), torch.randn(x.shape, generator=gen, dtype=torch.float64))
    x_T = sde.perturb(x, full(sde.T, n), torch.randn(x.shape, generator=gen, dtype=torch.float64))
    res = likelihood_bound(
        MIX.score_fn(sde), sde, x, eps=eps, num_t=100, importance_sampling=is_,
        estimator="closed_form" if is_ else "paired", generator=gen, chunk_size=BIG,
    )  # fmt: skip
    kl = MIX.log_prob(x_T, sde, full(sde.T, n)) - sde.prior_logp(x_T)
    d = res.nll + MIX.log_prob(y, sde, full(eps, n)) - kl
    se = d.std() / math.sqrt(n)
    assert float(se) < 0.06
    assert abs(float(d.mean())) < 4 * float(se)


def test_is_and_uniform_agree_and_is_has_lower_variance(gen):
    sde, eps = VPSDE(), 1e-2
    x = MIX.sample(16, generator=gen)
    kw = dict(eps=eps, num_t=5000, estimator="closed_form", chunk_size=BIG)
    a = likelihood_bound(MIX.score_fn(sde), sde, x, importance_sampling=True, generator=gen, **kw)
    b = likelihood_bound(MIX.score_fn(sde), sde, x, importance_sampling=False, generator=gen, **kw)
    se = (a.nll_se**2 + b.nll_se**2).sqrt()
    assert bool(((a.nll - b.nll).abs() < 4 * se).all())
    assert abs(float((a.nll - b.nll).mean())) < 4 * float(se.pow(2).mean().sqrt()) / 4
    ratio = float(b.sample_var.mean() / a.sample_var.mean())
    assert ratio > 3.0, ratio  # ~8x at eps=1e-2; ~300x at eps=1e-5 (see bench/likelihood.py)


def test_wrong_score_raises_bound_by_closed_form(gen):
    """A score off by a constant ``delta`` raises ``E_x[L]`` by exactly ``|delta|^2/2 int g^2 dt``."""
    sde, eps, n = VPSDE(), 1e-3, 800
    delta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    x = MIX.sample(n, generator=gen)
    exact, wrong = MIX.score_fn(sde), lambda x, t: MIX.score(x, sde, t) + delta
    kw = dict(eps=eps, num_t=50, chunk_size=BIG)
    a = likelihood_bound(exact, sde, x, generator=torch.Generator().manual_seed(5), **kw)
    b = likelihood_bound(wrong, sde, x, generator=torch.Generator().manual_seed(5), **kw)  # same (t, z)
    d = b.nll - a.nll
    int_g2 = integrate.quad(lambda t: float(sde.g2(torch.tensor([t], dtype=torch.float64))), eps, sde.T)[0]
    expected = 0.5 * float(delta.pow(2).sum()) * int_g2
    assert float(d.mean()) > 0.5 * expected > 0
    assert abs(float(d.mean()) - expected) < 4 * float(d.std()) / math.sqrt(n)


def test_truncation_correction_closed_form_for_gaussian(gen):
    """``E[-log q(x|x_eps)] - H = -D sigma^2 / (2 (alpha^2 v + sigma^2)) - D log alpha`` for Gaussian data."""
    sde, eps, v, n = SubVPSDE(), 1e-2, 0.05, 40000
    data = gaussian(torch.tensor([0.5, -1.0]), v)
    x = data.sample(n, generator=gen)
    c, x_eps = truncation_correction(data.score_fn(sde), sde, x, eps, generator=gen)
    a, s = sde.alpha(full(eps, 1)).item(), sde.sigma(full(eps, 1)).item()
    D = 2
    expected = -0.5 * D * s**2 / (a**2 * v + s**2) - D * math.log(a)
    assert abs(float(c.mean()) - expected) < 4 * float(c.std()) / math.sqrt(n)
    assert x_eps.shape == x.shape


def test_corrected_bound_tight_for_gaussian_and_an_upper_bound_for_a_mixture(gen):
    """Gaussian data (Tweedie decoder exact up to O(r^2)): ``E[L_corr] + E[log p_0] = D/2 (ln(1+r) - r/(1+r)) + KL``;
    mixture data: ``E[L_corr] >= E[-log p_0]`` within Monte-Carlo error."""
    sde, eps, n, r = VPSDE(), 1e-2, 3000, 0.5
    a, s = sde.alpha(full(eps, 1)).item(), sde.sigma(full(eps, 1)).item()
    v = s**2 / (a**2 * r)
    data = gaussian(torch.tensor([0.3, -0.2]), v)
    x = data.sample(n, generator=gen)
    kw = dict(eps=eps, num_t=100, chunk_size=BIG, generator=gen)
    res = likelihood_bound(data.score_fn(sde), sde, x, truncation_correction=True, **kw)
    gap = res.nll + data.log_prob(x)
    a_T, s_T = sde.marginal(full(sde.T, 1))
    m_T, v_T = a_T * data.means[0], a_T**2 * v + s_T**2
    kl = float(0.5 * (v_T + m_T**2 - 1 - v_T.log()).sum())  # KL(p_T || N(0, I)) per dimension summed, ~1e-5
    expected = 1.0 * (math.log1p(r) - r / (1 + r)) + kl  # D/2 = 1
    se = float(gap.std()) / math.sqrt(n)
    assert se < 0.03 and abs(float(gap.mean()) - expected) < 4 * se
    assert float(gap.mean()) < math.log1p(r) + 2 * math.log(a) - 0.2  # the uncorrected gap is ~0.40

    x = MIX.sample(n, generator=gen)
    res = likelihood_bound(MIX.score_fn(sde), sde, x, truncation_correction=True, **kw)
    gap = res.nll + MIX.log_prob(x)
    assert float(gap.mean()) > -4 * float(gap.std()) / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_image_shapes_dtypes_and_gradients(dtype, gen):
    """``[B, C, H, W]`` in both precisions agree; the bound is differentiable in ``x`` (variational dequantization)."""
    sde = VPSDE()
    mix = GaussianMixture(torch.ones(1), torch.zeros(1, 4), torch.full((1, 4), 0.2), event_shape=(1, 2, 2))
    x = mix.sample(3, generator=gen).to(dtype).requires_grad_(True)
    res = likelihood_bound(mix.score_fn(sde), sde, x, num_t=4000, generator=gen, chunk_size=1000)
    assert res.nll.shape == (3,) and res.nll.dtype == dtype
    ref = likelihood_bound(mix.score_fn(sde), sde, x.detach().double(), num_t=4000, generator=gen, chunk_size=BIG)
    se = (res.nll_se.double() ** 2 + ref.nll_se**2).sqrt()
    assert bool(((res.nll.double() - ref.nll).abs() < 4 * se).all())
    res.nll.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


# ---------------------------------------------------------------- plans, antithetic pairs, the se split
WEIRD = BoundPlan(torch.tensor([1.0, 1.5, -0.5, 0.3, 0.0, 2.0]), torch.tensor([0.3, 2.5, 1.0, 0.2, 1.5, 0.8]))
WEIRD_H = BoundPlan(WEIRD.cv, WEIRD.density, torch.tensor([6.0, -3.0, 0.0, 10.0, 2.0, 1.0]))  # a baseline h(u) too


@pytest.mark.parametrize(
    "plan,antithetic,stratified",
    [
        (WEIRD, False, False),
        (WEIRD_H, True, True),
        (WEIRD_H, False, True),
        (None, True, False),
        (BoundPlan.uniform(4, cv=0.6), False, True),
    ],
    ids=["weird-plan-iid", "weird-plan-baseline-anti-strat", "weird-plan-baseline-strat", "anti-iid", "const-cv-strat"],
)
def test_plans_and_antithetic_pairs_are_unbiased_per_point(plan, antithetic, stratified, vp_quadrature, gen):
    """Any fixed plan (non-uniform density over the IS quantile, any control-variate coefficients, negative and
    above 1 included, a baseline ``h(u)`` far from the integrand) and antithetic pairs estimate the same ``L(x)``
    as quadrature. A wrong weight ``Z/q(u)``, a control variate without its mean ``D`` or a wrong ``int h`` would
    be off by several tenths of a nat or more here."""
    sde, eps, x = VPSDE(), 1e-5, POINTS
    res = likelihood_bound(
        MIX.score_fn(sde), sde, x, eps=eps, num_t=60000, plan=plan, antithetic=antithetic, stratified=stratified,
        generator=gen, chunk_size=2**18,
    )  # fmt: skip
    assert bool(((res.nll - vp_quadrature).abs() < 4 * res.nll_se + 1e-3).all()), (res.nll, vp_quadrature, res.nll_se)
    assert float(res.nll_se.max()) < 0.17


def test_antithetic_calls_come_in_pairs(gen):
    """Each time is called with ``z`` and ``-z``: the two ``x_t`` average to ``alpha_t x``; odd chunk sizes too."""
    sde, seen = VPSDE(), []
    score = MIX.score_fn(sde)

    def spy(xt, t):
        seen.append((xt.clone(), t.clone()))
        return score(xt, t)

    x = POINTS[:2]
    likelihood_bound(spy, sde, x, num_t=6, antithetic=True, generator=gen, chunk_size=5)  # 2 units per call
    t = torch.cat([b for _, b in seen])
    assert len(t) == 12 and all(len(a) % 2 == 0 for a, _ in seen)
    for a, b in seen:
        n = len(b) // 2
        torch.testing.assert_close(b[:n], b[n:])
        mid = (a[:n] + a[n:]) / 2
        alpha = sde.alpha(b[:n])[:, None]
        assert bool((((mid / alpha - x[0]).abs() < 1e-9).all(1) | ((mid / alpha - x[1]).abs() < 1e-9).all(1)).all())
    with pytest.raises(ValueError, match="even"):
        likelihood_bound(spy, sde, x, num_t=5, antithetic=True)
    with pytest.raises(ValueError, match="closed_form"):
        likelihood_bound(spy, sde, x, num_t=4, plan=WEIRD, estimator="paired")


def test_nll_se_matches_the_spread_of_independent_estimates(gen):
    """``nll_se`` (stratified, antithetic, planned) is an honest, slightly conservative standard error: rows of
    the same point are independent estimates, so their spread is the true Monte-Carlo error."""
    sde, n = VPSDE(), 1000
    x = POINTS[:1].expand(n, 2)
    for kw in (dict(stratified=True), dict(stratified=True, antithetic=True, plan=WEIRD_H), dict(antithetic=True)):
        res = likelihood_bound(MIX.score_fn(sde), sde, x, eps=1e-5, num_t=16, generator=gen, chunk_size=BIG, **kw)
        spread, claimed = float(res.nll.std()), float(res.nll_se.pow(2).mean().sqrt())
        assert 0.85 * spread < claimed < 1.6 * spread, (kw, spread, claimed)
        torch.testing.assert_close(res.sample_var, res.nll_se**2 * 16)


def test_fitted_control_variate_is_r_squared_for_gaussian_data(gen):
    """For Gaussian data (variance ``v`` per dimension) with the exact score, ``w = r z - k (x - mu)`` with
    ``r = alpha^2 v / (alpha^2 v + sigma^2)``, so the least-variance coefficient of ``||z||^2`` is ``r^2``
    (neither the closed form's 0 nor the paired estimator's 1), and the plan beats both estimators."""
    sde, eps, v, M = VPSDE(), 1e-5, 0.01, 8
    data = gaussian(torch.zeros(4), v)
    x = data.sample(400, generator=gen)
    plan = fit_bound_plan(
        data.score_fn(sde), sde, x, eps=eps, num_bins=M, draws=8, neyman=False, generator=gen, chunk_size=BIG
    )
    u = (torch.arange(M, dtype=torch.float64)[:, None] + (torch.arange(200) + 0.5) / 200) / M  # 200 nodes per bin
    from scoreflow.weighting import ImportanceSampledLikelihood

    a, s = sde.marginal(ImportanceSampledLikelihood(sde, eps).icdf(u))
    expected = (a**2 * v / (a**2 * v + s**2)).pow(2).mean(1)
    assert float((plan.cv - expected).abs().max()) < 0.06, (plan.cv, expected)
    assert float(expected.min()) < 0.1 and float(expected.max()) > 0.9  # the test spans both regimes

    y = data.sample(200, generator=gen)
    kw = dict(eps=eps, num_t=32, stratified=True, generator=gen, chunk_size=BIG)
    var = {
        name: float(likelihood_bound(data.score_fn(sde), sde, y, **extra, **kw).sample_var.mean())
        for name, extra in [("closed", {}), ("paired", {"estimator": "paired"}), ("plan", {"plan": plan})]
    }
    assert var["plan"] < 0.8 * min(var["closed"], var["paired"]), var


def test_split_standard_error_recovers_both_parts():
    rng = np.random.default_rng(0)
    n, R = 4000, 4
    true = rng.normal(3.0, 1.0, n)
    values = true[:, None] + rng.normal(0.0, 2.0, (n, R))  # MC variance of the per-image mean: 4 / 4 = 1
    s = split_standard_error(values)
    assert abs(s.var_between - 1.0) < 0.15 and abs(s.mc_var - 1.0) < 0.05
    assert abs(s.se**2 - s.se_between**2 - s.se_mc**2) < 1e-12
    assert abs(s.mc_excess - (math.sqrt(2) - 1)) < 0.05
    t = split_standard_error(values.mean(1), mc_var=np.full(n, 1.0))  # per-image values + their MC variance
    assert abs(t.se - s.se) < 1e-12 and abs(t.mc_var - 1.0) < 1e-12
    with pytest.raises(ValueError):
        split_standard_error(values[:, 0])
    # N samples of variance 5 each: 5/N < 0.21 Var(L) = 0.21  <=>  N > 23.8
    assert num_samples_for_mc_excess(5.0, 1.0, 0.1) == 24
    assert num_samples_for_mc_excess(5.0, 1.0, 0.1, repeats=4) == 6


def test_fitted_plan_with_density_and_baseline_beats_the_closed_form_on_a_mixture(vp_quadrature, gen):
    """The whole fitted plan (c, q, h) on pilot points, evaluated on other points: unbiased against quadrature and
    a lower variance per call than closed_form + stratified (the evaluate.py default's best rival)."""
    sde, eps = VPSDE(), 1e-5
    plan = fit_bound_plan(
        MIX.score_fn(sde),
        sde,
        MIX.sample(300, generator=gen),
        eps=eps,
        num_bins=12,
        draws=8,
        generator=gen,
        chunk_size=BIG,
    )
    assert plan.mean is not None and float(plan.density.max()) > 1.5 * float(plan.density.min())
    kw = dict(eps=eps, num_t=4000, stratified=True, generator=gen, chunk_size=BIG)
    res = likelihood_bound(MIX.score_fn(sde), sde, POINTS, plan=plan, **kw)
    ref = vp_quadrature
    assert bool(((res.nll - ref).abs() < 4 * res.nll_se + 1e-3).all()), (res.nll, ref, res.nll_se)
    y = MIX.sample(200, generator=gen)
    kw["num_t"] = 32
    planned = likelihood_bound(MIX.score_fn(sde), sde, y, plan=plan, **kw).sample_var.mean()
    closed = likelihood_bound(MIX.score_fn(sde), sde, y, **kw).sample_var.mean()
    assert float(planned) < 0.8 * float(closed), (planned, closed)


def test_bound_plan_density_quantiles_and_baseline_are_consistent():
    """``icdf`` inverts the piecewise-constant ``q`` (bin masses ``q_k / M``), ``h`` passes through the bin means at
    the centres and ``baseline_integral`` is its exact integral: the pieces the unbiasedness rests on."""
    plan, M = WEIRD_H, WEIRD_H.num_bins
    s = (torch.arange(200000, dtype=torch.float64) + 0.5) / 200000
    u = plan.icdf(s)
    mass = torch.bincount((u * M).long().clamp(max=M - 1), minlength=M).double() / len(s)
    torch.testing.assert_close(mass, plan.density / M, atol=2e-5, rtol=0)
    torch.testing.assert_close(plan.baseline((torch.arange(M, dtype=torch.float64) + 0.5) / M), plan.mean)
    grid = (torch.arange(600000, dtype=torch.float64) + 0.5) / 600000
    assert abs(float(plan.baseline(grid).mean()) - plan.baseline_integral) < 1e-9
    assert plan.baseline(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist() == [6.0, 1.0]
    again = BoundPlan(**json.loads(json.dumps(plan.as_dict())))
    for name in ("cv", "density", "mean"):
        torch.testing.assert_close(getattr(again, name), getattr(plan, name))
