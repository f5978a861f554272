"""DDP on 2 CPU processes, offline W&B logging, and Hydra multirun sweeps with the sweep table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scoreflow.lit.module import step_seed
from scoreflow.tasks.sweep_table import collect, format_table
from scoreflow.tasks.train import train

ROOT = Path(__file__).resolve().parents[2]
FAST = ["debug=fast", "trainer.max_steps=4", "val_every=2", "sample_every=4", "checkpoint_every=2"]


def test_ranks_draw_different_noise():
    assert step_seed(0, 0, 5) != step_seed(0, 1, 5)
    assert step_seed(0, 0, 5) != step_seed(0, 0, 6)


def ddp_test_phase_against_one_process(make_cfg, tmp_path, test_subset: int, eval_batch_size: int,
                                       val_subset: int = 9):
    """Train 4 steps on 2 gloo processes, then evaluate the run's checkpoint on one process (evaluate.py with no
    other argument: the run's test images, batches, seeds and protocol); both per-image tables."""
    from scoreflow.tasks.evaluate import evaluate

    cfg = make_cfg([*FAST, "trainer=ddp_cpu", f"datamodule.test_subset={test_subset}",
                    f"datamodule.val_subset={val_subset}",
                    f"datamodule.eval_batch_size={eval_batch_size}"])
    metrics = train(cfg)
    run = tmp_path / "run"
    assert metrics["train/steps"] == 4
    one = evaluate(make_cfg([f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "progress=false", "device=cpu",
                             "solver_check_images=0"], sub="one", config_name="evaluate"))
    return (json.loads((run / "metrics.json").read_text()), np.load(run / "test_per_example.npz"), one,
            np.load(tmp_path / "one" / "per_example.npz"))


def test_ddp_two_cpu_processes(make_cfg, tmp_path):
    """The test phase on 2 processes takes the batches of one process, dealt out whole (4, 4, 4, 3 images: ranks
    0, 1, 0, 1), so the adaptive dopri5 of debug=fast gives each image its one-process value, bit for bit (dealt
    out image by image, values were up to 0.07 bits/dim apart)."""
    saved, per, one, alone = ddp_test_phase_against_one_process(make_cfg, tmp_path, 15, 4)
    assert np.isfinite(saved["test/bpd_ode"]) and np.isfinite(saved["test/bpd_bound"])
    # every test image exactly once across the two ranks (15 is odd: no padding, no duplicates), in image order
    np.testing.assert_array_equal(per["index"], np.arange(15))
    assert per["bpd_ode"].shape == (15,) and per["bpd_bound"].shape == (15,)
    # the mean logged (synced over ranks) is the mean over all 15 images
    assert saved["test/bpd_bound"] == pytest.approx(float(per["bpd_bound"].mean()), rel=1e-5)
    assert one["protocol"]["num_images"] == 15 and one["protocol"]["batch_size"] == 4
    for q in ("bpd_ode", "bpd_bound"):
        np.testing.assert_array_equal(per[q], alone[q][:, 0])
        assert saved[f"test/{q}"] == pytest.approx(one[f"test/{q}"], rel=1e-6)  # logged as float32
    assert saved["test/nfe"] == one["test/nfe"]


@pytest.mark.slow  # ~40 s: two processes
def test_ddp_test_phase_with_fewer_batches_than_processes(make_cfg, tmp_path):
    """3 test images in one batch of 4: rank 1 has no batch and runs a padding batch instead (its loop would be
    skipped and rank 0's gather would wait for it); nothing of the padding reaches the table. The validations
    during training (3 images) pad likewise."""
    saved, per, one, alone = ddp_test_phase_against_one_process(make_cfg, tmp_path, 3, 4, val_subset=3)
    assert np.isfinite(saved["val/bpd_bound"])
    np.testing.assert_array_equal(per["index"], np.arange(3))
    for q in ("bpd_ode", "bpd_bound"):
        np.testing.assert_array_equal(per[q], alone[q][:, 0])
    assert saved["test/nfe"] == one["test/nfe"]


def test_wandb_offline(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg([*FAST, "logger=wandb", "test=false"])
    train(cfg)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run directory"
    files = {p.name for p in runs[0].rglob("*")}
    assert any(n.endswith(".wandb") for n in files)
    # the sample grid was logged as an image
    assert any(n.endswith(".png") for n in files)


def _sweep(tmp_path: Path, overrides: list[str]) -> Path:
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, capture_output=True, text=True, timeout=900)
    return sweep_dir


