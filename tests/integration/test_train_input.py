"""``module.train_input``: what the score model is trained on. ``dequantized`` (default): ``(k + u)/K``, the
likelihood the bound and the ODE NLL evaluate; ``levels``: ``k/(K - 1)`` without noise, ScoreFlow's JAX code
(SPEC 4.2). Evaluation always dequantizes; a variational flow (joint, or trained after on a ``levels`` score
model, as ScoreFlow does) always learns on dequantized data."""

from __future__ import annotations

import math

import pytest
import torch

from scoreflow.dequantization import UniformDequantizer
from scoreflow.lit.module import ScoreLitModule
from scoreflow.nets import ScoreModel
from scoreflow.sde import VPSDE
from scoreflow.tasks import validate
from scoreflow.tasks.build import ConfigError
from scoreflow.tasks.train import train
from scoreflow.tasks.train_dequant import train_dequant
from scoreflow.weighting import LikelihoodWeighting

FAST = ["debug=fast", "trainer.accelerator=cpu", "logger=none"]


class Zero(torch.nn.Module):
    def forward(self, x, label):
        return torch.zeros_like(x)


def _module(train_input, num_levels=256):
    sde = VPSDE()
    deq = UniformDequantizer() if num_levels else None
    return ScoreLitModule(ScoreModel(Zero(), sde), LikelihoodWeighting(sde), deq, num_levels=num_levels,
                          data_shape=(1, 2, 2), train_input=train_input)


def test_levels_feed_k_over_k_minus_1_and_dequantized_feed_k_plus_u_over_k():
    k = torch.tensor([0, 1, 128, 255]).reshape(1, 1, 2, 2)
    y, log_q = _module("levels").prepare(k, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, 2 * k.float() / 255 - 1, rtol=0, atol=0)
    assert y.min() == -1 and y.max() == 1 and torch.equal(log_q, torch.zeros(1))
    y, _ = _module("dequantized").prepare(k, torch.Generator().manual_seed(0))
    x = (y + 1) / 2 * 256  # k + u
    assert ((x - k) >= 0).all() and ((x - k) < 1).all() and not torch.equal(x, k.float())


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="train_input must be one of dequantized, levels"):
        _module("level")
    with pytest.raises(ValueError, match="for discrete data"):
        _module("levels", num_levels=None)


def test_the_config_check_names_both_choices(make_cfg):
    with pytest.raises(ConfigError, match="module.train_input=levels .* does not fit dequantization="
                                          "VariationalDequantizer") as e:
        validate.train(make_cfg(["module.train_input=levels", "dequantization=variational"]))
    assert "dequantization=uniform, or module.train_input=dequantized" in str(e.value.fix)
    with pytest.raises(ConfigError, match="did you mean|must be one of"):
        validate.train(make_cfg(["module.train_input=level"], sub="typo"))


def test_a_levels_run_trains_evaluates_dequantized_and_takes_a_flow_after(make_cfg, tmp_path):
    cfg = make_cfg([*FAST, "module.train_input=levels", "trainer.max_steps=4", "val_every=4",
                    "datamodule.test_subset=8"], sub="score")
    metrics = train(cfg)
    assert all(math.isfinite(metrics[k]) for k in ("test/bpd_bound", "test/bpd_ode"))
    ckpt = tmp_path / "score" / "checkpoints" / "last.ckpt"
    stored = torch.load(ckpt, weights_only=True)["scoreflow"]["config"]
    assert stored["module"]["train_input"] == "levels"
    flow = make_cfg([*FAST, f"score_ckpt={ckpt}", "trainer.max_steps=2", "val_every=2", "datamodule.test_subset=8"],
                    sub="flow", config_name="train_dequant")
    out = train_dequant(flow)
    assert out["train/steps"] == 2 and math.isfinite(out["test/bpd_bound"])
