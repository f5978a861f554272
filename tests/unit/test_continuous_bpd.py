"""Continuous data (``num_levels=None``) scaled to the model's space ``y = scale x + shift``: the bits/dim reported
are those of the data's density ``p_x``, not of ``p_y`` (``data=toy2d`` with the default ``module.scale=2`` reported
one bit per dimension too many)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scoreflow.lit.module import ScoreLitModule
from scoreflow.nets import ScoreModel
from scoreflow.sde import VPSDE
from scoreflow.weighting import LikelihoodWeighting


def _gauss_nll(v: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (0.5 * ((v - mean) / std) ** 2 + math.log(std) + 0.5 * math.log(2 * math.pi)).sum(-1)


@pytest.mark.parametrize("scale,shift", [(2.0, -1.0), (1.0, 0.0), (0.5, 3.0)])
def test_continuous_bpd_is_that_of_the_data_density(scale, shift):
    sde, D, s = VPSDE(), 2, 0.3
    model = ScoreModel(nn.Identity(), sde, parametrization="score", time_label="t")
    module = ScoreLitModule(model, LikelihoodWeighting(sde), None, num_levels=None, data_shape=(D,), scale=scale,
                            shift=shift)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s
    y = scale * x + shift
    nll_y = _gauss_nll(y, shift, scale * s)  # the exact density of y, computed in y's own space
    want = _gauss_nll(x, 0.0, s) / (D * math.log(2))  # the exact bits/dim of the data x
    got = module.to_bpd(nll_y, torch.zeros(64, dtype=torch.float64), D)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
