"""The training loop's schedules, from the audit of the Lightning glue: validation every ``val_every`` optimizer
steps (not training batches: a skipped step or a micro-batch is a batch), the ODE validation's and the sample
grid's schedules and the NaN guard's streak across a resume, the learning rate a step logs, a resume that changes
the warm-up/decay, and the ODE subset when the last validation batch is smaller."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from scoreflow.lit.callbacks import SampleGrid, StepValidation
from scoreflow.lit.optim import adam_with_warmup, apply_requested_settings, lr_factor
from scoreflow.lit.settings import OptimConfig
from tests.integration.test_fused_guard import _module


class _Validations(pl.Callback):
    def __init__(self):
        self.at, self.counts = [], []

    def on_validation_epoch_end(self, trainer, pl_module):  # before the module's own hook resets the means
        self.at.append((trainer.global_step, "ODE" if pl_module.val_ode.count else "bound"))
        self.counts.append((int(pl_module.val_bound.count), int(pl_module.val_ode.count)))


def _fit(module, steps, val_every, callbacks, val_batch=8, n_val=8, logger=False):
    module.eval_cfg = type(module.eval_cfg).from_mapping({"val_num_t": 4, "nll_every": 6, "nll_subset": 30,
                                                          "method": "rk4", "steps": 2})
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         accelerator="cpu", val_check_interval=val_every, num_sanity_val_steps=0,
                         enable_model_summary=False, log_every_n_steps=1, check_val_every_n_epoch=None,
                         callbacks=[*callbacks, StepValidation(val_every)])
    train = TensorDataset(torch.randint(0, 4, (256, 1, 2, 2)), torch.zeros(256))
    val = TensorDataset(torch.randint(0, 4, (n_val, 1, 2, 2)), torch.zeros(n_val))
    trainer.fit(module, DataLoader(train, batch_size=8), DataLoader(val, batch_size=val_batch))
    return trainer


@pytest.mark.parametrize("fused", [False, True])
def test_validation_follows_optimizer_steps_through_a_skipped_step(fused):
    """A NaN at the second network call: the default guard skips that step (no global_step), the fused one takes a
    no-op step. Either way: validations at steps 3 and 6, the ODE at 6 (was, default guard: at 2 and 5, no ODE)."""
    rec = _Validations()
    module = _module(fused, nan_calls=(2,))
    trainer = _fit(module, 6, 3, [rec])
    assert trainer.global_step == 6 and module.bad_steps_total == 1
    assert rec.at == [(3, "bound"), (6, "ODE")]


@pytest.mark.parametrize("fused", [False, True])
def test_the_loggers_x_axis_is_the_optimizer_step_through_a_skipped_step(tmp_path, fused):
    """A NaN at the second network call. The default guard skips that step: its row is logged at the step it
    attempted (1), the step taken with the next batch at 1 too, and everything after as without the skip (was: one
    step late, the validations after 3 and 6 steps at 3 and 6 instead of 2 and 5). The fused guard's no-op step is
    a step: Lightning's axis."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    _fit(_module(fused, nan_calls=(2,)), 6, 3, [], logger=CSVLogger(tmp_path, name="", version=""))
    rows = [(int(r["step"]), "val" if r.get("val/bpd_bound") else "nan" if r["train/loss"] == "nan" else "loss")
            for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("val/bpd_bound") or r.get("train/loss")]
    taken = [(k, "loss") for k in range(6)]
    if fused:  # the no-op step is step 1; six steps in all
        taken[1] = (1, "nan")
    else:
        taken.insert(1, (1, "nan"))
    assert rows == [*taken[: 3 + (not fused)], (2, "val"), *taken[3 + (not fused):], (5, "val")]


def test_the_ode_subset_counts_images_when_the_last_validation_batch_is_smaller():
    """32 validation images in batches of 12 (12, 12, 8) with nll_subset=30: 30 ODE values (was 32)."""
    rec = _Validations()
    _fit(_module(False), 6, 6, [rec], val_batch=12, n_val=32)
    assert rec.counts == [(32, 30)]


