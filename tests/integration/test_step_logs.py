"""Per-step training values (``train/loss``, ``train/grad_norm``, ``train/lr``, ``train/loss_var``) reach Lightning's
``self.log`` only on the batches whose logs Lightning writes (``GuardedOptimization.log_step``): the loggers get
exactly what a ``self.log`` at every batch gave them, under gradient accumulation, and when a callback stops
training between two logging steps (Lightning then writes that step's logs)."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest

from scoreflow.lit.module import ScoreLitModule
from scoreflow.lit.optim import GuardedOptimization
from scoreflow.tasks.train import train

TIMING = ("train/img_per_s", "train/tflops", "train/mfu")  # wall-clock measurements differ between any two runs
BASE = ["debug=fast", "trainer.accelerator=cpu", "test=false", "callbacks=minimal", "trainer.log_every_n_steps=3",
        "datamodule.batch_size=16", "trainer.max_steps=12", "val_every=5"]


class StopAtStep(pl.Callback):
    """Stops training at the end of optimizer step ``step`` (as Lightning's Timer does on ``trainer.max_time``)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _rows(path):
    rows = list(csv.DictReader(open(path / "csv" / "metrics.csv")))
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.parametrize("extra", [[], ["+callbacks.stop._target_=tests.integration.test_step_logs.StopAtStep",
                                        "+callbacks.stop.step=7"]],
                         ids=["plain", "stopped-between-log-steps"])
def test_loggers_get_what_logging_every_step_gave(make_cfg, tmp_path, monkeypatch, extra):
    calls = []
    real_log = ScoreLitModule.log

    def counting_log(self, name, *args, **kwargs):
        calls.append(name)
        return real_log(self, name, *args, **kwargs)

    monkeypatch.setattr(ScoreLitModule, "log", counting_log)
    train(make_cfg([*BASE, *extra], sub="gated"))
    gated = [c for c in calls if c.startswith("train/")]
    calls.clear()
    with monkeypatch.context() as m:  # the former behaviour: every batch's values go through self.log
        m.setattr(GuardedOptimization, "_step_logs_written_now", lambda self: True)
        train(make_cfg([*BASE, *extra], sub="every"))
    every = [c for c in calls if c.startswith("train/")]
    a, b = _rows(tmp_path / "gated"), _rows(tmp_path / "every")
    assert a == b
    assert {"train/loss", "train/grad_norm", "train/lr", "train/loss_var"} <= set(a[0]) and len(a) >= 3
    assert 0 < len(gated) <= len(every) / 2, (len(gated), len(every))
    if extra and "stop" in extra[0]:
        steps = [int(r["step"]) for r in a if r["train/loss"]]
        assert steps[-1] == 6, steps  # the stopping step (7, logged at 6 as Lightning does) is written, not stale


def test_under_accumulation_a_row_holds_its_own_steps_values(make_cfg, tmp_path, monkeypatch):
    """module.optim.accumulate_grad_batches=2: a logged row of optimizer step s has the mean loss of s's two
    micro-batches and s's own gradient norm. Was (audit): the loss of s's first micro-batch alone, and the gradient
    norm and loss variance of step s - 1, because the values went out at whichever micro-batch Lightning logged."""
    import torch

    losses, norms = {}, {}
    real_loss, real_step = ScoreLitModule.training_loss, GuardedOptimization.guarded_step

    def record_loss(self, *args, **kwargs):
        loss, extra = real_loss(self, *args, **kwargs)
        losses.setdefault(self.global_step, []).append(float(loss))
        return loss, extra

    def record_step(self, loss, batch_index):
        step = self.global_step
        gnorm = real_step(self, loss, batch_index)
        if gnorm is not None:
            norms[step] = float(gnorm)
        return gnorm

    monkeypatch.setattr(ScoreLitModule, "training_loss", record_loss)
    monkeypatch.setattr(GuardedOptimization, "guarded_step", record_step)
    train(make_cfg([*BASE, "module.optim.accumulate_grad_batches=2", "trainer.log_every_n_steps=1"], sub="acc"))
    rows = [r for r in _rows(tmp_path / "acc") if r.get("train/loss")]
    # one row per optimizer step: Lightning, which counts micro-batches, wrote each step's row twice (its values
    # again at the same step; audit) until fit() gave it log_every_n_steps x accumulate_grad_batches
    assert [int(r["step"]) for r in rows] == list(range(12))
    by_step = {int(r["step"]): r for r in rows}
    for r in by_step.values():
        s = int(r["step"])
        assert len(losses[s]) == 2
        assert float(r["train/loss"]) == pytest.approx(sum(losses[s]) / 2, rel=1e-5), (s, r, losses[s])
        assert float(r["train/grad_norm"]) == pytest.approx(norms[s], rel=1e-5), (s, r, norms[s])
    assert torch.isfinite(torch.tensor([float(r["train/loss"]) for r in by_step.values()])).all()
