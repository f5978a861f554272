"""Training flips go through the one augmentation function (scoreflow.data.random_hflip) with the step's
generator, in the score module as in the classifier module, and only when asked."""

import pytest
import torch

import scoreflow.lit.classifier_module as classifier_module
import scoreflow.lit.dequant_module as dequant_module
import scoreflow.lit.module as score_module
from scoreflow.data import random_hflip
from scoreflow.tasks.build import build_module


@pytest.mark.parametrize("hflip", [True, False])
def test_score_module_flips_through_random_hflip(make_cfg, monkeypatch, hflip):
    module = build_module(make_cfg(["debug=fast", "data=digits", f"data.hflip={hflip}"]))
    assert module.hflip is hflip
    calls = []

    def spy(k, g):
        calls.append(g)
        return random_hflip(k, g)

    monkeypatch.setattr(score_module, "random_hflip", spy)
    k = torch.randint(0, module.num_levels, (4, *module.data_shape), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    module.training_loss(k, g)
    assert calls == ([g] if hflip else [])


def test_classifier_and_dequant_modules_use_the_same_function():
    assert classifier_module.random_hflip is random_hflip
    # the dequantization module prepares its batches (flip, dequantize, scale) through the score module's own
    # prepare(): no second copy of the flip
    assert dequant_module.DequantLitModule.prepare is score_module.ScoreLitModule.prepare
    assert not hasattr(dequant_module, "random_hflip")
