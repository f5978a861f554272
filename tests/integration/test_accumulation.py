"""``module.optim.accumulate_grad_batches``: n micro-batches per optimizer step.

Oracle: with a loss that draws no noise, batch b x n micro-batches trains the same weights and EMA as batch n*b in
one (clip, schedule and EMA act per optimizer step), in one process and under DDP (2 CPU processes, where only the
last micro-batch all-reduces); through the real configs a run resumes exactly and validates every ``val_every``
optimizer steps; the pre-emption checkpoint waits for the end of the optimizer step.
"""

from __future__ import annotations

import csv
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

from scoreflow.dequantization import UniformDequantizer
from scoreflow.lit.ema import EMA
from scoreflow.lit.module import ScoreLitModule
from scoreflow.lit.preemption import Preempted, PreemptionCheckpoint
from scoreflow.nets import ScoreModel
from scoreflow.sde import VPSDE
from scoreflow.tasks.train import train
from scoreflow.weighting import ImportanceSampledLikelihood
from tests.integration.resume_check import resumed_and_uninterrupted
from tests.integration.test_fused_guard import _Net


class _NoNoise(ScoreLitModule):
    """A loss that is a plain mean over the batch and draws no random numbers."""

    def training_loss(self, k, g):
        y = k.float() * (2 / 3) - 1
        out = self.score_model.net(y, torch.full((y.shape[0],), 500.0))
        return (out - y.flip(-1)).square().mean(), {}


def _module(accumulate: int, fused: bool = False) -> ScoreLitModule:
    sde = VPSDE()
    # grad_clip 0.05: the clip acts (the gradient norm is ~0.5), on the summed gradient of the step
    return _NoNoise(ScoreModel(_Net(), sde), ImportanceSampledLikelihood(sde), UniformDequantizer(), num_levels=4,
                    data_shape=(1, 2, 2), optim={"warmup_steps": 3, "lr": 1e-2, "grad_clip": 0.05, "fused": fused,
                                                 "accumulate_grad_batches": accumulate})


class _Save(pl.Callback):
    def __init__(self, where):
        self.where = where

    def on_train_end(self, trainer, pl_module):
        torch.save({"state": pl_module.state_dict(), "step": trainer.global_step,
                    "ema": [s.clone() for s in trainer.callbacks[0].shadow]},
                   f"{self.where}/rank{trainer.global_rank}.pt")


def _fit(module, batch, tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 4, (512, 1, 2, 2)), torch.zeros(512))
    trainer = pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, accelerator="cpu", callbacks=[EMA(decay=0.9), _Save(tmp_path)],
                         **kw)
    trainer.fit(module, DataLoader(data, batch_size=batch))
    return trainer


@pytest.mark.parametrize("fused", [False, True], ids=["host-guard", "fused-guard"])
def test_micro_batches_train_the_weights_of_the_whole_batch(tmp_path, fused):
    whole, micro = _module(1, fused), _module(4, fused)
    _fit(whole, 16, tmp_path / "whole")
    t = _fit(micro, 4, tmp_path / "micro")
    assert t.global_step == 6  # optimizer steps, from 24 micro-batches
    a, b = (torch.load(tmp_path / d / "rank0.pt", weights_only=True) for d in ("whole", "micro"))
    moved = max((v - _module(1).state_dict()[k]).abs().max().item() for k, v in a["state"].items())
    assert moved > 1e-3
    for k in a["state"]:
        torch.testing.assert_close(b["state"][k], a["state"][k], rtol=0, atol=1e-6, msg=k)
    for x, y in zip(a["ema"], b["ema"]):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)


def test_the_check_can_fail(tmp_path):
    """Batch 4 x 4 micro-batches is not batch 4 in one step: the comparison above is not vacuous."""
    _fit(_module(1), 4, tmp_path / "a")
    _fit(_module(4), 4, tmp_path / "b")
    a, b = (torch.load(tmp_path / d / "rank0.pt", weights_only=True) for d in ("a", "b"))
    assert max((a["state"][k] - b["state"][k]).abs().max().item() for k in a["state"]) > 1e-4


