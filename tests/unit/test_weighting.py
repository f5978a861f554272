"""Time samplers: exact CDF inversion, Z and quantiles of docs/reference.md §3, KS test, unbiasedness."""

import math

import pytest
import torch
from scipy import integrate, stats

from scoreflow.sde import VESDE, VPSDE, SubVPSDE
from scoreflow.weighting import (
    ImportanceSampledLikelihood,
    LikelihoodWeighting,
    OriginalWeighting,
    TruncatedImportanceSampledLikelihood,
    get_time_sampler,
)


def test_vp_normalizer_and_quantiles():
    s = ImportanceSampledLikelihood(VPSDE(), eps=1e-5)
    assert s.Z == pytest.approx(23.864, abs=2e-3)
    q = s.icdf(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    torch.testing.assert_close(q, torch.tensor([1.1e-4, 0.114, 0.873], dtype=torch.float64), rtol=0.03, atol=0)


def test_subvp_normalizer_and_quantiles():
    s = ImportanceSampledLikelihood(SubVPSDE(), eps=1e-2)
    assert s.Z == pytest.approx(22.484, abs=2e-3)
    q = s.icdf(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    torch.testing.assert_close(q, torch.tensor([0.020, 0.229, 0.881], dtype=torch.float64), rtol=0.03, atol=0)


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (VESDE(), 1e-5)], ids=["vp", "subvp", "ve"])
def test_normalizer_matches_quadrature_and_cdf_inverts(sde, eps):
    s = ImportanceSampledLikelihood(sde, eps=eps)

    def ratio(t):
        return float(sde.is_ratio(torch.tensor([t], dtype=torch.float64)))

    # split the range in log-space: the integrand is ~1/t near eps for VP
    pts = [eps, 1e-4, 1e-3, 1e-2, 0.1, 1.0]
    Z = sum(integrate.quad(ratio, a, b, limit=200)[0] for a, b in zip(pts[:-1], pts[1:]) if b > a and a >= eps)
    assert s.Z == pytest.approx(Z, rel=1e-8)
    u = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    torch.testing.assert_close(s.cdf(s.icdf(u)), u, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (VESDE(), 1e-5)], ids=["vp", "subvp", "ve"])
