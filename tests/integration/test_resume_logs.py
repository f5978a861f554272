"""A resumed run keeps its logs: ``csv/metrics.csv`` continues from the checkpoint's step (the rows before it kept,
rows an interrupted run logged after it dropped, new columns added without losing old rows), ``metrics.json``
keeps the earlier segment's numbers, a run resumed from another folder's checkpoint starts with that run's rows,
and a checkpoint already at ``trainer.max_steps`` resumed into a new folder goes straight to the test phase."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scoreflow.tasks.train import train
from tests.integration.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
# val_every=10: validation rows at step 9 and 19; log_every_n_steps=5 (debug=fast): training rows at 4, 9, 14, 19
BASE = ["debug=fast", "trainer.accelerator=cpu", "test=false", "callbacks=minimal", "checkpoint_every=1000"]
STEPS = 20


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def steps(run: Path) -> list[int]:
    return [int(float(r["step"])) for r in rows(run)]


def losses(run: Path) -> dict[int, str]:
    return {int(float(r["step"])): r["train/loss"] for r in rows(run) if r.get("train/loss")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """A run of ``STEPS`` steps in one go (its folder is only read by the tests)."""
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(compose_cfg([*BASE, f"trainer.max_steps={STEPS}"], run))
    return run


def test_resume_in_place_continues_the_csv_log_and_keeps_tensorboard(uninterrupted, make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg([*BASE, "logger=tensorboard", "trainer.max_steps=15"]))
    before = losses(run)
    assert steps(run) == [4, 9, 9, 14]
    events = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events

    train(make_cfg([*BASE, "logger=tensorboard", f"trainer.max_steps={STEPS}"]))  # auto_resume in its folder
    assert steps(run) == steps(uninterrupted) == [4, 9, 9, 14, 19, 19]  # none lost, none twice
    assert {s: v for s, v in losses(run).items() if s < 15} == before == \
        {s: v for s, v in losses(uninterrupted).items() if s < 15}
    assert losses(run) == losses(uninterrupted)  # the resumed rows too: each step's value under its own step
    assert set(events) < set((run / "tensorboard").glob("events.out.tfevents.*"))  # appended, not wiped


@pytest.mark.slow  # about 25 s on 2 cores: `make test-all` runs it
def test_rows_logged_after_the_checkpoint_are_dropped(uninterrupted, make_cfg, tmp_path):
    """An interrupted run whose log went past its last checkpoint (a periodic checkpoint, then a crash): the
    resumed run logs those steps again, so the log keeps only the rows before the checkpoint's step."""
    run = tmp_path / "run"
    train(make_cfg([*BASE, "trainer.max_steps=15"]))
    shutil.copy(run / "checkpoints" / "last.ckpt", tmp_path / "step15.ckpt")
    train(make_cfg([*BASE, f"trainer.max_steps={STEPS}"]))
    assert steps(run)[-2:] == [19, 19]
    shutil.copy(tmp_path / "step15.ckpt", run / "checkpoints" / "last.ckpt")  # the log now runs past the checkpoint

    train(make_cfg([*BASE, f"trainer.max_steps={STEPS}"]))
    assert steps(run) == steps(uninterrupted)


def test_columns_that_differ_between_segments_keep_every_row(make_cfg, tmp_path):
    """A segment that brings columns the log lacks makes Lightning rewrite the file with the union of the columns;
    one that lacks some of the log's columns must not drop them, nor the rows that hold them (Lightning's writer,
    not told the log's columns, rewrote the file with its own and raised on the old rows)."""
    run = tmp_path / "run"
    train(make_cfg([*BASE, "trainer.max_steps=8", "val_every=1000"]))  # no validation: no val/* columns
    first = rows(run)
    assert steps(run) == [4] and not any(k.startswith("val/") for k in first[0])
    train(make_cfg([*BASE, "trainer.max_steps=15", "val_every=10"]))  # new columns: val/* at step 9
    second = rows(run)
    assert steps(run) == [4, 9, 9, 14] and second[2]["val/bpd_bound"]
    assert {k: v for k, v in second[0].items() if k in first[0]} == first[0] and not second[0]["val/bpd_bound"]
    train(make_cfg([*BASE, f"trainer.max_steps={STEPS}", "val_every=1000"]))  # training columns only
    assert steps(run) == [4, 9, 9, 14, 19]
    assert rows(run)[:4] == second and rows(run)[-1]["train/loss"]


