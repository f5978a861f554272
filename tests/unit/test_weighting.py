"""Time samplers: exact CDF inversion, Z and quantiles of docs/reference.md §3, KS test, unbiasedness."""

import math

import pytest
import torch
from scipy import integrate, stats

from scoreflow.sde import VESDE, VPSDE, SubVPSDE
from scoreflow.weighting import ImportanceSampledLikelihood, LikelihoodWeighting, OriginalWeighting, get_time_sampler


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
