"""``train(cfg)``: fit a score model, then evaluate the test split with the final EMA weights."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from scoreflow.tasks.build import build_data, build_module, check_shapes
from scoreflow.tasks.common import (
    checkpoint_run_dir,
    checkpoint_step,
    ema_in_run,
    fit,
    is_global_zero,
    protocol_string,
    results_table,
    results_title,
    start_run,
    test_checkpoint,
    tested_with_ema,
    train_speed,
    use_compile_cache,
    write_metrics,
)
from scoreflow.tasks.console import echo, hydra_choices
from scoreflow.tasks.plots import bpd_plot
from scoreflow.tasks.resume import last_checkpoint, resume_candidate

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, write ``checkpoints/last.ckpt`` and ``metrics.json``, print a results table, return the metrics."""
    t0 = time.time()
    out = start_run(cfg)
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:  # which GPUs a launcher gave this job
        log.info("CUDA_VISIBLE_DEVICES=%s", visible)
    source = build_data(cfg)
    module = build_module(cfg)
    module.config_choices = hydra_choices()  # stored in its checkpoints: which options the run was composed of
    check_shapes(module, tuple(cfg.data.shape))
    module.output_dir = str(out)
    if (cache := use_compile_cache(cfg)) is not None:
        log.info("module.compile: Inductor's cache is %s (compile_cache_dir; a later run of this network, a requeued "
                 "job on another node, loads what it holds instead of compiling again)", cache)

    resumed = resume_candidate(cfg, out)  # before fit, which writes last.ckpt
    earlier = earlier_metrics(resumed)
    metrics, loggers = fit(cfg, module, source, out, t0)
    steps = metrics["train/steps"]
    if earlier:  # a resumed run: the earlier segment's keys this one did not produce (its own win)
        if steps == earlier.get("train/steps"):  # no step taken: the training numbers stay those of the training
            metrics = {**earlier, **metrics, **{k: v for k, v in earlier.items() if k.startswith("train/")}}
        else:  # trained on: test values of an earlier state would be stale
            metrics = {**{k: v for k, v in earlier.items() if not k.startswith("test/")}, **metrics}
    ema = ema_in_run(cfg)  # what validation evaluated
    if cfg.get("test", True):
        # a checkpoint already at max_steps, resumed into another folder: fit took no step and wrote no last.ckpt
        final = last_checkpoint(out)
        if resumed is not None and not (final.is_file() and checkpoint_step(final) == int(steps)):
            final = resumed
        ema = tested_with_ema(final)  # said in the title
        test_metrics = test_checkpoint(cfg, final, out, use_ema=ema)
        metrics.update(test_metrics)
        log_final(loggers, test_metrics, step=int(steps))
    metrics["wall_time_s"] = time.time() - t0
    if not is_global_zero():  # strategy=ddp: every rank ran the test; rank 0 writes and reports
        return metrics
    write_metrics(out / "metrics.json", {**metrics, "protocol": protocol_string(cfg)})
    tested = bool(cfg.get("test", True))
    weights = "EMA weights" if ema else "raw weights (no EMA)"
    # test=false: the last validation (bound on val_subset images, ODE on nll_subset) under its own title
    shown = metrics if tested else {"test/" + k[4:]: v for k, v in metrics.items() if k.startswith("val/")}
    title = results_title(tested, module, metrics, int(steps), cfg.get("val_every"))
    extra = {"steps": int(metrics["train/steps"]), "wall time": f"{metrics['wall_time_s']:.0f} s"}
    if (segments := int(metrics.get("train/segments", 1))) > 1:  # resumed: the time of every segment's training
        extra = {"steps": extra["steps"], "wall time": f"{metrics['wall_time_s']:.0f} s (this command)",
                 "training time": f"{metrics['train/wall_time_s']:.0f} s in {segments} segments (resumed)"}
    if speed := train_speed(metrics):  # with the Throughput callback (callbacks=default)
        extra["train speed"] = speed
    # the eps-correction of protocol_string is the bound's; the test phase's ODE NLL never has it (evaluate.py can)
    extra.update({"protocol": protocol_string(cfg) + "; the ODE NLL without eps-correction",
                  "plot": bpd_plot(out, metrics, loggers, step=int(steps))})
    close_loggers(loggers, {**metrics, "protocol": extra["protocol"]})  # before the table: W&B's lines come first
    echo(results_table(shown, title=f"{title}, {weights} ({out})", extra=extra))
    return metrics


def earlier_metrics(ckpt: Path | None) -> dict[str, float]:
    """The numbers of ``metrics.json`` in the run folder of the checkpoint a run resumes from (its own folder, or
    the one ``ckpt_path=`` points into), when it describes that checkpoint or an earlier state of its run
    (``train/steps`` not past the checkpoint's step); else ``{}``."""
    if ckpt is None or (run := checkpoint_run_dir(ckpt)) is None or not (run / "metrics.json").is_file():
        return {}
    try:
        stored = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    step, done = checkpoint_step(ckpt), stored.get("train/steps") if isinstance(stored, dict) else None
    if step is None or not isinstance(done, (int, float)) or done > step:
        return {}
    return {k: float(v) for k, v in stored.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "wall_time_s"}


def log_final(loggers: list, metrics: dict[str, float], step: int) -> None:
    """Send the final test metrics to W&B / TensorBoard from the main process. The CSV logger is skipped: its
    file belongs to the training processes (metrics.json holds the test numbers)."""
    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            lg.log_metrics(metrics, step=step)


def close_loggers(loggers: list, metrics: dict[str, object]) -> None:
    """At the end of the run, after its last image (the plot): TensorBoard's writer closed (once: finalized before
    the plot, the plot went to a third event file), and the W&B run given the run's numbers (``metrics.json``'s:
    steps, training time, the run-mean speed the table prints, the protocol; its summary otherwise kept the last
    speed window) and finished, so that the next job of an in-process sweep starts its own run."""
    from scoreflow.lit.wandb_logger import finish_wandb_run

    for lg in loggers:
        if not isinstance(lg, CSVLogger) and type(lg).__name__ != "WandbLogger":
            lg.finalize("success")
    summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        finish_wandb_run(0, summary=summary)
