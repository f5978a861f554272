"""End-to-end training through the real Hydra configs (CPU, tiny settings)."""

from __future__ import annotations

import json

import pytest
import torch

from scoreflow.tasks.train import train
from tests.integration.resume_check import resumed_and_uninterrupted

FAST = ["debug=fast", "trainer.accelerator=cpu"]


def test_debug_fast_runs_whole_pipeline(make_cfg, tmp_path, capsys):
    cfg = make_cfg(FAST)
    metrics = train(cfg)
    table = capsys.readouterr().out  # the results table says which number is eps-corrected (SPEC 4.4)
    assert "eps-correction=" in table and "the ODE NLL without eps-correction" in table
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    for key in ["test/bpd_ode", "test/bpd_ode_se", "test/bpd_bound", "test/bpd_bound_se", "test/nfe"]:
        assert key in saved and saved[key] == pytest.approx(metrics[key])
    assert 0 < saved["test/bpd_ode"] < 10 and 0 < saved["test/bpd_bound"] < 10
    assert saved["train/steps"] == 20
    assert "dequantization=UniformDequantizer" in saved["protocol"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "samples").glob("*.png"))
    per = dict(__import__("numpy").load(run / "test_per_example.npz"))
    assert per["bpd_ode"].shape == (16,) and per["bpd_bound"].shape == (16,)  # debug=fast: test_subset=16
    assert saved["test/num_images"] == 16 and "  images            16" in table  # said in the table
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["scoreflow"]["config"]["sde"]["_target_"] == "scoreflow.sde.SubVPSDE"  # the default run's SDE
    assert "ema" in ckpt and ckpt["global_step"] == 20


@pytest.mark.parametrize("sde", ["vp", "subvp", "ve"])
@pytest.mark.parametrize("weighting", ["original", "likelihood", "lw_is", "lw_is_trunc"])
def test_every_sde_weighting_combination_trains(make_cfg, sde, weighting):
    cfg = make_cfg(
        [
            *FAST,
            f"sde={sde}",
            f"weighting={weighting}",
            "dequantization=uniform",
            "trainer.max_steps=3",
            "test=false",
            "callbacks=minimal",
            "val_every=3",
        ]
    )
    metrics = train(cfg)
    assert metrics["train/steps"] == 3
    assert torch.isfinite(torch.tensor(metrics["val/bpd_bound"]))


def test_resume_is_exact(make_cfg, tmp_path):
    """A run interrupted at step 4 and resumed to step 8 ends with the same weights as an uninterrupted one."""
    base = [*FAST, "test=false", "callbacks=minimal", "checkpoint_every=4", "val_every=100", "model.net.dropout=0.1"]
    resumed_and_uninterrupted(make_cfg, tmp_path, base)
