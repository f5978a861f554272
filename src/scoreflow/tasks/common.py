"""Helpers shared by the tasks: rebuilding from checkpoints, trainers, metrics.json and result tables."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hydra
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from scoreflow.lit.callbacks import AtomicCheckpointIO
from scoreflow.lit.ema import ema_state_dict
from scoreflow.lit.module import ScoreLitModule
from scoreflow.lit.progress import TerminalProgressBar
from scoreflow.tasks.build import build_module


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_config(ckpt: dict[str, Any]) -> DictConfig:
    cfg = (ckpt.get("scoreflow") or {}).get("config")
    if cfg is None:
        raise KeyError("this checkpoint carries no scoreflow config (was it written by scoreflow's train.py?)")
    return OmegaConf.create(cfg)


def module_from_checkpoint(
    path: str | Path, *, use_ema: bool = True, overrides: dict[str, Any] | None = None
) -> tuple[ScoreLitModule, DictConfig, dict[str, Any]]:
    """Rebuild the module from the config stored in the checkpoint and load its (EMA) weights strictly.

    ``overrides`` are merged into the stored config first (e.g. ``{"module": {"evaluation": {...}}}``).
    """
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    module = build_module(cfg)
    state = ema_state_dict(ckpt) if use_ema else ckpt["state_dict"]
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("val_", "test_"))]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing={missing}, unexpected={unexpected}")
    module.batches_seen = ckpt.get("scoreflow", {}).get("batches_seen", 0)
    return module, cfg, ckpt


def make_trainer(trainer_cfg: DictConfig, *, callbacks: list | None = None, logger: Any = False, **overrides):
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # signals are scoreflow.lit.preemption's: no second SIGUSR1 handler/requeue
        plugins.append(SLURMEnvironment(auto_requeue=False))
    callbacks = list(callbacks or [])
    if not any(isinstance(c, ProgressBar) for c in callbacks) and trainer_cfg.get("enable_progress_bar", True) \
            and overrides.get("enable_progress_bar", True):
        callbacks.append(TerminalProgressBar())  # one bar style: Lightning's default is Rich when installed
    return hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=logger, plugins=plugins, **overrides)


def optimized_metric(cfg: DictConfig, metrics: dict[str, Any]) -> float | None:
    """What ``train()`` returns to a Hydra sweeper: ``metrics[cfg.optimized_metric]``; without a test phase
    (``test=false``) the validation metric of the same name (``test/bpd_ode`` -> ``val/bpd_ode``), then the
    validation bound (the ODE is measured on validation images only every ``nll_every`` steps)."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    tail = str(name).split("/", 1)[-1]
    for key in (name, f"val/{tail}", "val/bpd_bound"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json`` atomically."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def _fmt(mean: float | None, se: float | None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.4f} ± {se:.4f}" if se is not None else f"{mean:.4f}"


def results_table(metrics: dict[str, float], title: str = "results", extra: dict[str, Any] | None = None) -> str:
    """A short plain-text table of the headline numbers."""
    rows = [
        ("bits/dim (ODE)", _fmt(metrics.get("test/bpd_ode"), metrics.get("test/bpd_ode_se"))),
        ("bits/dim (bound)", _fmt(metrics.get("test/bpd_bound"), metrics.get("test/bpd_bound_se"))),
        ("mean NFE (ODE)", f"{metrics['test/nfe']:.0f}" if "test/nfe" in metrics else "-"),
    ]
    if "test/fid" in metrics:
        rows.append(("FID", f"{metrics['test/fid']:.2f}"))
    for k, v in (extra or {}).items():
        rows.append((k, str(v)))
    w = max(len(r[0]) for r in rows)
    lines = [f"== {title} ==", *(f"  {a:<{w}}  {b}" for a, b in rows)]
    return "\n".join(lines)