def test_schedules_and_the_guard_streak_survive_a_checkpoint():
    module = _module(False)
    module._last_ode_step, module._bad_in_a_row = 15, 3
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    again = _module(False)
    again.on_load_checkpoint(ckpt)
    assert (again._last_ode_step, again._bad_in_a_row) == (15, 3)
    old = _module(False)  # a checkpoint of an earlier release: neither key
    old.on_load_checkpoint({"scoreflow": {"batches_seen": 4}})
    assert (old._last_ode_step, old._bad_in_a_row) == (0, 0)
    fused = _module(True)
    fused.on_load_checkpoint(ckpt)
    fused._count_bad(torch.tensor(1))  # the device's streak goes on from the stored one
    assert int(fused._bad_counts[1]) == 4
    grid = SampleGrid(every_n_steps=10)
    grid._last = 20
    restored = SampleGrid(every_n_steps=10)
    restored.load_state_dict(grid.state_dict())
    assert restored._last == 20


def test_the_logged_learning_rate_is_the_rate_of_its_step(tmp_path):
    """lr 1e-2 with 2 warm-up steps: step 0 updates at 0.005 (was logged: 0.01, the next step's)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = _module(False)
    _fit(module, 3, 100, [], logger=CSVLogger(tmp_path, name="", version=""))
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/lr")]
    logged = {int(r["step"]): float(r["train/lr"]) for r in rows}
    assert logged[0] == pytest.approx(1e-2 * lr_factor(0, 2)) == pytest.approx(0.005)
    assert logged[1] == pytest.approx(1e-2)


def test_a_resume_with_another_schedule_applies_it_from_its_first_step():
    """Same lr, decay_steps 10 on a run of 10 steps resumed: its factor at step 10 is 0, so the stored rate (the old
    schedule's, 6e-3) must not be used (was: one step at 6e-3, nothing logged)."""
    w = [torch.nn.Parameter(torch.zeros(2))]
    old = adam_with_warmup(w, {"lr": 6e-3, "warmup_steps": 5})
    opt, sched = old["optimizer"], old["lr_scheduler"]["scheduler"]
    for _ in range(10):
        opt.step()
        sched.step()
    state = (opt.state_dict(), sched.state_dict())
    new_cfg = OptimConfig.from_mapping({"lr": 6e-3, "warmup_steps": 5, "decay_steps": 10})
    new = adam_with_warmup(w, new_cfg)
    opt2, sched2 = new["optimizer"], new["lr_scheduler"]["scheduler"]
    opt2.load_state_dict(state[0])
    sched2.load_state_dict(state[1])
    assert opt2.param_groups[0]["lr"] == pytest.approx(6e-3)  # what Lightning's restore leaves
    changes = apply_requested_settings(opt2, sched2, new_cfg, builtin_adam=True)
    assert any("warm-up/decay" in c for c in changes), changes
    assert opt2.param_groups[0]["lr"] == 0.0 and sched2.get_last_lr()[0] == 0.0
    assert math.isclose(lr_factor(10, 5, 10), 0.0, abs_tol=1e-15)
    same = adam_with_warmup(w, {"lr": 6e-3, "warmup_steps": 5})  # an exact resume: nothing changes
    opt3, sched3 = same["optimizer"], same["lr_scheduler"]["scheduler"]
    opt3.load_state_dict(state[0])
    sched3.load_state_dict(state[1])
    assert apply_requested_settings(opt3, sched3, OptimConfig.from_mapping({"lr": 6e-3, "warmup_steps": 5}),
                                    builtin_adam=True) == []


def test_a_resume_on_another_number_of_processes_says_it_is_not_a_continuation(caplog):
    """DDP audit: 2 processes -> 1 resumed silently; the data stream repeated images of the epoch and the global
    batch halved. The checkpoint now records the world size and per-process batch, and the resume warns."""
    import logging
    from types import SimpleNamespace

    module = _module(False)
    module._trainer = SimpleNamespace(world_size=1, is_global_zero=True, datamodule=SimpleNamespace(batch_size=32))
    with caplog.at_level(logging.WARNING, logger="scoreflow.lit.module"):
        module.on_load_checkpoint({"scoreflow": {"world_size": 2, "batch_size": 32}})
    assert ("trained on 2 process(es), this run has 1; the global batch changes from 64 to 32 images "
            "(datamodule.batch_size=32 per process)") in caplog.text
    assert "keep the global batch" not in caplog.text  # the training split's size is unknown here
    caplog.clear()
    dm = SimpleNamespace(batch_size=64, splits={"train": range(96)})
    module._trainer = SimpleNamespace(world_size=1, is_global_zero=True, datamodule=dm)
    with caplog.at_level(logging.WARNING, logger="scoreflow.lit.module"):
        module.on_load_checkpoint({"scoreflow": {"world_size": 2, "batch_size": 32}})  # 2 x 32 -> 1 x 64
    assert "the same global batch of 64 images" in caplog.text and "not bit for bit" in caplog.text
    caplog.clear()
    dm.splits = {"train": range(97)}  # 2 processes used 96 images an epoch, 1 uses 97: the epochs differ
    with caplog.at_level(logging.WARNING, logger="scoreflow.lit.module"):
        module.on_load_checkpoint({"scoreflow": {"world_size": 2, "batch_size": 32}})
    assert "data order does not continue" in caplog.text and "global batch changes" not in caplog.text
    caplog.clear()
    dm.batch_size, dm.splits = 32, {"train": range(96)}
    with caplog.at_level(logging.WARNING, logger="scoreflow.lit.module"):
        module.on_load_checkpoint({"scoreflow": {"world_size": 2, "batch_size": 32}})
    assert "keep the global batch of 64 images (datamodule.batch_size=64)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scoreflow.lit.module"):
        module.on_load_checkpoint({"scoreflow": {"world_size": 1, "batch_size": 32}})  # the same: nothing said
        module.on_load_checkpoint({"scoreflow": {}})  # an earlier release's checkpoint: unknown, nothing said
    assert "process(es)" not in caplog.text
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    assert (ckpt["scoreflow"]["world_size"], ckpt["scoreflow"]["batch_size"]) == (1, 32)


