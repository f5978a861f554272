"""``train(cfg)``: fit a score model, then evaluate the test split with the final EMA weights."""

from __future__ import annotations

import logging
import time

from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from scoreflow.tasks.build import build_data, build_module, check_shapes
from scoreflow.tasks.common import (
    fit,
    protocol_string,
    results_table,
    start_run,
    test_checkpoint,
    train_speed,
    use_compile_cache,
    write_metrics,
)
from scoreflow.tasks.console import echo
from scoreflow.tasks.plots import bpd_plot

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, write ``checkpoints/last.ckpt`` and ``metrics.json``, print a results table, return the metrics."""
    t0 = time.time()
    out = start_run(cfg)
    source = build_data(cfg)
    module = build_module(cfg)
    check_shapes(module, tuple(cfg.data.shape))
    module.output_dir = str(out)
    if (cache := use_compile_cache(cfg)) is not None:
        log.info("module.compile: Inductor's cache is %s (compile_cache_dir; a later run of this network, a requeued "
                 "job on another node, loads what it holds instead of compiling again)", cache)

    metrics, loggers = fit(cfg, module, source, out, t0)
    steps = metrics["train/steps"]
    if cfg.get("test", True):
        test_metrics = test_checkpoint(cfg, out / "checkpoints" / "last.ckpt", out)
        metrics.update(test_metrics)
        log_final(loggers, test_metrics, step=int(steps))
    metrics["wall_time_s"] = time.time() - t0
    write_metrics(out / "metrics.json", {**metrics, "protocol": protocol_string(cfg)})
    tested = bool(cfg.get("test", True))
    # test=false: the last validation (bound on val_subset images, ODE on nll_subset) under its own title
    shown = metrics if tested else {"test/" + k[4:]: v for k, v in metrics.items() if k.startswith("val/")}
    title = "test split" if tested else f"validation subset, last validation (step {int(steps)}; test=false)"
    extra = {"steps": int(metrics["train/steps"]), "wall time": f"{metrics['wall_time_s']:.0f} s"}
    if speed := train_speed(metrics):  # with the Throughput callback (callbacks=default)
        extra["train speed"] = speed
    extra.update({"protocol": protocol_string(cfg), "plot": bpd_plot(out, metrics, loggers)})
    echo(results_table(shown, title=f"{title}, EMA weights ({out})", extra=extra))
    return metrics


def log_final(loggers: list, metrics: dict[str, float], step: int) -> None:
    """Send the final test metrics to W&B / TensorBoard from the main process. The CSV logger is skipped: its
    file belongs to the training processes (metrics.json holds the test numbers)."""
    for lg in loggers:
        if isinstance(lg, CSVLogger):
            continue
        lg.log_metrics(metrics, step=step)
        lg.finalize("success")
