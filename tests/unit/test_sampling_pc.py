"""PC samplers against exact Gaussian-mixture scores, the paper's update rules, and per-sample seeding."""

import math

import pytest
import torch

from scoreflow.oracles import GaussianMixture, gaussian
from scoreflow.sampling import (
    Ancestral,
    LangevinCorrector,
    ReverseDiffusion,
    get_corrector,
    get_predictor,
    pc_sample,
    per_sample_randn,
)
from scoreflow.sde import VESDE, VPSDE, SubVPSDE

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}
N_SAMPLES, STEPS = 2000, 250

# a 2-component mixture with a non-diagonal covariance: mean (0.4, -0.2), cov [[1.21, -0.42], [-0.42, 0.5]]
MIX = GaussianMixture(
    torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), torch.tensor([[0.3, 0.5], [0.4, 0.2]])
)


def assert_moments(x, mean, cov, mean_se=4.0, cov_tol=0.12):
    """Sample mean within ``mean_se`` standard errors; covariance entries within ``cov_tol`` (correlation units)."""
    n = x.shape[0]
    se = (cov.diag() / n).sqrt()
    z = ((x.mean(0) - mean) / se).abs().max()
    scale = (cov.diag()[:, None] * cov.diag()[None, :]).sqrt()
    rel = ((torch.cov(x.T) - cov) / scale).abs().max()
    assert z < mean_se and rel < cov_tol, f"mean error {z:.2f} SE, covariance error {rel:.3f}"



class FixedNoise:
    """A noise source returning a given tensor (to compare single steps with closed forms)."""

    def __init__(self, z):
        self.z = z

    def randn(self, shape, *, dtype, device):
        return self.z.reshape(shape).to(dtype)


# ----------------------------------------------------------------------------- distributions
@pytest.mark.parametrize("corrector", ["none", "langevin", "ald"])
@pytest.mark.parametrize("predictor", ["euler_maruyama", "reverse_diffusion", "ancestral"])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_pc_reproduces_mixture_moments(sde_name, predictor, corrector):
    sde = SDES[sde_name]
    g = torch.Generator().manual_seed(0)
    res = pc_sample(
        MIX.score_fn(sde),
        sde,
        (N_SAMPLES, 2),
        predictor=predictor,
        corrector=corrector,  # the default configuration (langevin: norm="auto", batch norms in 2-D)
        steps=STEPS,
        generator=g,
        dtype=torch.float64,
    )
    n_corr = 0 if corrector == "none" else 1
    assert res.nfe == STEPS * (1 + n_corr) + 1
    assert_moments(res.samples, *MIX.mean_cov())


@pytest.mark.parametrize("sde_name", list(SDES))
def test_probability_flow_predictor_moments(sde_name):
    # Eq. (44) treats the drift to 2nd order but the score to 1st, an O(dt) splitting error that no noise
    # washes out (+0.1 in variance at 250 steps on VP): give it 1000 steps
    sde = SDES[sde_name]
    g = torch.Generator().manual_seed(1)
    res = pc_sample(
        MIX.score_fn(sde),
        sde,
        (N_SAMPLES, 2),
        predictor="probability_flow",
        corrector="none",
        steps=1000,
        generator=g,
        dtype=torch.float64,
    )
    assert_moments(res.samples, *MIX.mean_cov())


