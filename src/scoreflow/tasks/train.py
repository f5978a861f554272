"""``train(cfg)``: fit a score model, then evaluate the test split with the final EMA weights."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from scoreflow.lit import preemption
from scoreflow.lit.preemption import Preempted, PreemptionCheckpoint
from scoreflow.tasks.build import build_data, build_datamodule, build_module, check_shapes, to_container
from scoreflow.tasks.common import make_trainer, module_from_checkpoint, results_table, scalar_metrics, write_metrics
from scoreflow.tasks.console import echo
from scoreflow.tasks.plots import bpd_plot
from scoreflow.tasks.resume import last_checkpoint, rerun_hint, resume_path, with_wandb_resume

log = logging.getLogger(__name__)


class FinalCheckpoint(Callback):
    """Writes ``checkpoints/last.ckpt`` when training ends (whatever the validation schedule)."""

    def __init__(self, dirpath: Path):
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


def run_dir(cfg: DictConfig) -> Path:
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed outside @hydra.main (tests)
        return Path(cfg.get("run_dir") or "outputs/train")


def instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c and c.get("_target_")]


def fit(cfg: DictConfig, module: pl.LightningModule, dm: pl.LightningDataModule, out: Path, hparams: dict[str, Any],
        trainer_cfg: DictConfig | None = None) -> tuple[pl.Trainer, list[Any]]:
    """Loggers (given ``hparams``), the configured callbacks plus :class:`FinalCheckpoint`, then ``Trainer.fit``
    resuming from ``cfg.ckpt_path`` or, with ``auto_resume``, the run folder's ``last.ckpt``. A pre-emption
    signal ends it with a checkpoint and :class:`Preempted` (``lit/preemption.py``). Shared by train,
    train_dequant and train_classifier."""
    ckpt_path = resume_path(cfg, out)
    loggers = instantiate_all(with_wandb_resume(cfg.get("logger"), out))
    for lg in loggers:
        lg.log_hyperparams(hparams)
    callbacks = instantiate_all(cfg.get("callbacks")) + [FinalCheckpoint(out / "checkpoints"),
                                                         PreemptionCheckpoint(last_checkpoint(out))]
    trainer = make_trainer(cfg.trainer if trainer_cfg is None else trainer_cfg, callbacks=callbacks,
                           logger=loggers or False)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except Preempted as stop:  # checkpoint written, loggers closed: requeue (SLURM) or exit 128 + signal
        preemption.finish(stop, rerun_hint(out))
    return trainer, loggers


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, write ``checkpoints/last.ckpt`` and ``metrics.json``, print a results table, return the metrics."""
    t0 = time.time()
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    source = build_data(cfg)
    module = build_module(cfg)
    check_shapes(module, tuple(cfg.data.shape))
    module.output_dir = str(out)
    dm = build_datamodule(cfg, source)

    trainer, loggers = fit(cfg, module, dm, out, to_container(cfg))
    train_time = time.time() - t0

    # under ddp_spawn the main process's trainer never stepped: read the step from the final checkpoint
    last = out / "checkpoints" / "last.ckpt"
    steps = trainer.global_step or torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    metrics: dict[str, float] = {"train/steps": float(steps), "train/wall_time_s": train_time}
    metrics.update({k: v for k, v in scalar_metrics(trainer.callback_metrics).items() if k.startswith("val/")})
    if cfg.get("test", True):
        test_metrics = test_checkpoint(cfg, last, out)
        metrics.update(test_metrics)
        log_final(loggers, test_metrics, step=int(steps))
    metrics["wall_time_s"] = time.time() - t0
    write_metrics(out / "metrics.json", {**metrics, "protocol": protocol_string(cfg)})
    tested = bool(cfg.get("test", True))
    # test=false: the last validation (bound on val_subset images, ODE on nll_subset) under its own title
    shown = metrics if tested else {"test/" + k[4:]: v for k, v in metrics.items() if k.startswith("val/")}
    title = "test split" if tested else f"validation subset, last validation (step {int(steps)}; test=false)"
    echo(
        results_table(
            shown,
            title=f"{title}, EMA weights ({out})",
            extra={
                "steps": int(metrics["train/steps"]),
                "wall time": f"{metrics['wall_time_s']:.0f} s",
                "protocol": protocol_string(cfg),
                "plot": bpd_plot(out, metrics, loggers),
            },
        )
    )
    return metrics


def log_final(loggers: list, metrics: dict[str, float], step: int) -> None:
    """Send the final test metrics to W&B / TensorBoard from the main process. The CSV logger is skipped: its
    file belongs to the training processes (metrics.json holds the test numbers)."""
    for lg in loggers:
        if isinstance(lg, CSVLogger):
            continue
        lg.log_metrics(metrics, step=step)
        lg.finalize("success")


def protocol_string(cfg: DictConfig) -> str:
    e = cfg.module.evaluation
    deq = cfg.get("dequantization")
    deq_name = str(deq.get("_target_", "?")).rsplit(".", 1)[-1] if deq else "none"
    from scoreflow.likelihood.ode import FIXED_GRID_METHODS

    solve = (f"{e.get('steps')} steps" if e.method in FIXED_GRID_METHODS else f"rtol={e.rtol} atol={e.atol}")
    extras = "".join(f" {name}" for name, on in (("stratified", e.get("stratified")),
                                                 ("antithetic", e.get("bound_antithetic")),
                                                 ("plan=fit", (e.get("bound_plan") or "none") == "fit")) if on)
    return (
        f"eps={cfg.get('eps') or 'sde default'}, dequantization={deq_name}, "
        f"ODE {e.method} {solve} {e.divergence} "
        f"{e.ode_dtype}, bound num_t={e.test_num_t} IS={e.importance_sampling} {e.bound_estimator}{extras} "
        f"eps-correction={e.truncation_correction}, repeats={e.test_repeats}"
    )


def test_checkpoint(cfg: DictConfig, ckpt_path: Path, out: Path) -> dict[str, float]:
    """Evaluate the test split with the EMA weights of a checkpoint; per-image values go to ``out``."""
    module, _, _ = module_from_checkpoint(ckpt_path, use_ema=True)
    module.output_dir = str(out)
    source = build_data(cfg)
    dm = build_datamodule(cfg, source)
    trainer = make_trainer(cfg.trainer, logger=False, enable_checkpointing=False)
    results = trainer.test(module, datamodule=dm, verbose=False)
    return scalar_metrics(results[0] if results else trainer.callback_metrics)
