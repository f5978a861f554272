"""``train/loss_var``, the per-step log of the loss's variance over a batch, is the variance of the minimised
per-example terms on the objective's scale, so that the likelihood weighting and its importance-sampled version
compare as in Song et al. 2021b, Sec. 5.1 (98.48 -> 0.068). Earlier releases logged the variance of the unweighted
eps-form term, which on the exact score of Gaussian data put lw_is *above* the likelihood weighting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scoreflow.lit.module import ScoreLitModule
from scoreflow.losses import dsm_loss
from scoreflow.nets import ScoreModel
from scoreflow.sde import VPSDE
from scoreflow.weighting import ImportanceSampledLikelihood, LikelihoodWeighting, TruncatedImportanceSampledLikelihood

S2, D = 0.25, 16  # data N(0, S2 I) in D dimensions


class ExactGaussianScore(nn.Module):
    """The score of the diffused data, exact at every time: -x / (alpha_t^2 S2 + sigma_t^2)."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def forward(self, x, t):
        var = self.sde.alpha(t) ** 2 * S2 + self.sde.sigma(t) ** 2
        return -x / var[:, None].to(x.dtype)


def _module(sampler):
    sde = sampler.sde
    model = ScoreModel(ExactGaussianScore(sde), sde, parametrization="score", time_label="t")
    return ScoreLitModule(model, sampler, None, num_levels=None, data_shape=(D,), loss_reduce="sum")


def _logged_and_by_hand(sampler, y):
    """The module's loss and logged variance, and the same draws by hand (times and weights, then the noise, from
    one generator): ``(loss, logged variance, t, w * per-example eps-form term)``."""
    module = _module(sampler).double()
    loss, extra = module.score_loss(y, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t, w = sampler.sample(y.shape[0], generator=g, dtype=torch.float64)
    z = torch.randn(y.shape, generator=g, dtype=torch.float64)
    per = dsm_loss(module.score_model, sampler.sde, y, t, noise=z, form="eps", reduce="sum")
    assert float(loss) == pytest.approx(float((w * per).mean()), rel=1e-12)
    return float(extra["train/loss_var"]), t, w * per


@pytest.mark.parametrize("normalize", [False, True])
def test_logged_variance_is_that_of_the_weighted_terms_on_the_objectives_scale(normalize):
    sde = VPSDE()
    n = 8192
    y = torch.randn(n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * S2**0.5
    logged = {}
    for name, sampler in (("likelihood", LikelihoodWeighting(sde)),
                          ("lw_is", ImportanceSampledLikelihood(sde, normalize=normalize))):
        var, _, weighted = _logged_and_by_hand(sampler, y)
        scale = 1.0 if name == "likelihood" or normalize else sampler.Z / (sampler.T - sampler.eps)
        terms = weighted * scale
        assert var == pytest.approx(float(terms.var()), rel=1e-12)
        logged[name] = (var, float(terms.mean()))
    # both estimate the same objective (means agree to Monte Carlo error), and IS cuts the variance by orders
    (var_lw, mean_lw), (var_is, mean_is) = logged["likelihood"], logged["lw_is"]
    assert mean_is == pytest.approx(mean_lw, abs=4 * (var_lw / n) ** 0.5)
    assert var_lw > 100 * var_is, logged


@pytest.mark.parametrize("normalize", [False, True])
def test_truncated_importance_sampler_logs_on_its_objectives_scale(normalize):
    """Huang et al.'s truncated sampler (t on [0, T]) restores its own dropped Z / T, not lw_is's Z / (T - eps)."""
    sde, n = VPSDE(), 4096
    y = torch.randn(n, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * S2**0.5
    sampler = TruncatedImportanceSampledLikelihood(sde, truncation=1e-3, normalize=normalize)
    var, t, weighted = _logged_and_by_hand(sampler, y)
    assert bool((t < 1e-3).any())  # the head below the truncation point is drawn
    scale = 1.0 if normalize else sampler.Z / sampler.T
    assert var == pytest.approx(float((weighted * scale).var()), rel=1e-12)