def test_is_samples_follow_density_ks(sde, eps):
    s = ImportanceSampledLikelihood(sde, eps=eps)
    t, w = s.sample(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert bool((t >= eps).all() and (t <= 1).all())
    res = stats.kstest(t.numpy(), lambda x: s.cdf(torch.as_tensor(x, dtype=torch.float64)).numpy())
    assert res.pvalue > 1e-3
    # and NOT uniform (except VE, where the IS density is uniform)
    res_u = stats.kstest(t.numpy(), stats.uniform(loc=eps, scale=1 - eps).cdf)
    assert (res_u.pvalue > 1e-3) == isinstance(sde, VESDE)


def test_is_estimate_of_time_integral_matches_uniform():
    """E_{t~IS}[Z h(t) sigma^2/g^2] = int h = (T-eps) E_{t~U}[h] for a smooth test function h."""
    sde = VPSDE()
    eps = 1e-3
    gen = torch.Generator().manual_seed(3)

    def h(t):
        return sde.g2(t) * (1 + torch.cos(3 * t))  # a g^2-weighted integrand, like the bound's

    exact = integrate.quad(lambda t: float(h(torch.tensor([t], dtype=torch.float64))), eps, 1.0)[0]
    is_s = ImportanceSampledLikelihood(sde, eps=eps)
    t, _ = is_s.sample(200000, generator=gen, dtype=torch.float64)
    est_is = (h(t) / is_s.density(t)).mean()
    u_s = LikelihoodWeighting(sde, eps=eps)
    t, _ = u_s.sample(200000, generator=gen, dtype=torch.float64)
    est_u = (h(t) / u_s.density(t)).mean()
    assert float(est_is) == pytest.approx(exact, rel=5e-3)
    assert float(est_u) == pytest.approx(exact, rel=1e-2)


def test_weights_per_scheme():
    sde = VPSDE()
    t = torch.tensor([0.1, 0.5], dtype=torch.float64)
    assert torch.equal(OriginalWeighting(sde).weight(t), torch.ones(2, dtype=torch.float64))
    # g^2 / sigma^2 in closed form (docs/reference.md §3), not through the SDE's own g2 / sigma
    b, B = 0.1 + t * 19.9, 0.1 * t + 0.5 * 19.9 * t**2
    torch.testing.assert_close(LikelihoodWeighting(sde).weight(t), b / -torch.expm1(-B))
    torch.testing.assert_close(LikelihoodWeighting(SubVPSDE()).weight(t), b * (1 + torch.exp(-B)) / -torch.expm1(-B))
    torch.testing.assert_close(LikelihoodWeighting(VESDE()).weight(t), torch.full_like(t, 2 * math.log(50 / 0.01)))
    s = ImportanceSampledLikelihood(sde, normalize=True)
    torch.testing.assert_close(s.weight(t), torch.full_like(t, s.Z / (1 - s.eps)))


def test_factory_errors():
    with pytest.raises(ValueError, match="unknown weighting"):
        get_time_sampler("nope", VPSDE())
    with pytest.raises(ValueError, match="eps"):
        get_time_sampler("lw_is", VPSDE(), eps=0.0)


# ----------------------------------------------------------------- Huang et al. 2021's truncated IS (App. I)
def _r(sde, t):
    return float(sde.is_ratio(torch.tensor([t], dtype=torch.float64)))


@pytest.mark.parametrize("sde,s", [(VPSDE(), 1e-5), (VPSDE(), 1e-3), (SubVPSDE(), 1e-2), (VESDE(), 1e-3)],
                         ids=["vp-1e-5", "vp-1e-3", "subvp", "ve"])
def test_truncated_is_normalizer_cdf_and_ks(sde, s):
    """Z = int_0^T r(max(t, s)) dt by quadrature; cdf(icdf(u)) = u on both pieces; samples pass a KS test, and the
    fraction below s is s r(s) / Z (a binomial check, independent of the CDF's code)."""
    x = TruncatedImportanceSampledLikelihood(sde, eps=1e-5 if not isinstance(sde, SubVPSDE) else 1e-2, truncation=s)
    pts = sorted({s, 1e-4, 1e-3, 1e-2, 0.1, 1.0})
    Z = s * _r(sde, s) + sum(integrate.quad(lambda t: _r(sde, t), a, b, limit=200)[0]
                             for a, b in zip(pts[:-1], pts[1:]) if a >= s)
    assert x.Z == pytest.approx(Z, rel=1e-8)
    u = torch.cat([torch.linspace(0.0005, 0.999, 200, dtype=torch.float64), torch.tensor([x.head / x.Z])])
    torch.testing.assert_close(x.cdf(x.icdf(u)), u, rtol=0, atol=1e-10)
    n = 40000
    t, w = x.sample(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert bool((t > 0).all() and (t <= 1).all()) and bool((w == 1).all())
    assert stats.kstest(t.numpy(), lambda v: x.cdf(torch.as_tensor(v, dtype=torch.float64)).numpy()).pvalue > 1e-3
    p = s * _r(sde, s) / Z
    assert abs(float((t < s).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("s", [1e-3, 1e-5])
def test_truncated_is_icdf_matches_huang_eq60_for_vp(s):
    """The inverse CDF against Huang et al. 2021, App. I, Eq. 57-60 written out for the VP SDE."""
    bmin, bmax = 0.1, 20.0
    x = TruncatedImportanceSampledLikelihood(VPSDE(), truncation=s)
    Bs = 0.5 * s**2 * (bmax - bmin) + s * bmin
    r_s = (bmin + s * (bmax - bmin)) / -math.expm1(-Bs)  # g^2(s) / sigma_s^2
    phi_s = math.log(math.expm1(Bs))  # Eq. 57
    Z = s * r_s + math.log(math.expm1(0.5 * (bmax - bmin) + bmin)) - phi_s  # Phi~(T), Eq. 59
    assert x.Z == pytest.approx(Z, rel=1e-10)
    for u in (0.001, 0.01, 0.03, 0.05, 0.2, 0.5, 0.9, 0.999):
        if u < s * r_s / Z:
            t = u * Z / r_s
        else:
            varphi = math.log1p(math.exp(Z * u + phi_s - r_s * s))  # Eq. 58
            t = (-bmin + math.sqrt(bmin**2 + 2 * (bmax - bmin) * varphi)) / (bmax - bmin)  # Eq. 60
        assert float(x.icdf(torch.tensor([u], dtype=torch.float64))) == pytest.approx(t, rel=1e-9)


def test_truncated_is_objective_is_the_truncated_likelihood_weighting():
    """E_q[w * sigma_t^2 l(t)] * objective_scale = (1/T) int_0^T lambda(t) l(t) dt with lambda = g^2 on [s, T] and
    sigma_t^2 g^2(s)/sigma_s^2 below s (quadrature), normalized or not; the same as lw_is on [s, T]."""
    sde, s = VPSDE(), 1e-2
    gen = torch.Generator().manual_seed(11)

    def ell(t):  # a smooth stand-in for the per-time DSM loss l(t), ~ 1/sigma^2 like the real one near 0
        return (1 + torch.cos(3 * t)) / (sde.sigma(t) ** 2 + 0.05)

    def lam(t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.where(t < s, sde.sigma(t) ** 2 * _r(sde, s), sde.g2(t))

    exact = sum(integrate.quad(lambda v: float(lam(torch.tensor([v])) * ell(torch.tensor([v], dtype=torch.float64))),
                               a, b, limit=200)[0] for a, b in ((0, s), (s, 1.0)))
    for normalize in (False, True):
        x = TruncatedImportanceSampledLikelihood(sde, truncation=s, normalize=normalize)
        t, w = x.sample(400000, generator=gen, dtype=torch.float64)
        est = (w * sde.sigma(t) ** 2 * ell(t)).mean() * x.objective_scale
        assert float(est) == pytest.approx(exact, rel=5e-3)
    # on [s, T] the implied weight is g^2: q(t) sigma_t^2 Z = g^2
    t = torch.tensor([s, 0.1, 0.7], dtype=torch.float64)
    torch.testing.assert_close(x.density(t) * x.Z * sde.sigma(t) ** 2, sde.g2(t))


def test_truncated_is_defaults_errors_and_smallest_times():
    x = get_time_sampler("lw_is_trunc", SubVPSDE())
    assert x.truncation == x.eps == 1e-2 and x.t_min == 0.0
    assert ImportanceSampledLikelihood(SubVPSDE()).t_min == 1e-2
    with pytest.raises(ValueError, match="truncation"):
        TruncatedImportanceSampledLikelihood(VPSDE(), truncation=0.0)
    # the smallest float64 draw stays positive and gives finite sigma_t, log sigma_t in float32
    t = TruncatedImportanceSampledLikelihood(VPSDE()).icdf(torch.tensor([0.0, 1e-16], dtype=torch.float64)).float()
    for sde in (VPSDE(), SubVPSDE()):
        sig = sde.sigma(t)
        assert bool((t > 0).all() and (sig > 0).all() and torch.isfinite(sig.log()).all())
