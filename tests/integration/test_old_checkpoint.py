"""A checkpoint written by an earlier release (tests/data/README.md) still evaluates, samples and resumes.

It was written before ``module.evaluation`` had ``steps``, ``grid_rho``, ``seed``, ``bound_antithetic`` or
``bound_plan``: the stored settings must be kept (dopri5, the ``paired`` bound, no plan) and the missing keys
filled with values that reproduce the old behaviour."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch

from scoreflow.tasks.evaluate import evaluate
from scoreflow.tasks.sample import sample
from scoreflow.tasks.train import train

OLD = Path(__file__).resolve().parents[1] / "data" / "release-53daf68_digits_tiny.ckpt"


def test_old_checkpoint_evaluates_with_its_stored_protocol(make_cfg):
    m = evaluate(make_cfg([f"ckpt_path={OLD}", "num_images=4", "progress=false", "device=cpu",
                           "solver_check_images=0"], sub="eval", config_name="evaluate"))
    assert math.isfinite(m["test/bpd_ode"]) and math.isfinite(m["test/bpd_bound"])
    p = m["protocol"]
    assert p["ode"]["method"] == "dopri5" and p["ode"]["rtol"] == 1e-3  # as stored, not today's RK4 grid
    assert p["bound"]["estimator"] == "paired" and "plan" not in p["bound"] and "antithetic" not in p["bound"]


def test_old_checkpoint_samples(make_cfg, tmp_path):
    m = sample(make_cfg([f"ckpt_path={OLD}", "progress=false", "device=cpu", "num_samples=4", "sampler=ode",
                         "sampler.method=euler", "sampler.steps=4"], sub="s", config_name="sample"))
    assert m["sample/num_samples"] == 4 and m["sample/nfe"] == 4 + 1  # 4 Euler steps + the denoising step
    z = np.load(tmp_path / "s" / "samples.npz")
    assert z["samples"].shape == (4, 1, 8, 8) and np.isfinite(z["samples"]).all()


def test_old_checkpoint_resumes_training(make_cfg, tmp_path):
    ckpt = tmp_path / "old.ckpt"
    shutil.copy(OLD, ckpt)  # never written to: the resumed run writes its own folder
    train(make_cfg(["debug=fast", "model.net.ch=8", "trainer.accelerator=cpu", f"ckpt_path={ckpt}",
                    "trainer.max_steps=5", "test=false", "logger=none", "callbacks=minimal", "val_every=100"],
                   sub="resumed"))
    state = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 5  # continued from step 3, not restarted


# A later release's checkpoint, with the state added since the first one: the fused optimizer (guard on the
# device), a jointly trained variational dequantizer and the callbacks' states (tests/data/README.md).
VARDEQ = Path(__file__).resolve().parents[1] / "data" / "release-e1ce873_digits_vardeq_fused_tiny.ckpt"
VARDEQ_RUN = ["debug=fast", "model.net.ch=8", "module.optim.fused=true", "dequantization=variational",
              "dequantization.num_couplings=1", "dequantization.width=8", "dequantization.num_components=2",
              "dequantization.context_width=4"]


def test_vardeq_checkpoint_evaluates_with_its_flow(make_cfg):
    m = evaluate(make_cfg([f"ckpt_path={VARDEQ}", "num_images=4", "progress=false", "device=cpu",
                           "solver_check_images=0"], sub="eval", config_name="evaluate"))
    assert math.isfinite(m["test/bpd_ode"]) and math.isfinite(m["test/bpd_bound"])
    assert "VariationalDequantizer" in str(m["protocol"])


def test_vardeq_checkpoint_resumes_training_with_its_optimizer_state(make_cfg, tmp_path):
    ckpt = tmp_path / "old.ckpt"
    shutil.copy(VARDEQ, ckpt)
    before = torch.load(VARDEQ, map_location="cpu", weights_only=True)
    train(make_cfg([*VARDEQ_RUN, "trainer.accelerator=cpu", f"ckpt_path={ckpt}", "trainer.max_steps=5", "test=false",
                    "logger=none", "val_every=100"], sub="resumed"))
    after = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 5  # continued from step 3, not restarted
    steps = [s["step"] for s in after["optimizer_states"][0]["state"].values()]
    assert steps and all(float(s) == 5.0 for s in steps)  # Adam's moments carried on: 3 stored + 2 new steps
    flow = [k for k in before["state_dict"] if k.startswith("dequantizer.")]
    assert flow and all(k in after["state_dict"] for k in flow)
    assert any(not torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in flow)  # the flow trained