def test_multirun_sweep_and_table(tmp_path):
    """A sequential (in-process) sweep with ``logger=wandb``: the table, and one W&B run per job, with the id the job
    stored. Before, nothing finished the first job's W&B run, and Lightning's logger reused it: every later job
    logged into it (its curves, config and test numbers), and the ids the later jobs stored never reached W&B."""
    sweep_dir = _sweep(tmp_path, ["debug=fast", "trainer.max_steps=2", "test=false", "callbacks=minimal",
                                  "logger=wandb", "sde=vp,ve"])
    rows = collect(sweep_dir)
    assert len(rows) == 2 and {r["overrides"].split()[-1] for r in rows} == {"sde=vp", "sde=ve"}
    table = format_table(rows)
    assert "sde=vp" in table and "sde=ve" in table
    jobs = sorted(p for p in sweep_dir.iterdir() if (p / "wandb_run.json").is_file())
    assert len(jobs) == 2
    for job in jobs:
        run_id = json.loads((job / "wandb_run.json").read_text())["id"]
        runs = list((job / "wandb").glob("offline-run-*"))
        assert [r.name.rsplit("-", 1)[-1] for r in runs] == [run_id], (job, runs)


@pytest.mark.slow
def test_three_by_three_sweep(tmp_path):
    sweep_dir = _sweep(tmp_path, ["debug=fast", "sde=vp,subvp,ve", "weighting=original,likelihood,lw_is"])
    rows = collect(sweep_dir)
    assert len(rows) == 9 and all(np.isfinite(r["test/bpd_ode"]) for r in rows)


def _validate(cfg, devices: int, classifier: bool = False) -> dict[str, float]:
    """One validation of the same freshly built module (score model: ODE due) on ``devices`` gloo processes
    (spawned)."""
    import lightning.pytorch as pl

    from scoreflow.tasks.build import build_classifier_module, build_data, build_datamodule, build_module

    torch.manual_seed(0)
    source = build_data(cfg)
    if classifier:
        module = build_classifier_module(cfg, source)
    else:
        module = build_module(cfg)
        module._last_ode_step = -1000  # the ODE validation is due at step 0
    dm = build_datamodule(cfg, source)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         inference_mode=False, use_distributed_sampler=False)  # as conf/trainer/default.yaml
    (out,) = trainer.validate(module, datamodule=dm)
    return out


@pytest.mark.parametrize("val_subset, nll_subset", [(9, 6), (3, 2)], ids=["3-batches", "padding"])
def test_validation_on_two_processes_gives_the_values_of_one(make_cfg, val_subset, nll_subset):
    """The validation bound and ODE likelihood on 2 processes equal one process's (the batches of one process,
    dealt out whole; the noise drawn per batch number, not per rank and local batch): 9 images in batches of 4
    (ranks 0, 1, 0; ODE images in batches 0 and 1 of the first), and 3 images in one batch (rank 1 pads). Were: other
    noise on every rank but 0, the ODE on each rank's share of the first nll_subset (at least one image each)."""
    cfg = make_cfg(["debug=fast", f"datamodule.val_subset={val_subset}", "datamodule.eval_batch_size=4",
                    f"module.evaluation.nll_subset={nll_subset}", "module.evaluation.nll_every=1"])
    one, two = _validate(cfg, 1), _validate(cfg, 2)
    assert set(one) == set(two) >= {"val/bpd_bound", "val/bpd_ode", "val/bpd_bound_se", "val/bpd_ode_se"}
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-6), key


def test_classifier_validation_on_two_processes_gives_the_values_of_one(make_cfg):
    """The classifier's validation (cross-entropy and accuracy, also at its fixed times) on 2 processes, 3 images
    in one batch of 4 (rank 1 pads), equals one process's (was: other noise per rank, and 3 images refused)."""
    cfg = make_cfg(["trainer.accelerator=cpu", "datamodule.val_subset=3", "datamodule.eval_batch_size=4"],
                   config_name="train_classifier")
    one, two = _validate(cfg, 1, classifier=True), _validate(cfg, 2, classifier=True)
    assert set(one) == set(two) >= {"val/loss", "val/acc", "val/acc_t0.5"}
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
