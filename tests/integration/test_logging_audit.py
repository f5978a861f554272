"""What reaches the dashboards (logging audit): a W&B run per job, closed with the process's exit code; a skipped
step's row with its own values; TensorBoard images at the step of the numbers they belong to, and no placeholder
``hp_metric``."""

from __future__ import annotations

import math
import sys
import types

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from scoreflow.dequantization import UniformDequantizer
from scoreflow.lit.module import ScoreLitModule
from scoreflow.lit.preemption import Preempted
from scoreflow.lit.wandb_logger import finish_wandb_run
from scoreflow.nets import ScoreModel
from scoreflow.sde import VPSDE
from scoreflow.tasks.entry import _closing_wandb
from scoreflow.tasks.train import train
from scoreflow.weighting import ImportanceSampledLikelihood
from tests.integration.test_train_errors import _NaNAfter


class _FakeRun:
    def __init__(self, module: types.ModuleType):
        self.module, self.calls, self.summary = module, [], {}

    def mark_preempting(self) -> None:
        self.calls.append("preempting")

    def finish(self, exit_code: int = 0) -> None:
        self.calls.append(("finish", exit_code))
        self.module.run = None  # as wandb does: no active run after finish


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.run = None
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


@pytest.mark.parametrize(
    ("raised", "code", "preempted"),
    [(None, 0, False), (Preempted(15, 7, "/r/last.ckpt", requeue=False, is_global_zero=True), 143, True),
     (KeyboardInterrupt(), 130, True), (ZeroDivisionError(), 1, False)],
    ids=["finished", "sigterm", "ctrl-c", "crash"],
)
def test_the_entry_point_closes_the_wandb_run_with_the_exit_code(fake_wandb, raised, code, preempted):
    """Every command's task runs inside ``_closing_wandb``: the W&B run it left open is finished with the code the
    process exits with, and marked pre-empted when a signal stopped it. Before, nothing finished it: a stopped run
    was recorded as a success (exit code 0) and the next job of an in-process sweep logged into it."""
    run = fake_wandb.run = _FakeRun(fake_wandb)

    def task(cfg):
        if raised is not None:
            raise raised
        return "ok"

    if raised is None:
        assert _closing_wandb(task, None) == "ok"
    else:
        with pytest.raises(type(raised)):
            _closing_wandb(task, None)
    assert run.calls == (["preempting"] if preempted else []) + [("finish", code)]
    assert fake_wandb.run is None and finish_wandb_run(0) is False  # nothing left to close


def test_finish_adds_the_run_numbers_to_the_summary(fake_wandb):
    run = fake_wandb.run = _FakeRun(fake_wandb)
    assert finish_wandb_run(0, summary={"train/img_per_s": 498.0, "protocol": "eps=1e-5"}) is True
    assert run.summary == {"train/img_per_s": 498.0, "protocol": "eps=1e-5"} and run.calls == [("finish", 0)]


def test_a_skipped_step_logs_its_own_values_not_the_last_good_steps(monkeypatch):
    """A step skipped for a non-finite loss logs its own gradient norm (NaN) and loss variance next to its NaN loss.
    Before (audit), its row repeated the last finite step's ``train/grad_norm``, ``train/lr`` and
    ``train/loss_var``: a diverging run looked normal on the dashboard."""
    logged: list[tuple[int, str, float]] = []
    real_log = ScoreLitModule.log

    def spy(self, name, value, *args, **kwargs):
        if name.startswith("train/"):
            logged.append((self.global_step, name, float(value)))
        return real_log(self, name, value, *args, **kwargs)

    monkeypatch.setattr(ScoreLitModule, "log", spy)
    sde = VPSDE()
    module = ScoreLitModule(ScoreModel(_NaNAfter(3), sde), ImportanceSampledLikelihood(sde), UniformDequantizer(),
                            num_levels=4, data_shape=(1, 2, 2), max_bad_steps=3, optim={"warmup_steps": 1})
    data = TensorDataset(torch.randint(0, 4, (64, 1, 2, 2)), torch.zeros(64))
    trainer = pl.Trainer(max_steps=50, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         accelerator="cpu", log_every_n_steps=1)
    with pytest.raises(Exception, match="non-finite"):
        trainer.fit(module, DataLoader(data, batch_size=8))
    rows: list[dict[str, float]] = []  # one per logged batch: it starts with its train/loss
    for _, name, value in logged:
        if name == "train/loss":
            rows.append({})
        if rows:
            rows[-1][name] = value
    good = [r["train/grad_norm"] for r in rows if math.isfinite(r["train/loss"])]
    bad = [r for r in rows if not math.isfinite(r["train/loss"])]
    assert len(good) == 3 and len(bad) >= 2, rows
    for row in bad:
        assert math.isnan(row["train/grad_norm"]) and math.isnan(row["train/loss_var"]), row


def test_tensorboard_images_sit_at_their_steps_without_a_placeholder_hp_metric(make_cfg, tmp_path):
    """``logger=tensorboard``: the sample grid drawn in the validation after 20 steps is at that validation's step
    (19; it was at 20, one to the right), the final plot at the test values' step, in the training's event file
    (it went to a third one, at step 0), and no ``hp_metric`` = -1 (Lightning's placeholder, which TensorBoard's
    HPARAMS tab compared runs on)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_cfg(["debug=fast", "trainer.accelerator=cpu", "logger=tensorboard", "callbacks=default",
                    "trainer.max_steps=20", "val_every=10", "sample_every=10", "module.evaluation.nll_every=0",
                    "datamodule.test_subset=4"]))
    folder = tmp_path / "run" / "tensorboard"
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "hp_metric" not in tags["scalars"]
    val_steps = [e.step for e in acc.Scalars("val/bpd_bound")]
    assert val_steps == [9, 19]
    assert [e.step for e in acc.Images("samples")] == val_steps
    assert [e.step for e in acc.Images("plots/bpd_vs_step")] == [e.step for e in acc.Scalars("test/bpd_ode")] == [20]
    assert len(list(folder.glob("events.out.tfevents.*"))) <= 2, list(folder.iterdir())
