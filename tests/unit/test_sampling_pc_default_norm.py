"""The DEFAULT PC sampler config (conf/sampler/pc.yaml: reverse diffusion + Langevin, ``corrector_norm: auto``)
reproduces the target covariance of low-dimensional data, where per-example Langevin norms inflate it; images keep
per-example norms (a sample depends on its seed only)."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from scoreflow.oracles import GaussianMixture
from scoreflow.sampling import LangevinCorrector, get_corrector, pc_sample, sample, sampler_options
from scoreflow.sampling.correctors import AUTO_BATCH_NORM_BELOW_DIM
from scoreflow.sampling.registry import describe_sampler
from scoreflow.sde import VESDE, VPSDE

CONF = Path(__file__).resolve().parents[2] / "conf" / "sampler"
# the README's "library in 20 lines" data: mean (0, 0.25), variances 1.05 and 0.6125
README_MIX = GaussianMixture(torch.ones(2), torch.tensor([[1.0, 1.0], [-1.0, -0.5]]), torch.full((2, 2), 0.05))


def default_pc_options():
    kind, options = sampler_options(OmegaConf.to_container(OmegaConf.load(CONF / "pc.yaml"), resolve=True))
    assert kind == "pc" and options["corrector"] == "langevin" and options["corrector_norm"] == "auto"
    return kind, options


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_default_config_reproduces_the_readme_mixture_covariance(sde):
    """The audit's case: VP, 4000 samples, 300 steps gave variances 1.45 / 1.10 for 1.05 / 0.61 with per-example
    norms; the default config now gives the target (batch norms, as score_sde's corrector)."""
    kind, options = default_pc_options()
    options["steps"] = 300
    res = sample(README_MIX.score_fn(sde), sde, (4000, 2), kind=kind, generator=torch.Generator().manual_seed(0),
                 dtype=torch.float64, **options)
    mean, cov = README_MIX.mean_cov()
    x = res.samples
    assert ((x.mean(0) - mean).abs() / (cov.diag() / len(x)).sqrt()).max() < 4
    torch.testing.assert_close(x.var(0), cov.diag(), rtol=0.07, atol=0)  # 4000 samples: SE of a variance ~2.2 %
    torch.testing.assert_close(torch.cov(x.T)[0, 1], cov[0, 1], rtol=0.1, atol=0)


def test_per_example_norms_stay_available_and_inflate_low_dimensional_variances():
    """``corrector_norm="example"`` is the old default: documented bias O(1/D), ~40 % here."""
    sde = VPSDE()
    res = pc_sample(README_MIX.score_fn(sde), sde, (2000, 2), steps=300, corrector_norm="example",
                    generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (res.samples.var(0) / README_MIX.mean_cov()[1].diag()).min() > 1.15


def test_auto_is_batch_below_64_dims_and_per_example_from_64_on():
    corr = get_corrector("langevin")
    assert isinstance(corr, LangevinCorrector) and corr.norm == "auto" and AUTO_BATCH_NORM_BELOW_DIM == 64
    assert LangevinCorrector().norm == "auto"
    for shape, norm in [((5, 2), "batch"), ((5, 63), "batch"), ((5, 1, 4, 4), "batch"), ((5, 64), "example"),
                        ((5, 1, 8, 8), "example"), ((5, 3, 32, 32), "example")]:
        assert corr.resolved_norm(torch.zeros(shape)) == norm, shape
    for norm in ("batch", "example"):
        assert get_corrector("langevin", norm=norm).resolved_norm(torch.zeros(5, 2 if norm == "example" else 99)) \
            == norm


def test_auto_step_is_score_sde_batch_mean_of_per_example_norms(gen):
    """score_sde's LangevinCorrector: ``step = 2 alpha (snr * mean_b ||z_b|| / mean_b ||s_b||)^2`` for every example."""
    sde = VPSDE()
    x, s, z = (torch.randn(6, 3, dtype=torch.float64, generator=gen) for _ in range(3))
    t = torch.rand(6, dtype=torch.float64, generator=gen) * 0.8 + 0.1
    dt = torch.full_like(t, 0.01)
    got = LangevinCorrector(snr=0.2).step_size(sde, x, t, dt, s, z)
    ratio = z.norm(dim=1).mean() / s.norm(dim=1).mean()
    torch.testing.assert_close(got, 2 * sde.langevin_alpha(t, dt) * (0.2 * ratio) ** 2)


def test_corrector_norm_is_validated_and_reported():
    with pytest.raises(ValueError, match=r"corrector_norm must be one of 'auto', 'example', 'batch', got 'mean'"):
        pc_sample(lambda x, t: -x, VPSDE(), (2, 2), corrector_norm="mean", steps=1)
    with pytest.raises(ValueError, match=r"norm must be one of 'auto', 'example', 'batch', got 'mean'"):
        LangevinCorrector(norm="mean")
    assert get_corrector("ald", norm="batch").nfe == 1  # accepted and unused by the other correctors
    _, options = default_pc_options()
    assert describe_sampler("pc", options) == \
        "PC reverse_diffusion + langevin (snr=0.16, n_steps=1), steps=N, denoise=True"
    assert describe_sampler("pc", {**options, "corrector_norm": "example"}) == \
        "PC reverse_diffusion + langevin (snr=0.16, n_steps=1, norm=example), steps=N, denoise=True"
    lam = OmegaConf.to_container(OmegaConf.load(CONF / "lambda_family.yaml"), resolve=True)
    assert lam["corrector_norm"] == "auto"


def test_images_keep_per_example_norms_and_batch_independent_seeds():
    """8x8 single-channel images (the digits, D = 64): the default sampler's samples depend on their seeds only."""
    sde = VPSDE()

    def score(x, t):
        alpha, sigma = sde.marginal(t)
        return -x / (alpha**2 + sigma**2)[:, None, None, None] + 0.1 * torch.tanh(x.roll(1, dims=-1))

    kw = dict(steps=10, dtype=torch.float64)
    both = pc_sample(score, sde, (2, 1, 8, 8), seeds=[3, 4], **kw).samples
    one = pc_sample(score, sde, (1, 1, 8, 8), seeds=[4], **kw).samples
    torch.testing.assert_close(both[1:], one, rtol=0, atol=1e-12)