@pytest.mark.slow
def test_per_example_langevin_in_high_dimension():
    """The default per-example norms are fine once D is large (bias O(1/D)): variance within 6 % at D=256."""
    D, sde = 256, VPSDE()
    target = gaussian(torch.full((D,), 0.5), 0.5)
    res = pc_sample(
        target.score_fn(sde), sde, (500, D), steps=200, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert abs(res.samples.mean() - 0.5) < 0.01
    assert abs(res.samples.var(0).mean() / 0.5 - 1) < 0.06


# ----------------------------------------------------------------------------- single steps vs the paper
def _step_inputs(sde, gen):
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    s = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    z = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    t = torch.rand(5, dtype=torch.float64, generator=gen) * 0.8 + 0.1
    return x, s, z, t, t - 0.01


@pytest.mark.parametrize("variance", ["auto", "posterior"])
def test_ancestral_ve_is_smld_ancestral(gen, variance):
    """App. F, Eq. (47): x + (s_i^2 - s_{i-1}^2) s + sqrt(s_{i-1}^2 (s_i^2 - s_{i-1}^2) / s_i^2) z (the default)."""
    sde = SDES["ve"]
    x, s, z, t, tn = _step_inputs(sde, gen)
    got = Ancestral(variance).step(lambda *_: s, sde, x, t, tn, FixedNoise(z))
    si2, sp2 = (sde.sigma(t) ** 2)[:, None], (sde.sigma(tn) ** 2)[:, None]
    ref = x + (si2 - sp2) * s + (sp2 * (si2 - sp2) / si2).sqrt() * z
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde_name", ["vp", "subvp"])
def test_ancestral_is_ddpm_posterior(sde_name, gen):
    """DDPM with abar = alpha_t^2: mean = Eq. (4) = posterior mean at Tweedie's x0; variance beta-tilde
    (``variance="posterior"``) or, the default for VP/subVP as Eq. (4) and the reference, beta (``"forward"``)."""
    sde = SDES[sde_name]
    x, s, z, t, tn = _step_inputs(sde, gen)
    (a_t, sig_t), (a_s, sig_s) = sde.marginal(t), sde.marginal(tn)
    ratio = (a_t / a_s)[:, None]
    beta = 1 - ratio**2  # DDPM's beta_i between the two times (VP: 1 - abar_t / abar_s)
    var_fwd = (sig_t**2)[:, None] - ratio**2 * (sig_s**2)[:, None]  # = beta for VP
    x0 = (x + (sig_t**2)[:, None] * s) / a_t[:, None]  # Tweedie
    post_mean = (ratio * (sig_s**2)[:, None] * x + a_s[:, None] * var_fwd * x0) / (sig_t**2)[:, None]
    post_var = (sig_s**2)[:, None] * var_fwd / (sig_t**2)[:, None]
    got = Ancestral(variance="posterior").step(lambda *_: s, sde, x, t, tn, FixedNoise(z))
    torch.testing.assert_close(got, post_mean + post_var.sqrt() * z, rtol=1e-10, atol=1e-12)
    default = Ancestral().step(lambda *_: s, sde, x, t, tn, FixedNoise(z))
    torch.testing.assert_close(default, post_mean + var_fwd.sqrt() * z, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(default, got)  # the two variances differ (beta-tilde < beta)
    if sde_name == "vp":  # Eq. (4) of Ho et al. / Song et al.: (x + beta s) / sqrt(1 - beta) + sqrt(beta) z
        torch.testing.assert_close(var_fwd, beta, rtol=1e-10, atol=1e-14)
        got_fwd = Ancestral(variance="forward").step(lambda *_: s, sde, x, t, tn, FixedNoise(z))
        torch.testing.assert_close(got_fwd, (x + beta * s) / (1 - beta).sqrt() + beta.sqrt() * z)
        ddpm_var = (1 - a_s**2)[:, None] / (1 - a_t**2)[:, None] * beta  # beta-tilde
        torch.testing.assert_close(post_var, ddpm_var, rtol=1e-10, atol=1e-14)


def test_reverse_diffusion_is_algorithms_2_and_3(gen):
    vp, ve = SDES["vp"], SDES["ve"]
    x, s, z, t, tn = _step_inputs(vp, gen)
    beta = (-torch.expm1(-(vp.B(t) - vp.B(tn))))[:, None]  # exact DDPM beta of the forward step tn -> t
    got = ReverseDiffusion().step(lambda *_: s, vp, x, t, tn, FixedNoise(z))
    torch.testing.assert_close(got, (2 - (1 - beta).sqrt()) * x + beta * s + beta.sqrt() * z)
    dsig2 = (ve.sigma(t) ** 2 - ve.sigma(tn) ** 2)[:, None]
    got = ReverseDiffusion().step(lambda *_: s, ve, x, t, tn, FixedNoise(z))
    torch.testing.assert_close(got, x + dsig2 * s + dsig2.sqrt() * z)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_langevin_step_is_algorithm_5_per_example(sde_name, gen):
    sde = SDES[sde_name]
    x, s, z, t, tn = _step_inputs(sde, gen)
    got = LangevinCorrector(snr=0.2, n_steps=1, norm="example")(lambda *_: s, sde, x, t, t - tn, FixedNoise(z))
    eps = (
        2
        * sde.langevin_alpha(t, t - tn)[:, None]
        * (0.2 * z.norm(dim=1, keepdim=True) / s.norm(dim=1, keepdim=True)) ** 2
    )
    torch.testing.assert_close(got, x + eps * s + (2 * eps).sqrt() * z)
    assert torch.isfinite(got).all()


# ----------------------------------------------------------------------------- shapes, registry, seeds
def _image_score(sde, C=2):
    """A small random conv net around the score of N(0, I) data: ``-x / (alpha^2 + sigma^2) + 0.1 tanh(conv x)``."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(C, C, 3, padding=1).double()

    def score(x, t):
        alpha, sigma = sde.marginal(t)
        return -x / (alpha**2 + sigma**2)[:, None, None, None] + 0.1 * torch.tanh(conv(x))

    return score


@pytest.mark.parametrize("corrector", ["none", "langevin", "ald"])
@pytest.mark.parametrize("predictor", ["none", "euler_maruyama", "reverse_diffusion", "ancestral", "probability_flow"])
@pytest.mark.parametrize("sde_name", list(SDES))
def test_every_combination_runs_on_images(sde_name, predictor, corrector):
    # 25 steps: the DDPM discretization of VPSDE needs beta(t) dt < 1
    sde = SDES[sde_name]
    res = pc_sample(
        _image_score(sde),
        sde,
        (3, 2, 4, 4),
        predictor=predictor,
        corrector=corrector,
        n_steps=2,
        steps=25,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    assert res.samples.shape == (3, 2, 4, 4) and torch.isfinite(res.samples).all()
    assert res.nfe == 25 * (get_predictor(predictor).nfe + get_corrector(corrector, n_steps=2).nfe) + 1


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown predictor"):
        get_predictor("heun")
    with pytest.raises(ValueError, match="unknown corrector"):
        get_corrector("hmc")


def test_per_sample_seeds_do_not_depend_on_the_batch():
    sde = SDES["vp"]
    score = _image_score(sde, C=1)
    # default: reverse diffusion + Langevin with norm="auto", per example on images of D >= 64 (8x8 digits)
    kw = dict(steps=25, dtype=torch.float64)
    both = pc_sample(score, sde, (2, 1, 8, 8), seeds=[3, 4], **kw).samples
    one = pc_sample(score, sde, (1, 1, 8, 8), seeds=[3], **kw).samples
    two = pc_sample(score, sde, (1, 1, 8, 8), seeds=[4], **kw).samples
    torch.testing.assert_close(both, torch.cat([one, two]), rtol=0, atol=1e-12)
    assert not torch.allclose(one, two)
    z = per_sample_randn([3, 4], (5,), dtype=torch.float64)
    torch.testing.assert_close(z[1:], per_sample_randn([4], (5,), dtype=torch.float64))


def test_given_prior_sample_and_generator_reproducible():
    sde = SDES["ve"]
    score = _image_score(sde)
    xT = sde.prior_std * torch.randn(2, 2, 4, 4, dtype=torch.float64)
    a = pc_sample(score, sde, noise=xT, steps=5, generator=torch.Generator().manual_seed(7)).samples
    b = pc_sample(score, sde, noise=xT, steps=5, generator=torch.Generator().manual_seed(7)).samples
    assert a.dtype == torch.float64 and torch.equal(a, b)
    assert math.isfinite(float(a.abs().max()))


def test_ancestral_variance_reaches_the_predictor_and_is_refused_elsewhere():
    from scoreflow.sampling.predictors import get_predictor

    assert get_predictor("ancestral").variance == "auto"
    assert get_predictor("ancestral", variance="posterior").variance == "posterior"
    with pytest.raises(ValueError, match="variance=forward is only used by predictor=ancestral"):
        get_predictor("reverse_diffusion", variance="forward")
    with pytest.raises(ValueError, match="variance must be one of"):
        Ancestral("beta")
    sde = SDES["vp"]
    out = {v: pc_sample(lambda x, t: -x, sde, (4, 2), predictor="ancestral", corrector="none", variance=v, steps=5,
                        generator=torch.Generator().manual_seed(0), dtype=torch.float64).samples
           for v in (None, "forward", "posterior")}
    assert torch.equal(out[None], out["forward"]) and not torch.equal(out[None], out["posterior"])