@pytest.mark.slow  # about 20 s on 2 cores: `make test-all` runs it
def test_rerunning_a_finished_folder_keeps_its_logs_and_metrics(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg([*BASE, f"trainer.max_steps={STEPS}"]))
    csv_before = (run / "csv" / "metrics.csv").read_text()
    first = json.loads((run / "metrics.json").read_text())
    assert "val/bpd_bound" in first and "test/bpd_bound" not in first

    again = train(make_cfg([*BASE, f"trainer.max_steps={STEPS}", "test=true"]))  # only the test phase
    assert (run / "csv" / "metrics.csv").read_text() == csv_before
    second = json.loads((run / "metrics.json").read_text())
    kept = [k for k in first if k.startswith(("val/", "train/"))]
    assert kept and {k: second[k] for k in kept} == {k: first[k] for k in kept}  # training numbers: the training's
    assert "test/bpd_bound" in second and again["val/bpd_bound"] == first["val/bpd_bound"]


@pytest.mark.slow  # 13-15 s on 2 cores: `make test-all` runs it
def test_ckpt_path_of_another_folder_starts_with_the_source_rows(uninterrupted, make_cfg, tmp_path):
    source = tmp_path / "source"
    train(make_cfg([*BASE, "trainer.max_steps=15"], sub="source"))
    source_csv = (source / "csv" / "metrics.csv").read_text()
    train(make_cfg([*BASE, f"trainer.max_steps={STEPS}", f"ckpt_path={source / 'checkpoints' / 'last.ckpt'}"],
                   sub="new"))
    assert steps(tmp_path / "new") == steps(uninterrupted)
    assert {s: v for s, v in losses(tmp_path / "new").items() if s < 15} == losses(source)
    assert (source / "csv" / "metrics.csv").read_text() == source_csv  # the source run is left as it was


