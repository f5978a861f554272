"""``train_dequant(cfg)``: train a variational dequantizer AFTER the score model (Song et al. 2021b, Sec. 5.2).

The score model is rebuilt from ``cfg.score_ckpt`` with its EMA weights and frozen; the run's config is the score
run's config with this run's settings merged over it and its ``dequantization`` replaced, so the checkpoint written
describes the whole model (score network + flow) and :func:`module_from_checkpoint` / evaluation rebuild it with the
variational dequantizer.
"""

from __future__ import annotations

import time
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from scoreflow.lit.dequant_module import DequantLitModule
from scoreflow.tasks.build import ConfigError, build_data, build_module, to_container
from scoreflow.tasks.checkpoint import module_from_checkpoint
from scoreflow.tasks.common import (
    fit,
    is_global_zero,
    protocol_string,
    results_table,
    start_run,
    test_checkpoint,
    write_metrics,
)
from scoreflow.tasks.console import echo
from scoreflow.tasks.validate import not_a_flow_checkpoint, read_checkpoint

_RUN_ONLY = ("score_ckpt", "ckpt_path")  # describe this invocation, not the model
_REPLACED = ("dequantization", "trainer", "callbacks", "logger")  # this run's own, not merged with the score run's


def flow_run_config(cfg: DictConfig, score_cfg: DictConfig) -> DictConfig:
    """The score run's config with this run's settings merged over it; the groups in ``_REPLACED`` are replaced."""
    own = {k: v for k, v in to_container(cfg).items() if k not in _RUN_ONLY}
    run_cfg = OmegaConf.merge(score_cfg, OmegaConf.create({k: v for k, v in own.items() if k not in _REPLACED}))
    with open_dict(run_cfg):
        for key in _REPLACED:
            run_cfg[key] = OmegaConf.create(own.get(key) or {})
        run_cfg.module.dequant.freeze_score = True  # the "after" mode is what this task is
        # the flow learns its noise on dequantized data, whatever input trained the score model (ScoreFlow: levels)
        run_cfg.module.train_input = "dequantized"
        run_cfg.dequant_run = {"mode": "after", "score_ckpt": str(cfg.score_ckpt)}
    return run_cfg


def train_dequant(cfg: DictConfig) -> dict[str, Any]:
    """Train φ with the frozen score model, write ``checkpoints/last.ckpt`` and ``metrics.json``, return the metrics."""
    t0 = time.time()
    # the preflight's check again, before the run starts (multiruns and callers of this function skip the preflight)
    not_a_flow_checkpoint((read_checkpoint(cfg.score_ckpt, "score_ckpt").get("scoreflow") or {}).get("config") or {},
                          cfg.score_ckpt)
    out = start_run(cfg)
    score, score_cfg, _ = module_from_checkpoint(cfg.score_ckpt, use_ema=True)
    run_cfg = flow_run_config(cfg, score_cfg)
    source = build_data(run_cfg)
    module = build_module(run_cfg)
    if not isinstance(module, DequantLitModule):
        raise ConfigError(f"dequantization={type(module.dequantizer).__name__} has nothing to train after the score "
                          "model: use dequantization=variational")
    module.score_model.load_state_dict(score.score_model.state_dict())  # the frozen EMA weights
    module.output_dir = str(out)

    metrics, _ = fit(cfg, module, source, out, t0, run_cfg=run_cfg)
    if cfg.get("test", True):
        metrics.update(test_checkpoint(run_cfg, out / "checkpoints" / "last.ckpt", out))
    metrics["wall_time_s"] = time.time() - t0
    metrics["dequantization"] = f"{type(module.dequantizer).__name__} (trained after the score model)"
    if not is_global_zero():  # strategy=ddp: rank 0 writes and reports
        return metrics
    write_metrics(out / "metrics.json", metrics)
    echo(results_table(metrics, title=f"test split, frozen score model + EMA flow ({out})", extra={
        "dequantization": metrics["dequantization"], "score model": str(cfg.score_ckpt),
        "flow steps": int(metrics["train/steps"]), "wall time": f"{metrics['wall_time_s']:.0f} s",
        "protocol": protocol_string(run_cfg),
    }))
    return metrics