@pytest.mark.parametrize("n, start", [(96, 0), (96, 5), (100, 3), (101, 7)])
def test_a_step_takes_the_same_images_on_any_number_of_processes_with_the_same_global_batch(n, start):
    """Step g of W processes with B images each takes the images at positions [g W B, (g + 1) W B) of the stream,
    so 4 x 4, 2 x 8 and 1 x 16 take the same images at every step, across epoch boundaries and from a resume at
    step `start`, as long as their epochs use as many images (n = 101: 4 processes use 100, 1 uses 101)."""
    from scoreflow.lit.datamodule import ResumableSampler

    def steps(world: int, count: int = 20) -> list[list[int]]:  # each step's images, sorted
        b = 16 // world
        streams = [iter(ResumableSampler(n, 7, r, world, start=start * b)) for r in range(world)]
        return [sorted(next(s) for s in streams for _ in range(b)) for _ in range(count)]

    one, two, four = steps(1), steps(2), steps(4)  # 20 steps of 16 > 101: an epoch boundary is crossed
    assert two == four == one if n % 4 == 0 else two == four != one


def test_fewer_validation_or_test_images_than_processes_are_accepted(make_cfg):
    """DDP audit: test_subset=1 on 2 processes died after training with Lightning's 'zero length' traceback, and
    was then refused before the run. Validation and test now take whole batches with a padding batch on a rank
    left without one (test_ddp_wandb_sweep.py): any subset works on any number of processes, for the score model
    and the classifier."""
    from scoreflow.tasks import validate

    ddp = ["trainer.devices=4", "trainer.accelerator=cpu", "datamodule.val_subset=1", "datamodule.test_subset=1"]
    validate.common_training(make_cfg(ddp), check_data_root=False)
    validate.common_training(make_cfg(ddp, config_name="train_classifier"), check_data_root=False)


