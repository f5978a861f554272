"""The digits experiment presets: ``experiment=digits_likelihood`` is the default run with only the time input and
the test ODE solver changed, and it trains and tests end to end."""

from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf

from scoreflow.tasks.train import train


def flat(cfg) -> dict:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def test_digits_likelihood_differs_from_the_default_run_only_where_it_says(make_cfg):
    default = flat(make_cfg(["experiment=digits_default"], sub="a"))
    fast = flat(make_cfg(["experiment=digits_likelihood"], sub="b"))
    changed = {k for k in default.keys() | fast.keys() if default.get(k) != fast.get(k)}
    assert changed == {"task_name", "model.time_label", "module.evaluation.method", "module.evaluation.steps"}
    assert fast["model.time_label"] == "t" and default["model.time_label"] == "t999"
    assert (fast["module.evaluation.method"], fast["module.evaluation.steps"]) == ("exp_pc3", 60)
    assert fast["sde._target_"] == "scoreflow.sde.SubVPSDE" and fast["trainer.max_steps"] == 3600


def test_digits_likelihood_trains_and_tests_with_61_calls_per_image(make_cfg, tmp_path):
    cfg = make_cfg(["experiment=digits_likelihood", "debug=fast", "trainer.accelerator=cpu",
                    "module.evaluation.method=exp_pc3", "module.evaluation.steps=60"])  # debug=fast sets dopri5
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test/nfe"] == 61 and metrics["test/nfe"] == 61
    assert "ODE exp_pc3 60 steps" in saved["protocol"] and 0 < saved["test/bpd_ode"] < 10
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["scoreflow"]["config"]["model"]["time_label"] == "t"
