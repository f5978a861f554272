"""SDE coefficients against float64 closed forms and Monte-Carlo simulation of the forward SDE."""

import math

import pytest
import torch

from scoreflow.sde import SDE, VESDE, VPSDE, SubVPSDE

SDES = [VPSDE(), SubVPSDE(), VESDE()]
IDS = ["vp", "subvp", "ve"]


def _ref_sigma(sde: SDE, t: float) -> float:
    """Textbook formulas evaluated in Python floats via math.expm1 (an independent reference)."""
    if isinstance(sde, VESDE):
        return sde.sigma_min * (sde.sigma_max / sde.sigma_min) ** t
    B = sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * t * t
    if isinstance(sde, SubVPSDE):
        return -math.expm1(-B)
    return math.sqrt(-math.expm1(-B))


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_sigma_float32_accurate_at_small_t(sde):
    for t in [1e-5, 1e-3, 0.5, 1.0]:
        got = float(sde.sigma(torch.tensor([t], dtype=torch.float32)))
        ref = _ref_sigma(sde, t)
        assert abs(got - ref) / ref < 1e-6, (t, got, ref)


def _ref_alpha(sde: SDE, t: float) -> float:
    """Mean coefficient alpha_t = exp(-B(t) / 2) (VP, subVP) or 1 (VE), in Python floats."""
    if isinstance(sde, VESDE):
        return 1.0
    B = sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * t * t
    return math.exp(-0.5 * B)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_alpha_float32_accurate_at_small_t(sde):
    for t in [1e-5, 1e-3, 0.5, 1.0]:
        tt = torch.tensor([t], dtype=torch.float32)
        ref = _ref_alpha(sde, t)
        for got in (float(sde.alpha(tt)), float(sde.marginal(tt)[0])):
            assert abs(got - ref) / ref < 1e-6, (t, got, ref)


