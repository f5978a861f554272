"""Fixed-grid ODE likelihood on explicit time grids (``ode_log_likelihood(..., grid=...)``), against the exact
log-density of Gaussian and Gaussian-mixture data with the exact score.

With the exact score the ODE maps ``p_eps`` onto ``p_T`` exactly, so the returned NLL equals
``-log p_eps(x) + log p_T(z) - log pi(z)`` for the ``z = x_T`` the solve reached (as in ``test_likelihood_ode``).
"""

import math

import pytest
import torch

from scoreflow.likelihood import ode_log_likelihood
from scoreflow.likelihood.ode import check_grid, power_grid
from scoreflow.oracles import GaussianMixture, gaussian
from scoreflow.sde import VESDE, VPSDE, SubVPSDE


def mixture() -> GaussianMixture:
    means = torch.tensor([[1.0, -0.5], [-1.0, 0.5]])
    variances = torch.tensor([[0.1, 0.2], [0.3, 0.05]])
    return GaussianMixture(torch.tensor([0.4, 0.6]), means, variances)


def exact_nll(dist: GaussianMixture, sde, x, z, eps: float):
    B = x.shape[0]
    x, z = x.double(), z.double()
    t_eps = torch.full((B,), eps, dtype=torch.float64)
    t_T = torch.full((B,), sde.T, dtype=torch.float64)
    return -dist.log_prob(x, sde, t_eps) + dist.log_prob(z, sde, t_T) - sde.prior_logp(z)


def two_piece(eps: float, T: float, n_power: int, t_knee: float, n_uniform: int) -> torch.Tensor:
    """The rho = 3 power grid up to ``t_knee``, then even steps: a grid no ``steps``/``grid_rho`` pair gives."""
    g = power_grid(eps, T, n_power, 3.0)
    return torch.cat([g[g < t_knee], torch.linspace(t_knee, T, n_uniform + 1, dtype=torch.float64)])


def test_explicit_power_grid_is_the_power_grid(gen):
    """``grid=power_grid(...)`` and ``steps=N`` are the same solve, to the last bit, for the same probe."""
    sde, mix = VPSDE(), mixture()
    x = mix.sample(6, generator=gen).double()
    probe = torch.randint(0, 2, x.shape, generator=gen).double() * 2 - 1
    a = ode_log_likelihood(mix.score_fn(sde), sde, x, method="rk4", steps=12, probe=probe)
    g = power_grid(sde.default_eps, sde.T, 12, sde.ode_grid_rho)
    for grid in (g, g.tolist()):
        b = ode_log_likelihood(mix.score_fn(sde), sde, x, method="rk4", grid=grid, probe=probe)
        assert b.nfe == a.nfe == 48
        torch.testing.assert_close(b.nll, a.nll, rtol=0, atol=1e-12)
    c = ode_log_likelihood(mix.score_fn(sde), sde, x, method="rk4", grid=g, steps=12, probe=probe)
    torch.testing.assert_close(c.nll, a.nll, rtol=0, atol=0)


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (VESDE(), 1e-5)], ids=["vp", "subvp", "ve"])
def test_explicit_grid_converges_to_oracle_at_fourth_order(sde, eps, gen):
    """A two-piece grid (power then uniform) reaches the exact value, and halving every step of it shrinks the
    error about 2^4-fold: the solver really steps on the given times with RK4 weights."""
    mix = mixture()
    x = mix.sample(8, generator=gen)
    base = two_piece(eps, sde.T, 20, 0.2, 8)
    errs = []
    for k in (1, 2, 4):
        # refine every interval of the base grid into k equal steps
        g = torch.cat([torch.linspace(float(a), float(b), k + 1, dtype=torch.float64)[:-1]
                       for a, b in zip(base[:-1], base[1:])] + [base[-1:]])
        res = ode_log_likelihood(mix.score_fn(sde), sde, x, eps=eps, divergence="exact", dtype=torch.float64,
                                 method="rk4", grid=g)
        assert res.nfe == 4 * (len(g) - 1)
        errs.append(float((res.nll - exact_nll(mix, sde, x, res.z, eps)).abs().max()) / mix.dim)
    assert errs[-1] < 1e-3
    assert errs[0] / errs[1] > 8 and errs[1] / errs[2] > 8  # 16 for an exact 4th-order method


