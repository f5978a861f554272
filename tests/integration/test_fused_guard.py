"""``module.optim.fused=true``: Adam(fused=True) with the NaN guard on the device (no host sync per step).

Oracles: the default guard (host checks, foreach Adam) on the same data and seeds; the weights and Adam state
before a step whose loss is NaN; a step function whose host-sync entry points raise.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scoreflow.dequantization import UniformDequantizer
from scoreflow.lit.module import NonFiniteLossError, ScoreLitModule
from scoreflow.lit.optim import adam_with_warmup
from scoreflow.nets import ScoreModel
from scoreflow.sde import VPSDE
from scoreflow.weighting import ImportanceSampledLikelihood
from tests.integration.resume_check import resumed_and_uninterrupted
from tests.integration.test_no_host_sync import no_host_reads


class _Net(nn.Module):
    """An eps-net whose output is NaN on the calls listed in ``nan_calls`` (1-based), on every process or, with
    ``rank``, on that DDP rank only."""

    def __init__(self, nan_calls=(), rank: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.calls, self.nan_calls, self.rank = 0, set(nan_calls), rank

    def forward(self, x, label):
        self.calls += 1
        out = self.lin(x.reshape(x.shape[0], -1)).reshape(x.shape)
        here = self.rank is None or (dist.is_initialized() and dist.get_rank() == self.rank)
        return out * float("nan") if here and self.calls in self.nan_calls else out


def _module(fused: bool, nan_calls=(), max_bad_steps: int = 20) -> ScoreLitModule:
    sde = VPSDE()
    return ScoreLitModule(
        ScoreModel(_Net(nan_calls), sde),
        ImportanceSampledLikelihood(sde),
        UniformDequantizer(),
        num_levels=4,
        data_shape=(1, 2, 2),
        max_bad_steps=max_bad_steps,
        optim={"warmup_steps": 2, "lr": 1e-2, "fused": fused},
        seed=3,
    )


class _Record(pl.Callback):
    """Weights and Adam's step count after every training batch."""

    def __init__(self):
        self.weights, self.adam_steps = [], []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.weights.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        opt = trainer.optimizers[0]
        self.adam_steps.append(int(opt.state[next(iter(pl_module.parameters()))]["step"]))


def _fit(module: ScoreLitModule, steps: int, tmp_path, log_every: int = 4) -> tuple[pl.Trainer, _Record]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 4, (256, 1, 2, 2)), torch.zeros(256))
    rec = _Record()
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, accelerator="cpu", log_every_n_steps=log_every, callbacks=[rec])
    trainer.fit(module, DataLoader(data, batch_size=8))
    return trainer, rec


def test_fused_equals_the_default_guard_when_every_step_is_finite(tmp_path):
    a, b = _module(False), _module(True)
    _fit(a, 12, tmp_path / "a")
    _fit(b, 12, tmp_path / "b")
    moved = 0.0
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=0, atol=1e-6, msg=k)
        moved = max(moved, (va - _module(False).state_dict()[k]).abs().max().item())
    assert moved > 1e-3  # the weights did move: the comparison can fail
    assert a.bad_steps_total == b.bad_steps_total == 0


def test_a_nan_step_changes_nothing_and_is_counted(tmp_path, capsys):
    # the net is called once per training step (dsm loss, no validation): calls 4 and 5 are steps 4 and 5
    module = _module(True, nan_calls=(4, 5))
    trainer, rec = _fit(module, 10, tmp_path)
    assert trainer.global_step == 10  # a skipped step still counts as a step (documented)
    for k in rec.weights[2]:  # after step 3 == after steps 4 and 5; step 6 moves again
        assert torch.equal(rec.weights[2][k], rec.weights[3][k]) and torch.equal(rec.weights[2][k], rec.weights[4][k])
    assert any(not torch.equal(rec.weights[4][k], rec.weights[5][k]) for k in rec.weights[4])
    assert rec.adam_steps[:6] == [1, 2, 3, 3, 3, 4]
    assert module.bad_steps_total == 2
    out = capsys.readouterr().out
    # read every 4 steps: step 4 in the read after step 4, step 5 in the next one
    assert "steps 1-4 (batch 3): 1 non-finite loss or gradient norm, optimizer step skipped" in out
    assert "steps 5-8 (batch 7): 1 non-finite" in out and "(longest streak 2; 2 in all)" in out


def test_a_streak_stops_the_run_at_the_next_read(tmp_path):
    module = _module(True, nan_calls=range(3, 100), max_bad_steps=5)
    with pytest.raises(NonFiniteLossError, match=r"non-finite steps in a row \(max_bad_steps=5\): stopping"):
        _fit(module, 50, tmp_path, log_every=4)
    assert module.bad_steps_total >= 5


