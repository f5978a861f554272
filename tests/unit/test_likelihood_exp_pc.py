"""``method="exp_pc3"`` (and 2, 4): the exponential-integrator Adams predictor-corrector in
``lambda = log(alpha/sigma)``, against the exact log-density of Gaussian-mixture data under the exact score
(as ``test_likelihood_ode_grid``)."""

import pytest
import torch

from scoreflow.likelihood import ode_log_likelihood
from scoreflow.likelihood.ode import default_grid_rho, log_snr_half, power_grid, time_of_log_snr_half
from scoreflow.oracles import gaussian
from scoreflow.sde import VESDE, VPSDE, SubVPSDE
from tests.unit.test_likelihood_ode_grid import exact_nll, mixture

SDES = [VPSDE(), SubVPSDE(), VESDE()]
IDS = ["vp", "subvp", "ve"]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_the_kernel_variance_equation_the_method_rests_on(sde):
    """``d(r^2)/dt = g^2 / alpha^2`` with ``r = sigma/alpha``: what makes ``dy = eps_hat dr`` the probability-flow ODE
    exactly. A new SDE whose ``sigma`` and ``g2`` disagree fails here, not silently in the solver."""
    t = torch.linspace(1e-3, 0.999, 41, dtype=torch.float64)
    h = 1e-6
    r2 = lambda s: (sde.sigma(s) / sde.alpha(s)) ** 2  # noqa: E731
    lhs = (r2(t + h) - r2(t - h)) / (2 * h)
    torch.testing.assert_close(lhs, sde.g2(t) / sde.alpha(t) ** 2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_log_snr_inverts(sde):
    t = power_grid(1e-5, sde.T, 30, 3.0)
    back = time_of_log_snr_half(sde, log_snr_half(sde, t), 1e-5, sde.T)
    torch.testing.assert_close(back, t, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_converges_to_the_oracle_and_order_pays(sde, gen):
    """The error against the exact NLL falls to < 2e-5 nats/dim at 160 steps, > 16-fold from 40 to 160 steps
    (third order: 64; 30-85 measured), and the fourth-order variant ends below the second-order one."""
    mix = mixture()
    x = mix.sample(8, generator=gen).double()
    errs = {}
    for method in ("exp_pc2", "exp_pc3", "exp_pc4"):
        errs[method] = []
        for n in (40, 80, 160):
            res = ode_log_likelihood(mix.score_fn(sde), sde, x, divergence="exact", method=method, steps=n)
            assert res.nfe == n + 1 and res.nfe_drift_only == 0
            errs[method].append(float((res.nll - exact_nll(mix, sde, x, res.z, res.eps)).abs().max()) / mix.dim)
    e3 = errs["exp_pc3"]
    assert e3[-1] < 2e-5, errs
    assert e3[0] / e3[2] > 16 and e3[1] > e3[2], errs
    assert errs["exp_pc4"][-1] < errs["exp_pc2"][-1], errs


def test_third_order_on_gaussian_data_ve(gen):
    """VE has no stiffness and Gaussian data a smooth eps_hat in lambda: the error falls ~8-fold per halving."""
    sde = VESDE()
    dist = gaussian(torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.5, 0.2, 0.8]))
    x = dist.sample(8, generator=gen).double()
    errs = []
    for n in (20, 40, 80):
        res = ode_log_likelihood(dist.score_fn(sde), sde, x, divergence="exact", method="exp_pc3", steps=n)
        errs.append(float((res.nll - exact_nll(dist, sde, x, res.z, sde.default_eps)).abs().max()))
    r1, r2 = errs[0] / errs[1], errs[1] / errs[2]
    assert 5 < r1 < 13 and 5 < r2 < 13, (errs, r1, r2)


def test_hutchinson_probe_and_explicit_grid(gen):
    """A probe gives an unbiased divergence: averaged over many probes the NLL is the exact-divergence one; an
    explicit grid equal to the power grid is the same solve; torchdiffeq options are refused."""
    sde, mix = SubVPSDE(), mixture()
    x = mix.sample(4, generator=gen).double()
    exact = ode_log_likelihood(mix.score_fn(sde), sde, x, divergence="exact", method="exp_pc3", steps=30)
    xs = x.repeat(400, 1)
    est = ode_log_likelihood(mix.score_fn(sde), sde, xs, divergence="rademacher", generator=gen, method="exp_pc3",
                             steps=30)
    mean = est.nll.view(400, 4).mean(0)
    se = est.nll.view(400, 4).std(0) / 20
    assert bool(((mean - exact.nll).abs() < 4 * se + 1e-9).all()), (mean, exact.nll, se)
    g = power_grid(sde.default_eps, sde.T, 30, default_grid_rho(sde, "exp_pc3"))
    assert default_grid_rho(sde, "exp_pc3") == 2.0 and default_grid_rho(sde, "rk4") == 3.0
    again = ode_log_likelihood(mix.score_fn(sde), sde, x, divergence="exact", method="exp_pc3", grid=g)
    torch.testing.assert_close(again.nll, exact.nll, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="takes none"):
        ode_log_likelihood(mix.score_fn(sde), sde, x, method="exp_pc3", steps=5, options={"perturb": True})
    with pytest.raises(ValueError, match="fixed-grid"):
        ode_log_likelihood(mix.score_fn(sde), sde, x, method="exp_pc3")