@pytest.mark.slow  # ~30 s: two processes
def test_an_ode_subset_smaller_than_the_processes_validates_on_every_rank(tmp_path):
    """DDP audit: nll_subset=1 on 2 processes left rank 1 without ODE values; it skipped the synced compute that
    rank 0 entered, and gloo aborted ('collective mismatch'; NCCL would hang). Rank 1 now enters it with an empty
    list (and the value is one process's: test_ddp_wandb_sweep.py)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "train.py", "debug=fast", "trainer=ddp_cpu", "trainer.max_steps=4", "test=false",
           "val_every=2", "module.evaluation.nll_every=2", "module.evaluation.nll_subset=1",
           f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["val/bpd_ode"])


@pytest.mark.parametrize("old, new", [((1, 32), (1, 64)), ((1, 64), (1, 16)), ((2, 16), (1, 32)), ((1, 32), (2, 8))])
def test_a_resume_with_another_batch_size_continues_at_the_next_image(old, new):
    """(processes, per-process batch) before and after a resume: the resumed stream starts at the first image the
    interrupted run had not taken, so the epoch's images are each taken once (counting batches of the new size,
    10 batches of 32 resumed at 64 started at image 640: images 320-639 of the epoch were never used). A checkpoint
    of an earlier release (no ``samples_seen``) is placed from its stored batch size and process count."""
    from types import SimpleNamespace

    from scoreflow.lit.datamodule import ScoreDataModule

    n, steps = 1000, 10
    (w0, b0), (w1, b1) = old, new

    module = _module(False)
    module._trainer = SimpleNamespace(world_size=w0, is_global_zero=True, datamodule=SimpleNamespace(batch_size=b0))
    module.batches_seen = steps
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    assert ckpt["scoreflow"]["samples_seen"] == steps * w0 * b0
    for state in (ckpt["scoreflow"], {k: v for k, v in ckpt["scoreflow"].items() if k != "samples_seen"}):
        resumed = _module(False)
        dm = ScoreDataModule(None, batch_size=b1)
        dm.splits = {"train": range(n)}
        resumed._trainer = SimpleNamespace(world_size=w1, is_global_zero=False, datamodule=dm, lightning_module=resumed)
        resumed.on_load_checkpoint({"scoreflow": state})
        assert resumed.samples_seen == steps * w0 * b0
        dm.trainer = resumed._trainer
        dm._rank_world = lambda: (0, w1)
        sampler = dm.train_dataloader().sampler
        assert sampler.start == steps * w0 * b0 // w1  # this rank's position: the images taken so far / processes
        resumed.batches_seen += 3  # three more steps at the new size
        assert resumed.samples_seen == steps * w0 * b0 + 3 * w1 * b1


def test_a_resume_with_another_batch_size_on_as_many_processes_says_it_is_not_the_same_run(caplog):
    """Another datamodule.batch_size at a resume on the same number of processes was silent (resume audit), while
    another process count is said; both continue the data stream at the next image."""
    from types import SimpleNamespace

    module = _module(False)
    module._trainer = SimpleNamespace(world_size=1, is_global_zero=True, datamodule=SimpleNamespace(batch_size=32))
    module.batches_seen = 4
    ckpt: dict = {}
    module.on_save_checkpoint(ckpt)
    for batch, said in ((16, True), (32, False)):
        resumed = _module(False)
        resumed._trainer = SimpleNamespace(world_size=1, is_global_zero=True,
                                           datamodule=SimpleNamespace(batch_size=batch))
        caplog.clear()
        with caplog.at_level("WARNING", logger="scoreflow.lit.module"):
            resumed.on_load_checkpoint(ckpt)
        assert ("datamodule.batch_size=32, this run has 16" in caplog.text) == said, caplog.text