class _NoHostSync(ScoreLitModule):
    """A training step in which every way of reading a tensor on the host raises."""

    def training_step(self, batch, batch_idx):
        with no_host_reads():
            return super().training_step(batch, batch_idx)


def _no_sync_module(fused: bool) -> ScoreLitModule:
    m = _module(fused, nan_calls=(2,))
    m.__class__ = _NoHostSync
    return m


def test_the_fused_step_reads_nothing_on_the_host(tmp_path):
    module = _no_sync_module(True)
    _fit(module, 6, tmp_path, log_every=1000)  # no read of the counts inside these 6 steps
    assert module.bad_steps_total == 1  # read at the end of training
    with pytest.raises(AssertionError, match="host read"):  # the check can fail: the default guard syncs
        _fit(_no_sync_module(False), 6, tmp_path / "default", log_every=1000)


def test_fused_refused_with_another_optimizer_factory():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"\['fused'\].*module.optimizer"):
        adam_with_warmup(p, {"fused": True}, factory=lambda params, lr: torch.optim.SGD(params, lr=lr))
    opt = adam_with_warmup(p, {"fused": True})["optimizer"]
    assert opt.defaults["fused"] is True


def test_fused_resume_is_exact(make_cfg, tmp_path):
    """Through the real configs: interrupted at step 4 and resumed to 8 = uninterrupted (weights, EMA, Adam)."""
    base = ["debug=fast", "trainer.accelerator=cpu", "test=false", "callbacks=minimal", "checkpoint_every=4",
            "val_every=100", "model.net.dropout=0.1", "module.optim.fused=true"]
    a, b = resumed_and_uninterrupted(make_cfg, tmp_path, base)
    assert a["optimizer_states"][0]["param_groups"][0]["fused"] is True
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        torch.testing.assert_close(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], rtol=0, atol=0)


def test_fp16_is_refused_by_the_module(tmp_path):
    """Library users building their own Trainer: fp16 stops at fit start (the CLI refuses it before anything runs,
    tests/integration/test_entry_errors.py)."""
    module = _module(False)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, accelerator="cpu", precision="16-true")
    data = TensorDataset(torch.randint(0, 4, (16, 1, 2, 2)), torch.zeros(16))
    with pytest.raises(ValueError, match=r"trainer.precision=16-true is not supported.*bf16-mixed"):
        trainer.fit(module, DataLoader(data, batch_size=8))


def _stop_message(module: ScoreLitModule, steps: int, tmp_path, ckpt_path=None) -> str:
    torch.manual_seed(0)
    data = TensorDataset(torch.randint(0, 4, (256, 1, 2, 2)), torch.zeros(256))
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, accelerator="cpu", log_every_n_steps=4)
    try:
        trainer.fit(module, DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
    except NonFiniteLossError as e:
        return str(e)
    trainer.save_checkpoint(tmp_path / "at.ckpt")
    return ""


@pytest.mark.parametrize(("nan_calls", "stop"), [((5, 6, 7), "steps 5-8 (batch 7): 3 non-finite"),
                                                 ((6,), "")])
def test_a_resumed_fused_guard_reads_and_stops_at_the_uninterrupted_runs_steps(tmp_path, capsys, nan_calls, stop):
    """The fused guard's device counts were read and reset when a checkpoint was saved, and the step of the last
    read was not kept: resumed at step 6, a streak of 3 over steps 5-7 stopped the run at step 7 ("steps 1-7: 1
    non-finite") instead of 8 ("steps 5-8: 3"), and a skipped step was reported at other steps (audit)."""
    def warnings() -> list[str]:
        return [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[scoreflow] warning")]

    whole = _module(True, nan_calls=nan_calls, max_bad_steps=3)
    assert _stop_message(whole, 10, tmp_path / "whole").startswith(stop)
    whole_warnings = warnings()
    first = _module(True, nan_calls=nan_calls, max_bad_steps=3)
    assert _stop_message(first, 6, tmp_path / "part") == ""  # saved after the fit's end (its end-of-fit report)
    warnings()
    second = _module(True, nan_calls=nan_calls, max_bad_steps=3)
    second.score_model.net.calls = 6  # the network's call count (its NaN schedule) continues
    message = _stop_message(second, 10, tmp_path / "rest", ckpt_path=tmp_path / "part" / "at.ckpt")
    assert message.startswith(stop) and warnings() == whole_warnings
    assert second.bad_steps_total == whole.bad_steps_total == len(nan_calls)
