"""The NaN guard under DDP: a non-finite loss on one rank only must skip the step on every rank (the replicas stay
identical and no rank waits for a gradient all-reduce that another rank never starts)."""

from __future__ import annotations

from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from scoreflow.dequantization import UniformDequantizer
from scoreflow.lit.module import ScoreLitModule
from scoreflow.nets import ScoreModel
from scoreflow.sde import VPSDE
from scoreflow.weighting import ImportanceSampledLikelihood
from tests.integration.test_fused_guard import _Net


class _NanLossOnRank1(ScoreLitModule):
    """A non-finite loss with finite gradients on rank 1 at its 4th batch: only the ranks' agreement on the skip
    (``GuardedOptimization._agree``) keeps rank 0 from stepping alone. A NaN from the network cannot test that: DDP's
    all-reduce spreads its NaN gradients to every rank, which then skip on their own (audit)."""

    def training_loss(self, *args, **kwargs):
        loss, extra = super().training_loss(*args, **kwargs)
        if self.global_rank == 1 and self.batches_seen == 4:
            loss = loss + torch.tensor(float("nan"), dtype=loss.dtype)  # constant: the gradients stay finite
        return loss, extra


class _SaveWeights(pl.Callback):
    def __init__(self, where):
        self.where = where

    def on_train_end(self, trainer, pl_module):
        torch.save({"state": pl_module.state_dict(), "step": trainer.global_step,
                    "bad": pl_module.bad_steps_total}, f"{self.where}/rank{trainer.global_rank}.pt")


def _fit_on_two_ranks(module: ScoreLitModule, steps: int, tmp_path) -> tuple[dict, dict]:
    """Train ``module`` on 2 CPU processes for ``steps`` optimizer steps; each rank's final state."""
    data = TensorDataset(torch.randint(0, 4, (256, 1, 2, 2)), torch.zeros(256))
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, accelerator="cpu", devices=2, log_every_n_steps=4,
                         strategy=DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60)),
                         callbacks=[_SaveWeights(str(tmp_path))])
    trainer.fit(module, DataLoader(data, batch_size=8))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k in r0["state"]:  # the replicas stay identical
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=0, msg=k)
    return r0, r1


@pytest.mark.parametrize("fused", [pytest.param(False, marks=pytest.mark.slow), True],  # slow: 11 s (2 processes)
                         ids=["host-guard", "fused-guard"])
def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path, fused):
    sde = VPSDE()
    module = ScoreLitModule(ScoreModel(_Net(nan_calls=(3, 4), rank=1), sde), ImportanceSampledLikelihood(sde),
                            UniformDequantizer(), num_levels=4, data_shape=(1, 2, 2),
                            optim={"warmup_steps": 1, "lr": 1e-2, "fused": fused})
    r0, r1 = _fit_on_two_ranks(module, 8, tmp_path)
    assert r0["bad"] == r1["bad"] == 2
    assert r0["step"] == r1["step"] == 8  # skipped steps count with the fused guard only: 8 batches vs 10


def test_a_nan_loss_with_finite_gradients_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    sde = VPSDE()
    module = _NanLossOnRank1(ScoreModel(_Net(), sde), ImportanceSampledLikelihood(sde), UniformDequantizer(),
                             num_levels=4, data_shape=(1, 2, 2), optim={"warmup_steps": 1, "lr": 1e-2})
    r0, r1 = _fit_on_two_ranks(module, 6, tmp_path)
    assert r0["bad"] == r1["bad"] == 1 and r0["step"] == r1["step"] == 6