def test_vp_sigma_at_1e5_value():
    # docs/reference.md §1: sigma_eps ~ 1.0005e-3 at eps=1e-5
    s = float(VPSDE().sigma(torch.tensor([1e-5])))
    assert s == pytest.approx(1.0005e-3, rel=1e-4)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_g2_is_derivative_of_variance(sde):
    """For a linear SDE, d(sigma^2)/dt = 2 a(t) sigma^2 + g^2 (sigma started at 0 for VP/subVP)."""
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    dvar = (sde.sigma(t + h) ** 2 - sde.sigma(t - h) ** 2) / (2 * h)
    rhs = 2 * sde.drift_coef(t) * sde.sigma(t) ** 2 + sde.g2(t)
    torch.testing.assert_close(dvar, rhs, rtol=1e-6, atol=1e-8)
    # d log alpha / dt = a(t)
    dla = (sde.log_alpha(t + h) - sde.log_alpha(t - h)) / (2 * h)
    torch.testing.assert_close(dla, sde.drift_coef(t), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_kernel_matches_euler_maruyama_simulation(sde, gen):
    """Simulate the forward SDE from x0 with many small steps; compare mean and std to the kernel."""
    n, steps = 20000, 400
    x0 = torch.tensor([1.5, -0.5], dtype=torch.float64)
    t0 = 0.2 if isinstance(sde, VESDE) else 0.0
    t1 = 0.7
    x = x0.expand(n, 2).clone()
    if isinstance(sde, VESDE):  # VE's kernel sigma(t) includes sigma(0) = sigma_min: start from that kernel
        x = sde.perturb(
            x, torch.full((n,), t0, dtype=torch.float64), torch.randn(n, 2, generator=gen, dtype=torch.float64)
        )
    dt = (t1 - t0) / steps
    for i in range(steps):
        t = torch.full((n,), t0 + i * dt, dtype=torch.float64)
        f, G = sde.discretize(x, t, dt)
        x = x + f + G[:, None] * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    tt = torch.tensor([t1], dtype=torch.float64)
    alpha, sigma = sde.marginal(tt)
    se_mean = float(sigma) / math.sqrt(n)
    assert torch.allclose(x.mean(0), alpha * x0, atol=5 * se_mean + 0.01 * float(sigma))
    assert torch.allclose(x.std(0), sigma.expand(2), rtol=0.03)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_drift_and_diffusion_simulated_give_the_kernel(sde, gen):
    """The SDE itself, dx = f(x, t) dt + g(t) dw, by plain Euler-Maruyama from drift() and diffusion() (the test
    above steps with sde.discretize, the exact DDPM/SMLD kernels, and never uses them), from x0 at t = 0. Mean
    alpha(t) x0 and variance sigma(t)^2 - alpha(t)^2 sigma(0)^2: VE's kernel sigma(t) counts sigma(0) = sigma_min
    (the reference's convention, SPEC 1), which the process started at x0 does not have (maths audit)."""
    n, steps, t1 = 20000, 400, 0.7
    x0 = torch.tensor([1.5, -0.5], dtype=torch.float64)
    x = x0.expand(n, 2).clone()
    dt = t1 / steps
    for i in range(steps):
        t = torch.full((n,), i * dt, dtype=torch.float64)
        g = sde.diffusion(t)[:, None]
        x = x + sde.drift(x, t) * dt + g * math.sqrt(dt) * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    zero, tt = torch.zeros(1, dtype=torch.float64), torch.tensor([t1], dtype=torch.float64)
    alpha, sigma = sde.marginal(tt)
    std = torch.sqrt(sigma**2 - alpha**2 * sde.sigma(zero) ** 2)
    assert torch.allclose(x.mean(0), alpha * x0, atol=5 * float(std) / math.sqrt(n) + 0.01 * float(std))
    assert torch.allclose(x.std(0), std.expand(2), rtol=0.03)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_transition_composes(sde):
    s, t = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.8], dtype=torch.float64)
    a_ts, s_ts = sde.transition(s, t)
    torch.testing.assert_close(a_ts**2 * sde.sigma(s) ** 2 + s_ts**2, sde.sigma(t) ** 2)
    torch.testing.assert_close(a_ts * sde.alpha(s), sde.alpha(t))


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_prior_logp_and_cross_entropy(sde, gen):
    z = sde.prior_sample((4, 3, 2, 2), generator=gen, dtype=torch.float64)
    d = torch.distributions.Normal(0.0, sde.prior_std)
    torch.testing.assert_close(sde.prior_logp(z), d.log_prob(z).sum((1, 2, 3)))
    # closed-form E[-log pi(x_T)] vs Monte Carlo
    x0 = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    n = 40000
    T = torch.full((n,), 1.0, dtype=torch.float64)
    mc = torch.stack(
        [
            -sde.prior_logp(
                sde.perturb(x.expand(n, 5), T, torch.randn(n, 5, generator=gen, dtype=torch.float64))
            ).mean()
            for x in x0
        ]
    )
    torch.testing.assert_close(sde.prior_cross_entropy(x0), mc, rtol=2e-3, atol=0)


def test_ode_drift_and_shapes():
    sde = VPSDE()
    x = torch.randn(3, 1, 4, 4)
    t = torch.rand(3)
    s = torch.randn_like(x)
    d = sde.ode_drift(x, t, s)
    assert d.shape == x.shape
    ref = -0.5 * sde.beta(t)[:, None, None, None] * x - 0.5 * sde.beta(t)[:, None, None, None] * s
    torch.testing.assert_close(d, ref)
    torch.testing.assert_close(sde.div_drift(t, 16), -0.5 * sde.beta(t) * 16)


@pytest.mark.parametrize("bad", [0.0, -1e-3, 1.0, 2.0])
def test_bad_eps_raises(bad):
    with pytest.raises(ValueError, match="eps"):
        VPSDE().check_eps(bad)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=5.0, beta_max=1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        VESDE(sigma_min=10.0, sigma_max=1.0)