def test_ddp_micro_batches_equal_the_whole_batch(tmp_path):
    def ddp():
        return {"devices": 2, "strategy": DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))}

    _fit(_module(1), 8, tmp_path / "whole", **ddp())
    _fit(_module(2), 4, tmp_path / "micro", **ddp())
    runs = {d: [torch.load(tmp_path / d / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
            for d in ("whole", "micro")}
    for k in runs["whole"][0]["state"]:
        torch.testing.assert_close(runs["micro"][1]["state"][k], runs["micro"][0]["state"][k], rtol=0, atol=0)
        torch.testing.assert_close(runs["micro"][0]["state"][k], runs["whole"][0]["state"][k], rtol=0, atol=1e-6)


def test_preemption_waits_for_the_end_of_the_optimizer_step(tmp_path):
    saved = []

    class Trainer:  # what the callback touches
        world_size, global_step, is_global_zero, callbacks = 1, 3, True, []

        def save_checkpoint(self, path):
            saved.append(path)

    class Module:
        accumulating = True

    cb = PreemptionCheckpoint(tmp_path / "last.ckpt")
    cb.signum = 10  # SIGUSR1 received
    cb.on_train_batch_start(Trainer(), Module())  # mid-step: nothing written, the run goes on
    assert saved == []
    Module.accumulating = False  # after the step's last micro-batch: the checkpoint is written and the run stops
    with pytest.raises(Preempted):
        cb.on_train_batch_start(Trainer(), Module())
    assert saved == [tmp_path / "last.ckpt"]


def test_real_configs_resume_exactly_and_validate_per_optimizer_step(make_cfg, tmp_path):
    base = ["debug=fast", "trainer.accelerator=cpu", "test=false", "callbacks=minimal", "checkpoint_every=4",
            "val_every=4", "datamodule.batch_size=16", "module.optim.accumulate_grad_batches=2",
            "module.evaluation.nll_every=0"]
    a, _ = resumed_and_uninterrupted(make_cfg, tmp_path, base)
    assert a["scoreflow"]["batches_seen"] == 16  # micro-batches
    rows = list(csv.DictReader(open(tmp_path / "full" / "csv" / "metrics.csv")))
    val_steps = sorted({int(r["step"]) for r in rows if r.get("val/bpd_bound")})
    # after optimizer steps 4 and 8 (micro-batches 8 and 16): the loggers' x axis is the optimizer step, 0-based as
    # without accumulation (Lightning's own axis counts micro-batches under manual optimization: it said 7 and 15)
    assert val_steps == [3, 7]
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train_steps == sorted(train_steps) and set(train_steps) <= set(range(8)), train_steps


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_loggers_axis_is_the_optimizer_step(make_cfg, tmp_path, accumulate):
    """Validation after optimizer steps 4 and 8 at 3 and 7, the speed windows (every 2 optimizer steps) at 1, 3, 5, 7,
    with or without accumulation (without: Lightning's own axis, unchanged)."""
    train(make_cfg(["debug=fast", "trainer.accelerator=cpu", "test=false", "val_every=4", "sample_every=100",
                    "checkpoint_every=100", "trainer.max_steps=8", "module.evaluation.nll_every=0",
                    "trainer.log_every_n_steps=2", f"datamodule.batch_size={32 // accumulate}",
                    f"module.optim.accumulate_grad_batches={accumulate}"]))
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    assert sorted({int(r["step"]) for r in rows if r.get("val/bpd_bound")}) == [3, 7]
    assert [int(r["step"]) for r in rows if r.get("train/img_per_s")] == [1, 3, 5, 7]
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert train_steps == sorted(train_steps) and set(train_steps) <= set(range(8)), train_steps
    assert ("epoch" in rows[0]) == (accumulate == 1)  # Lightning adds it only when no `step` is logged
