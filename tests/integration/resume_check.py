"""Checkpoint comparisons shared by the training tests: two runs' final checkpoints bit-identical, and the
exact-resume check (the same run uninterrupted, and interrupted at step ``at`` then resumed from its
``last.ckpt`` with ``ckpt_path=``), through the real configs."""

from __future__ import annotations

from pathlib import Path

import torch


def assert_same_weights(path_a: Path, path_b: Path, steps: int) -> tuple[dict, dict]:
    """Both checkpoints at ``steps`` with bit-identical weights and EMA; returns them (loaded)."""
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    assert a["global_step"] == b["global_step"] == steps
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)
    for k in a.get("ema", {}).get("shadow", {}):
        torch.testing.assert_close(a["ema"]["shadow"][k], b["ema"]["shadow"][k], rtol=0, atol=0, msg=k)
    return a, b


def resumed_and_uninterrupted(make_cfg, tmp_path, base: list[str], steps: int = 8, at: int = 4, task=None,
                              config_name: str = "train") -> tuple[dict, dict]:
    """``(uninterrupted, resumed)`` final checkpoints of ``task`` (default ``train``), asserted bit-identical."""
    if task is None:
        from scoreflow.tasks.train import train as task

    task(make_cfg([*base, f"trainer.max_steps={steps}"], sub="full", config_name=config_name))
    task(make_cfg([*base, f"trainer.max_steps={at}"], sub="half", config_name=config_name))
    ckpt = tmp_path / "half" / "checkpoints" / "last.ckpt"
    task(make_cfg([*base, f"trainer.max_steps={steps}", f"ckpt_path={ckpt}"], sub="resumed", config_name=config_name))
    return assert_same_weights(tmp_path / "full" / "checkpoints" / "last.ckpt",
                               tmp_path / "resumed" / "checkpoints" / "last.ckpt", steps)