def test_a_finished_checkpoint_into_a_new_folder_goes_to_the_test_phase(uninterrupted, tmp_path):
    """The terminal: no traceback, one line naming max_steps, no ModelCheckpoint note about its dirpath."""
    ckpt = uninterrupted / "checkpoints" / "last.ckpt"
    new = tmp_path / "new"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_SERVICE", "_WANDB"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "train.py", *[o for o in BASE if o != "test=false"], f"trainer.max_steps={STEPS}",
           "extras.print_config=false", f"ckpt_path={ckpt}", f"hydra.run.dir={new}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown[-3000:]
    assert "Traceback" not in shown and "The dirpath has changed" not in shown, shown[-3000:]
    lines = [ln for ln in shown.splitlines() if "raise trainer.max_steps to train further" in ln]
    assert len(lines) == 1 and f"already at step {STEPS}, trainer.max_steps={STEPS}" in lines[0], shown[-3000:]
    metrics = json.loads((new / "metrics.json").read_text())
    assert metrics["train/steps"] == STEPS and "test/bpd_bound" in metrics and "test/bpd_ode" in metrics
    assert steps(new) == steps(uninterrupted)  # the source run's curve
    assert not (new / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow  # 13-15 s on 2 cores: `make test-all` runs it
def test_training_time_adds_up_over_segments(make_cfg, tmp_path, capsys):
    """``train/wall_time_s`` of a resumed run is the time of every segment's training, not the last segment's
    alone: each checkpoint holds the training time of its weights (``TrainingClock``) and the next segment adds
    its own. A checkpoint written before the clock existed counts as unknown time (one segment)."""
    import torch

    from scoreflow.tasks.common import TRAINING_TIME_KEY, checkpoint_training_time

    run = tmp_path / "run"
    first = train(make_cfg([*BASE, "trainer.max_steps=10"]))
    ckpt = run / "checkpoints" / "last.ckpt"
    first_s, segments = checkpoint_training_time(ckpt)
    assert segments == 1 and first["train/segments"] == 1
    assert 0 < first_s <= first["wall_time_s"]

    capsys.readouterr()
    second = train(make_cfg([*BASE, "trainer.max_steps=15"]))
    table = capsys.readouterr().out
    assert re.search(r"wall time +\d+ s \(this command\)\n +training time +\d+ s in 2 segments \(resumed\)", table)
    assert second["train/segments"] == 2 == json.loads((run / "metrics.json").read_text())["train/segments"]
    own = second["train/wall_time_s"] - first_s  # this segment's part: positive, within this command's time
    assert 0 < own <= second["wall_time_s"]
    assert checkpoint_training_time(ckpt) == pytest.approx((second["train/wall_time_s"], 2), rel=0.05)

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    del state[TRAINING_TIME_KEY]  # as written by a release before the clock
    torch.save(state, ckpt)
    assert checkpoint_training_time(ckpt) == (0.0, 0)
    third = train(make_cfg([*BASE, "trainer.max_steps=20"]))
    assert third["train/segments"] == 1 and third["train/wall_time_s"] <= third["wall_time_s"]


def test_resume_applies_the_requested_optimizer_settings(make_cfg, tmp_path, caplog):
    """Lightning's restore brings back the checkpoint's learning rate and Adam settings: a resumed run given
    another ``module.optim.lr`` / ``betas`` trains with the requested ones (the schedule's step kept) and says so;
    unchanged settings resume exactly and silently."""
    import logging

    import torch

    cfg = [*BASE, "trainer.log_every_n_steps=1", "module.optim.warmup_steps=40"]
    reference = tmp_path / "ref"
    train(compose_cfg([*cfg, "module.optim.lr=2e-3", f"trainer.max_steps={STEPS}"], reference))
    ref_lr = {int(float(r["step"])): float(r["train/lr"]) for r in rows(reference) if r.get("train/lr")}

    run = tmp_path / "run"
    train(make_cfg([*cfg, "module.optim.lr=2e-3", "trainer.max_steps=10"]))
    with caplog.at_level(logging.WARNING):
        train(make_cfg([*cfg, "module.optim.lr=1e-3", "module.optim.betas=[0.8,0.99]", f"trainer.max_steps={STEPS}"]))
    lr = {int(float(r["step"])): float(r["train/lr"]) for r in rows(run) if r.get("train/lr")}
    assert sorted(lr) == sorted(ref_lr) == list(range(STEPS))
    for step, value in lr.items():  # the warm-up factor of each step, times the lr of the segment
        assert value == pytest.approx(ref_lr[step] * (1.0 if step < 10 else 0.5), rel=1e-6), step
    changed = [r.getMessage() for r in caplog.records if "module.optim differs" in r.getMessage()]
    assert len(changed) == 1 and "lr 0.002 -> 0.001" in changed[0] and "betas (0.9, 0.999) -> (0.8, 0.99)" in \
        changed[0] and "from step 10" in changed[0]
    group = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["optimizer_states"][0]["param_groups"][0]
    assert group["initial_lr"] == 1e-3 and tuple(group["betas"]) == (0.8, 0.99)

    caplog.clear()  # the same settings again: no change reported
    with caplog.at_level(logging.WARNING):
        train(make_cfg([*cfg, "module.optim.lr=1e-3", "module.optim.betas=[0.8,0.99]", "trainer.max_steps=25"]))
    assert not [r for r in caplog.records if "module.optim differs" in r.getMessage()]


def test_best_checkpoint_after_resuming_from_a_periodic_checkpoint(tmp_path):
    """A run stopped after its periodic ``last.ckpt`` and the validation that followed (which wrote ``best-10``)
    resumes from that ``last.ckpt``, whose state does not know ``best-10`` (Lightning does not redo the
    validation): the resumed run adopts it, so the folder ends with the ``best`` files of an uninterrupted run,
    with the same scores, and no stale or ``-v1`` file beside them."""
    import torch

    cfg = ["debug=fast", "trainer.accelerator=cpu", "test=false", "val_every=5", "checkpoint_every=5",
           "module.evaluation.nll_every=1000", "sample_every=0", "logger=none"]

    def best(run: Path) -> dict[str, float]:
        out = {}
        for path in sorted((run / "checkpoints").glob("best*.ckpt")):
            state = next(v for k, v in torch.load(path, weights_only=True)["callbacks"].items() if "Best" in k)
            out[path.name] = float(state["best_k_models"][next(k for k in state["best_k_models"]
                                                             if Path(k).name == path.name)])
        return out

    reference = tmp_path / "reference"
    train(compose_cfg([*cfg, "trainer.max_steps=15"], reference))
    run = tmp_path / "run"
    train(compose_cfg([*cfg, "trainer.max_steps=10", "callbacks.periodic.filename='periodic-{step}'",
                       "callbacks.periodic.save_top_k=-1"], run))
    assert set(best(run)) == {"best-10.ckpt"}  # the validation at step 10 came after the periodic checkpoint
    shutil.copy(run / "checkpoints" / "periodic-step=10.ckpt", run / "checkpoints" / "last.ckpt")  # a stop right there
    for path in (run / "checkpoints").glob("periodic-*.ckpt"):
        path.unlink()
    train(compose_cfg([*cfg, "trainer.max_steps=15"], run))
    assert best(run) == best(reference) and len(best(reference)) == 1
