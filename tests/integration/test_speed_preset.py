"""``speed=gpu``: the fastest one-GPU training configuration measured (README "GPU speed, measured") as one
config group: bf16 autocast, CUDA graphs on the compiled training loss, fused Adam with the guard on the device and
the training split on the device. It sets those four and nothing else (not the trainer, so that it composes with
``trainer=gpu`` and ``trainer=ddp``), the command line still wins, and it trains through ``train.py``'s pipeline
(here on the CPU, where torch skips the CUDA graphs; conftest's ``graphs``: a counting backend, no Inductor)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from scoreflow.tasks.train import train

LEVERS = {"trainer.precision": "bf16-mixed", "module.compile": "reduce-overhead", "module.optim.fused": True,
          "datamodule.on_device": True}


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_speed_gpu_sets_the_four_levers_and_leaves_the_rest_of_a_table2_preset(make_cfg, trainer):
    base = make_cfg(["experiment=table2/cifar10_vp_lw_is", f"trainer={trainer}"], sub="base")
    fast = make_cfg(["experiment=table2/cifar10_vp_lw_is", f"trainer={trainer}", "speed=gpu"], sub="fast")
    for key, value in LEVERS.items():
        assert _get(fast, key) == value, key
        assert _get(base, key) != value, key  # the preset itself keeps the paper's fp32, eager, DataLoader path
    base, fast = (OmegaConf.to_container(c, resolve=False) for c in (base, fast))
    for key in LEVERS:  # everything else is the preset's, the trainer's strategy and devices included
        parent, leaf = key.rsplit(".", 1)
        del _get(base, parent)[leaf], _get(fast, parent)[leaf]
    assert fast == base


def test_the_command_line_wins_over_speed_gpu(make_cfg):
    cfg = make_cfg(["speed=gpu", "trainer.precision=32-true", "datamodule.on_device=false"])
    assert cfg.trainer.precision == "32-true" and cfg.datamodule.on_device is False
    assert cfg.module.compile == "reduce-overhead" and cfg.module.optim.fused is True


def test_speed_gpu_trains_through_the_pipeline(make_cfg, graphs, caplog):
    with caplog.at_level("INFO"):
        metrics = train(make_cfg(["debug=fast", "speed=gpu", "trainer.accelerator=cpu", "trainer.max_steps=4",
                                  "val_every=2", "sample_every=0", "checkpoint_every=2",
                                  "module.evaluation.nll_every=2", "datamodule.batch_size=8"]))
    assert metrics["train/steps"] == 4 and metrics["test/bpd_ode"] == metrics["test/bpd_ode"]  # finite, not NaN
    assert "module.compile=reduce-overhead: the first training step compiles" in caplog.text
    assert "datamodule.on_device: " in caplog.text and "Using bfloat16 Automatic Mixed Precision" in caplog.text
    assert [g["mode"] for g in graphs] == ["reduce-overhead"] and len(graphs[0]["graphs"]) == 1
    assert "CUDA graphs need a CUDA device; on cpu torch skips them" in caplog.text  # said, on a CPU run
