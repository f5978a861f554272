"""Huang et al. 2021's plug-in reverse SDE family (Eq. 27) against the exact Gaussian-mixture score.

With the exact score every member ``lam <= 1`` must end at the forward SDE's marginal ``p_eps``: checked per
dimension with a Kolmogorov-Smirnov test against the mixture's exact CDF at ``eps`` and by the moments. A
member with a wrong coefficient (the score term or the noise scale) must fail the same check.
"""

import math

import pytest
import torch
from scipy import stats

from scoreflow.oracles import GaussianMixture
from scoreflow.sampling import EulerMaruyama, PlugInReverseSDE, get_predictor, pc_sample
from scoreflow.sde import VESDE, VPSDE, SubVPSDE

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}
N_SAMPLES, STEPS = 4000, 1000  # Euler on the VE ODE (lam = 1) needs ~1000 steps for 6 % in covariance
EPS = 1e-2  # end time of the check (every SDE): p_eps is still far from the prior and nowhere singular
# mean (0.4, -0.2), cov [[1.21, -0.42], [-0.42, 0.5]]; bimodal along both axes
MIX = GaussianMixture(
    torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), torch.tensor([[0.3, 0.5], [0.4, 0.2]])
)


def mixture_cdf(mix: GaussianMixture, sde, t: float, d: int):
    """CDF of dimension ``d`` of the diffused mixture ``p_t``: ``sum_k w_k Phi((x - alpha mu_kd) / s_kd)``."""
    alpha, sigma = (float(v) for v in sde.marginal(torch.tensor([t], dtype=torch.float64)))
    w = mix.log_w.exp().numpy()
    mu = alpha * mix.means[:, d].numpy()
    sd = (alpha**2 * mix.variances[:, d].numpy() + sigma**2) ** 0.5
    return lambda x: (w[None] * stats.norm.cdf((x[:, None] - mu[None]) / sd[None])).sum(axis=1)


def sample_family(sde, predictor, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pc_sample(MIX.score_fn(sde), sde, (N_SAMPLES, 2), predictor=predictor, corrector="none", steps=STEPS,
                     eps=EPS, denoise=False, generator=g, dtype=torch.float64).samples


def marginal_pvalue(x, sde) -> float:
    """The smallest of the per-dimension KS p-values against the exact marginal at ``EPS``."""
    return min(stats.kstest(x[:, d].numpy(), mixture_cdf(MIX, sde, EPS, d)).pvalue for d in range(2))


CASES = [(sde, lam) for sde in SDES for lam in (0.0, 0.5, 1.0)] + [("vp", -1.0), ("subvp", 0.9)]
MORE = [("subvp", -1.0), ("ve", -1.0), ("vp", 0.9), ("ve", 0.9)]


@pytest.mark.parametrize("sde_name, lam", CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in MORE])
def test_every_lambda_samples_the_marginal(sde_name, lam):
    sde = SDES[sde_name]
    x = sample_family(sde, PlugInReverseSDE(lam))
    p = marginal_pvalue(x, sde)
    assert p > 1e-3, f"{sde_name} lam={lam}: KS p-value {p:.2e}"
    mean, cov = MIX.mean_cov(sde, EPS)
    se = (cov.diag() / N_SAMPLES).sqrt()
    assert ((x.mean(0) - mean) / se).abs().max() < 4.5
    scale = (cov.diag()[:, None] * cov.diag()[None, :]).sqrt()
    assert ((torch.cov(x.T) - cov) / scale).abs().max() < 0.08  # ~3.5 standard errors of a variance at n = 4000


class WrongScoreCoef(PlugInReverseSDE):
    """A plausible slip: the score term scaled by ``1 - lam`` instead of ``1 - lam / 2``."""

    def coefficients(self):
        return 1.0 - self.lam, math.sqrt(1.0 - self.lam)


class WrongNoiseCoef(PlugInReverseSDE):
    """Another: the noise scaled by ``1 - lam`` instead of ``sqrt(1 - lam)``."""

    def coefficients(self):
        return 1.0 - self.lam / 2.0, 1.0 - self.lam


@pytest.mark.parametrize("wrong", [WrongScoreCoef, WrongNoiseCoef])
@pytest.mark.parametrize("sde_name", ["vp", pytest.param("subvp", marks=pytest.mark.slow), "ve"])
def test_a_wrong_lambda_scaling_fails_the_check(sde_name, wrong):
    """The check above has the power to see a mis-scaled member (lam = 0.5, same samples and seeds)."""
    sde = SDES[sde_name]
    assert marginal_pvalue(sample_family(sde, wrong(0.5)), sde) < 1e-6


def test_lambda_zero_is_euler_maruyama_and_one_is_the_ode_euler_step(gen):
    sde = SDES["vp"]
    x, s, z = (torch.randn(5, 3, dtype=torch.float64, generator=gen) for _ in range(3))
    t = torch.rand(5, dtype=torch.float64, generator=gen) * 0.8 + 0.1
    tn = t - 0.01

    class Fixed:
        def randn(self, shape, *, dtype, device):
            return z.reshape(shape).to(dtype)

    score = lambda *_: s  # noqa: E731
    torch.testing.assert_close(PlugInReverseSDE(0.0).step(score, sde, x, t, tn, Fixed()),
                               EulerMaruyama().step(score, sde, x, t, tn, Fixed()), rtol=1e-14, atol=1e-14)
    ode = x - sde.ode_drift(x, t, s) * 0.01
    torch.testing.assert_close(PlugInReverseSDE(1.0).step(score, sde, x, t, tn, Fixed()), ode, rtol=1e-14, atol=1e-14)
    # Eq. (27) at lam = 0.5: drift f - 0.75 g^2 s, noise sqrt(0.5) g
    g2 = sde.g2(t)[:, None]
    ref = x - (sde.drift(x, t) - 0.75 * g2 * s) * 0.01 + (0.5 * g2 * 0.01).sqrt() * z
    torch.testing.assert_close(PlugInReverseSDE(0.5).step(score, sde, x, t, tn, Fixed()), ref, rtol=1e-12, atol=1e-14)


def test_names_and_errors():
    p = get_predictor("lambda_family", lam=0.3)
    assert isinstance(p, PlugInReverseSDE) and p.lam == 0.3
    assert get_predictor("lambda_family").lam == 0.0
    with pytest.raises(ValueError, match="lam <= 1"):
        PlugInReverseSDE(1.5)
    with pytest.raises(ValueError, match="only used by predictor=lambda_family"):
        get_predictor("reverse_diffusion", lam=0.5)
    res = pc_sample(MIX.score_fn(SDES["vp"]), SDES["vp"], (4, 2), predictor="lambda_family", lam=1.0,
                    corrector="none", steps=10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert res.nfe == 11 and torch.isfinite(res.samples).all()
