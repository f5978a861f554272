"""Probability-flow ODE sampler and latent codes against exact Gaussian(-mixture) flows."""

import pytest
import torch

from scoreflow.oracles import GaussianMixture, gaussian
from scoreflow.sampling import decode, encode, interpolate, ode_sample, round_trip
from scoreflow.sde import VESDE, VPSDE, SubVPSDE

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}
N_SAMPLES = 2000
MIX = GaussianMixture(
    torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), torch.tensor([[0.3, 0.5], [0.4, 0.2]])
)



def assert_moments(x, mean, cov, mean_se=4.0, cov_tol=0.12):
    """Sample mean within ``mean_se`` standard errors; covariance entries within ``cov_tol`` (correlation units)."""
    se = (cov.diag() / x.shape[0]).sqrt()
    z = ((x.mean(0) - mean) / se).abs().max()
    rel = ((torch.cov(x.T) - cov) / (cov.diag()[:, None] * cov.diag()[None, :]).sqrt()).abs().max()
    assert z < mean_se and rel < cov_tol, f"mean error {z:.2f} SE, covariance error {rel:.3f}"


@pytest.mark.parametrize("sde_name", list(SDES))
def test_dopri5_reproduces_mixture_moments(sde_name):
    sde = SDES[sde_name]
    res = ode_sample(
        MIX.score_fn(sde), sde, (N_SAMPLES, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert_moments(res.samples, *MIX.mean_cov())
    assert 20 < res.nfe < 500


@pytest.mark.parametrize(("method", "steps", "order"), [("euler", 100, 1), ("heun", 30, 2), ("rk4", 15, 4)])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_fixed_step_methods_converge_at_their_order(sde_name, method, steps, order):
    """From one x_T, the error against a tight dopri5 solution falls by ~2^order when the steps double."""
    sde = SDES[sde_name]
    xT = sde.prior_std * torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = ode_sample(MIX.score_fn(sde), sde, xT, rtol=1e-10, atol=1e-10).samples
    errs = []
    for n in (steps, 2 * steps):
        res = ode_sample(MIX.score_fn(sde), sde, xT, method=method, steps=n)
        assert res.nfe == {"euler": 1, "heun": 2, "rk4": 4}[method] * n + 1
        errs.append((res.samples - ref).abs().max())
    assert errs[0] / errs[1] > 0.75 * 2**order, errs


@pytest.mark.parametrize("sde_name", list(SDES))
def test_rk4_reproduces_mixture_moments(sde_name):
    sde = SDES[sde_name]
    res = ode_sample(
        MIX.score_fn(sde),
        sde,
        (N_SAMPLES, 2),
        method="rk4",
        steps=50,
        generator=torch.Generator().manual_seed(2),
        dtype=torch.float64,
    )
    assert_moments(res.samples, *MIX.mean_cov())


@pytest.mark.parametrize("sde_name", list(SDES))
def test_encode_matches_closed_form_gaussian_flow(sde_name):
    """For N(mu, v) data the flow is affine: x_T = a_T mu + sqrt((a_T^2 v + s_T^2) / (a_e^2 v + s_e^2)) (x - a_e mu)."""
    sde, eps = SDES[sde_name], SDES[sde_name].default_sample_eps
    mu, v = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.3, 1.0, 0.05], dtype=torch.float64)
    target = GaussianMixture(torch.ones(1), mu[None], v[None])
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z = encode(target.score_fn(sde), sde, x, rtol=1e-9, atol=1e-9)
    (aT, sT), (ae, se) = (sde.marginal(torch.tensor([t], dtype=torch.float64)) for t in (sde.T, eps))
    ref = aT * mu + ((aT**2 * v + sT**2) / (ae**2 * v + se**2)).sqrt() * (x - ae * mu)
    torch.testing.assert_close(z, ref, rtol=1e-6, atol=1e-6 * sde.prior_std)
    torch.testing.assert_close(decode(target.score_fn(sde), sde, z, rtol=1e-9, atol=1e-9), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_round_trip_error_is_tiny(sde_name):
    sde = SDES[sde_name]
    x = MIX.sample(16, generator=torch.Generator().manual_seed(4))
    rt = round_trip(MIX.score_fn(sde), sde, x, rtol=1e-7, atol=1e-7)
    assert rt.z.shape == x.shape and rt.x_rec.shape == x.shape
    assert rt.max_abs_error.max() < 1e-4 and rt.rel_error.max() < 1e-4
    assert rt.nfe_encode > 0 and rt.nfe_decode > 0


def test_images_and_per_sample_seeds():
    sde = SDES["vp"]
    target = gaussian(torch.zeros(12), 0.5, event_shape=(3, 2, 2))
    res = ode_sample(target.score_fn(sde), sde, (4, 3, 2, 2), generator=torch.Generator().manual_seed(0))
    assert res.samples.shape == (4, 3, 2, 2) and res.samples.dtype == torch.float32
    kw = dict(method="heun", steps=20, dtype=torch.float64)
    both = ode_sample(target.score_fn(sde), sde, (2, 3, 2, 2), seeds=[5, 6], **kw).samples
    one = ode_sample(target.score_fn(sde), sde, (1, 3, 2, 2), seeds=[6], **kw).samples
    torch.testing.assert_close(both[1:], one, rtol=0, atol=1e-12)


def test_interpolate_is_spherical():
    g = torch.Generator().manual_seed(0)
    z0, z1 = (
        torch.randn(3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 4, generator=g, dtype=torch.float64),
    )
    z1 = z1 * z0.norm() / z1.norm()
    path = interpolate(z0, z1, 7)
    assert path.shape == (7, 3, 4, 4)
    torch.testing.assert_close(path[0], z0)
    torch.testing.assert_close(path[-1], z1)
    torch.testing.assert_close(path.reshape(7, -1).norm(dim=1), z0.norm().expand(7))  # equal norms are kept
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(interpolate(e0, e1, 3)[1], torch.tensor([1.0, 1.0]) / 2**0.5)
    torch.testing.assert_close(interpolate(e0, e0, 3), e0.expand(3, 2))


def test_an_adaptive_method_refuses_steps_it_would_ignore():
    """``steps`` sets a fixed-step method's grid; dopri5 chose its own steps and ignored it (audit): now refused,
    in sampling and in encoding alike, and ``steps=None`` still runs."""
    sde = VPSDE()
    with pytest.raises(ValueError, match=r"steps=100 is for a fixed-step method.*'dopri5' is adaptive"):
        ode_sample(MIX.score_fn(sde), sde, (4, 2), method="dopri5", steps=100)
    with pytest.raises(ValueError, match="'bosh3' is adaptive"):
        encode(MIX.score_fn(sde), sde, torch.zeros(4, 2), method="bosh3", steps=10)
    assert ode_sample(MIX.score_fn(sde), sde, (4, 2), method="dopri5", rtol=1e-3, atol=1e-3).nfe > 1