def test_gaussian_data_uniform_grid_midpoint_is_second_order(gen):
    """Gaussian data, exact score, an even grid in ``t``: the midpoint rule's error falls ~4-fold per halving
    (so ``grid=`` is honoured by every fixed-grid method, not only rk4)."""
    sde, eps = VESDE(), 1e-5
    dist = gaussian(torch.tensor([0.3, -0.2, 0.1]), torch.tensor([0.5, 0.2, 0.8]))
    x = dist.sample(8, generator=gen)
    errs = []
    for n in (32, 64, 128):
        g = torch.linspace(eps, sde.T, n + 1, dtype=torch.float64)
        res = ode_log_likelihood(dist.score_fn(sde), sde, x, eps=eps, divergence="exact", dtype=torch.float64,
                                 method="midpoint", grid=g)
        assert res.nfe == 2 * n
        errs.append(float((res.nll - exact_nll(dist, sde, x, res.z, eps)).abs().max()))
    r1, r2 = errs[0] / errs[1], errs[1] / errs[2]
    assert 2.5 < r1 < 6 and 2.5 < r2 < 6, (errs, r1, r2)


def test_grid_argument_checks():
    sde, mix = VPSDE(), mixture()
    x = mix.sample(2)
    f = mix.score_fn(sde)
    eps, T = sde.default_eps, sde.T
    g = power_grid(eps, T, 5, 3.0)
    with pytest.raises(ValueError, match="adaptive"):
        ode_log_likelihood(f, sde, x, method="dopri5", grid=g)
    with pytest.raises(ValueError, match="not both"):
        ode_log_likelihood(f, sde, x, method="rk4", grid=g, grid_rho=2.0)
    with pytest.raises(ValueError, match="disagrees"):
        ode_log_likelihood(f, sde, x, method="rk4", grid=g, steps=6)
    with pytest.raises(ValueError, match="strictly increasing"):
        ode_log_likelihood(f, sde, x, method="rk4", grid=g.flip(0))
    with pytest.raises(ValueError, match="strictly increasing"):
        ode_log_likelihood(f, sde, x, method="rk4", grid=torch.tensor([eps, 0.5, 0.5, T]))
    with pytest.raises(ValueError, match="run from eps"):
        ode_log_likelihood(f, sde, x, method="rk4", grid=torch.linspace(1e-3, T, 5))
    with pytest.raises(ValueError, match="run from eps"):
        ode_log_likelihood(f, sde, x, method="rk4", grid=torch.linspace(eps, 0.9, 5))
    with pytest.raises(ValueError, match="1-D"):
        check_grid(g[None], eps, T)
    with pytest.raises(ValueError, match="1-D"):
        check_grid([eps], eps, T)
    with pytest.raises(ValueError, match="finite"):
        check_grid([eps, math.nan, T], eps, T)
    # the ends are snapped exactly onto eps and T (a float32 round trip may move them by an ulp)
    h = check_grid(g.float(), eps, T)
    assert h[0].item() == eps and h[-1].item() == T and h.dtype == torch.float64


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (VESDE(), 1e-5)], ids=["vp", "subvp", "ve"])
def test_rk4_shared_is_rk4_for_the_state_and_converges(sde, eps, gen):
    """``rk4_shared``: the latent ``z`` is rk4's (same steps), 3 divergences per step plus one at ``T`` and one
    drift-only call per step, and ``delta_logp`` converges to the oracle at least at second order."""
    mix = mixture()
    x = mix.sample(8, generator=gen)
    errs = []
    for n in (20, 40, 80):
        kw = dict(eps=eps, divergence="exact", dtype=torch.float64, steps=n)
        ref = ode_log_likelihood(mix.score_fn(sde), sde, x, method="rk4", **kw)
        res = ode_log_likelihood(mix.score_fn(sde), sde, x, method="rk4_shared", **kw)
        torch.testing.assert_close(res.z, ref.z, rtol=1e-12, atol=1e-12)
        assert (res.nfe, res.nfe_drift_only, ref.nfe_drift_only) == (3 * n + 1, n, 0)
        errs.append(float((res.nll - exact_nll(mix, sde, x, res.z, eps)).abs().max()) / mix.dim)
    assert errs[-1] < 2e-4
    assert errs[1] / errs[2] > 2.5  # 4 for second order


def test_rk4_shared_on_an_explicit_grid_and_its_arguments(gen):
    sde, mix = VPSDE(), mixture()
    x = mix.sample(4, generator=gen).double()
    probe = torch.randint(0, 2, x.shape, generator=gen).double() * 2 - 1
    g = power_grid(sde.default_eps, sde.T, 15, 3.0)
    a = ode_log_likelihood(mix.score_fn(sde), sde, x, method="rk4_shared", steps=15, probe=probe)
    b = ode_log_likelihood(mix.score_fn(sde), sde, x, method="rk4_shared", grid=g, probe=probe)
    torch.testing.assert_close(a.nll, b.nll, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="takes none"):
        ode_log_likelihood(mix.score_fn(sde), sde, x, method="rk4_shared", steps=5, options={"perturb": True})
    with pytest.raises(ValueError, match="fixed-grid solver"):
        ode_log_likelihood(mix.score_fn(sde), sde, x, method="rk4_shared")
