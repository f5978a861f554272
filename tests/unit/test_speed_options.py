"""``module.compile``: true/false or a torch.compile mode; anything else is refused with the list of modes."""

import pytest
import torch

from scoreflow.dequantization import UniformDequantizer
from scoreflow.lit.module import COMPILE_MODES, ScoreLitModule
from scoreflow.nets import ScoreModel
from scoreflow.sde import VPSDE
from scoreflow.weighting import ImportanceSampledLikelihood


def _module(compile):
    sde = VPSDE()
    return ScoreLitModule(ScoreModel(torch.nn.Identity(), sde), ImportanceSampledLikelihood(sde),
                          UniformDequantizer(), num_levels=4, data_shape=(1, 2, 2), compile=compile)


def test_compile_modes(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw.get("mode")))
    for mode in (True, *COMPILE_MODES):
        _module(mode)
    _module(False)
    assert seen == [None, *COMPILE_MODES]
    with pytest.raises(ValueError, match=r"module.compile='fast'.*reduce-overhead"):
        _module("fast")
