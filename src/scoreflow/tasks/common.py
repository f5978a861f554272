"""Helpers shared by the tasks: the run folder, trainers, ``fit`` with resume and pre-emption, the test phase of a
checkpoint, metrics.json and result tables. Every task module (``train``, ``train_dequant``, ``train_classifier``,
``evaluate``, ``sample``, ...) is a leaf over these helpers and :mod:`~scoreflow.tasks.build` /
:mod:`~scoreflow.tasks.checkpoint`: no task imports another (``tests/unit/test_task_leaves.py``)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from scoreflow.lit import preemption
from scoreflow.lit.callbacks import AtomicCheckpointIO, StepValidation
from scoreflow.lit.preemption import Preempted, PreemptionCheckpoint
from scoreflow.lit.progress import TerminalProgressBar
from scoreflow.lit.settings import protocol_string  # noqa: F401  (re-exported: the tasks name it here)
from scoreflow.lit.throughput import SUMMARY_KEYS as THROUGHPUT_KEYS
from scoreflow.tasks.build import build_data, build_datamodule
from scoreflow.tasks.checkpoint import module_from_checkpoint, task_dir
from scoreflow.tasks.launchers import optimized_metric  # noqa: F401  (re-exported: train.py names it here)
from scoreflow.tasks.resume import (
    ORIGIN_KEY,
    last_checkpoint,
    rerun_hint,
    resume_path,
    run_origin,
    with_wandb_resume,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- a training run
def use_compile_cache(cfg: DictConfig) -> Path | None:
    """With ``module.compile``: keep Inductor's compiled graphs and kernels (``TORCHINDUCTOR_CACHE_DIR``; Triton's
    cache follows it) in ``cfg.compile_cache_dir``, by default under the outputs folder, where a requeued job on
    another node and the other runs of a sweep find them, instead of torch's per-machine ``/tmp`` default. A
    ``TORCHINDUCTOR_CACHE_DIR`` the user exported is kept. Returns the cache folder in use, ``None`` without
    compilation or with ``compile_cache_dir: null``."""
    if not cfg.get("module", {}).get("compile") or not cfg.get("compile_cache_dir"):
        return None
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # importing Lightning already set it to the default
    if current is not None and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        return Path(current)
    path = Path(str(cfg.compile_cache_dir)).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def start_run(cfg: DictConfig) -> Path:
    """Seed every generator with ``cfg.seed`` and return the run folder (created; ``outputs/train`` outside
    ``@hydra.main`` without ``cfg.run_dir``)."""
    out = task_dir(cfg, "train")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return out


class FinalCheckpoint(Callback):
    """Writes ``checkpoints/last.ckpt`` when training ends (whatever the validation schedule)."""

    def __init__(self, dirpath: Path):
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)


TRAINING_TIME_KEY = "scoreflow_training_time"


class TrainingClock(Callback):
    """Puts the training time of the weights into every checkpoint (``checkpoint["scoreflow_training_time"]``:
    ``seconds``, ``segments``): the time of the checkpoint a run resumed from (``earlier``, from
    :func:`checkpoint_training_time`) plus this run's since ``t0``, so that a run stopped and resumed (pre-emption,
    requeue, a rerun of the same command) reports the time of all its segments. The time between a segment's last
    checkpoint and its stop is not counted: those steps are taken again by the next segment."""

    def __init__(self, t0: float, earlier: tuple[float, int] = (0.0, 0)):
        self.t0 = t0
        self.earlier_s, self.earlier_segments = earlier

    def seconds(self) -> float:
        return self.earlier_s + time.time() - self.t0

    @property
    def segments(self) -> int:
        return self.earlier_segments + 1

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[TRAINING_TIME_KEY] = {"seconds": self.seconds(), "segments": self.segments}


class RunOrigin(Callback):
    """Puts the ``ckpt_path=`` the run started from (resolved; carried over by its resumes) into every checkpoint,
    so that the same command run again in the run folder, after a stop or a SLURM requeue, resumes from the folder's
    ``last.ckpt`` rather than from ``ckpt_path`` again (``scoreflow.tasks.resume.resume_candidate``)."""

    def __init__(self, origin: str | None):
        self.origin = origin

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.origin:
            checkpoint[ORIGIN_KEY] = self.origin


class ResumedLogStep(Callback):
    """The loggers' step after a resume, as in an uninterrupted run. Lightning's restore adds 1 to its count of
    batches (``_batches_that_stepped``, the loggers' x axis) on the assumption that the checkpoint was written in
    ``on_train_batch_end``, before that count moves on; :class:`FinalCheckpoint` writes in ``on_train_end``, after
    it, so a run resumed from a finished segment logged every row one step late (``train/loss`` of step 10 at 11;
    the values themselves were exact). At the first batch the count is set to the batches done."""

    def __init__(self) -> None:
        self._checked = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._checked:
            return
        self._checked = True
        loop = trainer.fit_loop.epoch_loop
        done = loop.batch_progress.total.completed  # batches before this one, over every epoch and segment
        if loop._batches_that_stepped != done:
            loop._batches_that_stepped = done


def checkpoint_training_time(path: str | Path | None) -> tuple[float, int]:
    """``(seconds, segments)`` of training stored in a checkpoint by :class:`TrainingClock`; ``(0.0, 0)`` for none,
    an unreadable file or a checkpoint written before the clock existed (its time is unknown: not counted)."""
    stored = checkpoint_entry(path, TRAINING_TIME_KEY)
    if not isinstance(stored, dict):
        return 0.0, 0
    return float(stored.get("seconds", 0.0)), int(stored.get("segments", 0))


def instantiate_all(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [hydra.utils.instantiate(c) for c in group.values() if c and c.get("_target_")]


def fit(cfg: DictConfig, module: pl.LightningModule, source: Any, out: Path, t0: float, *,
        run_cfg: DictConfig | None = None) -> tuple[dict[str, float], list[Any]]:
    """Fit ``module`` on the datamodule of ``source``: loggers (given the module's stored config), the configured
    callbacks plus :class:`FinalCheckpoint`, then ``Trainer.fit`` resuming from ``cfg.ckpt_path`` or, with
    ``auto_resume``, the run folder's ``last.ckpt`` (the CSV log continues the checkpoint's run's:
    :func:`continue_csv_logs`). A pre-emption signal ends it with a checkpoint and
    :class:`Preempted` (``lit/preemption.py``). ``run_cfg``: the model's config where it is not ``cfg`` (its
    ``datamodule`` and ``trainer`` are used).

    Returns ``train/steps``, ``train/wall_time_s`` (since ``t0``, plus the time of the segments before the
    checkpoint it resumed from: :class:`TrainingClock`), ``train/segments`` (1 for a run never resumed), the
    last ``val/`` metrics and, with the ``Throughput`` callback, its summary (``train/img_per_s``, ...),
    and the loggers.
    """
    run_cfg = cfg if run_cfg is None else run_cfg
    dm = build_datamodule(run_cfg, source)
    ckpt_path = resume_path(cfg, out)
    start = checkpoint_step(ckpt_path) if ckpt_path else None
    max_steps = run_cfg.trainer.get("max_steps")
    if start is not None and max_steps is not None and 0 <= int(max_steps) <= start:
        log.warning("resume: %s is already at step %d, trainer.max_steps=%d: no training step to take (raise "
                    "trainer.max_steps to train further)", ckpt_path, start, int(max_steps))
    loggers = instantiate_all(with_wandb_resume(cfg.get("logger"), out, fresh=ckpt_path is None))
    continue_csv_logs(loggers, out, ckpt_path, start)
    for lg in loggers:
        choices = getattr(module, "config_choices", None)
        lg.log_hyperparams({**(module.config_dict or {}), **({"choices": choices} if choices else {})})
    clock = TrainingClock(t0, checkpoint_training_time(ckpt_path))
    # FinalCheckpoint writes last.ckpt in on_train_end before PreemptionCheckpoint's, which then only stops
    callbacks = instantiate_all(cfg.get("callbacks")) + [
        clock, RunOrigin(run_origin(cfg, ckpt_path)), ResumedLogStep(), FinalCheckpoint(out / "checkpoints"),
        PreemptionCheckpoint(last_checkpoint(out), written_at_train_end=True)]
    overrides = {}
    n = getattr(getattr(module, "optim_cfg", None), "accumulate_grad_batches", 1)
    interval = run_cfg.trainer.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):
        callbacks.append(StepValidation(interval))  # val_every counts optimizer steps; Lightning counts batches
        if n > 1:  # what Lightning itself would count (its decision is replaced by StepValidation's)
            overrides["val_check_interval"] = interval * n
    if n > 1:  # Lightning counts batches: logs at every n-th micro-batch wrote each step's row n times (audit)
        overrides["log_every_n_steps"] = int(run_cfg.trainer.get("log_every_n_steps") or 50) * n
    trainer = make_trainer(run_cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except Preempted as stop:  # checkpoint written, loggers closed: requeue (SLURM) or exit 128 + signal
        preemption.finish(stop, rerun_hint(out))
    finally:
        preemption.remember_launched(trainer)  # the other local ranks' processes, for the test phase's signals
    train_time = clock.seconds()
    # under ddp_spawn the main process's trainer never stepped: read the step from the final checkpoint
    last = last_checkpoint(out)
    steps = trainer.global_step or checkpoint_step(last if last.is_file() or not ckpt_path else ckpt_path) or 0
    metrics = {"train/steps": float(steps), "train/wall_time_s": train_time, "train/segments": float(clock.segments)}
    # a run resumed after its last validation (stopped right after it) reports it, as the uninterrupted run does
    metrics.update(getattr(module, "last_val_metrics", None) or {})
    # Throughput puts its summary in callback_metrics: the one place a ddp_spawn run sends back to this process
    metrics.update({k: v for k, v in scalar_metrics(trainer.callback_metrics).items()
                    if k.startswith("val/") or k in THROUGHPUT_KEYS})
    return metrics, loggers


def checkpoint_entry(path: str | Path | None, key: str) -> Any:
    """The top-level ``key`` of a checkpoint (memory-mapped: the tensors are not read); ``None`` when there is no
    path, the file is unreadable or the key is absent."""
    if not path:
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(key)
    except (OSError, RuntimeError, pickle.UnpicklingError):
        return None


def ema_in_run(cfg: DictConfig) -> bool:
    """Whether the run trains with the EMA callback, whose weights validation then evaluates."""
    return bool(((cfg.get("callbacks") or {}).get("ema") or {}).get("_target_"))


def tested_with_ema(final: str | Path, want: bool = True) -> bool:
    """Whether the test phase evaluates ``final``'s EMA weights: wanted and stored. A run trained without the EMA
    callback (``~callbacks.ema``, ``callbacks=none``) has its raw weights tested, with a warning (asking for EMA
    weights it does not hold failed after the training)."""
    ema = bool(want) and checkpoint_entry(final, "ema") is not None
    if want and not ema:
        log.warning("the checkpoint %s holds no EMA weights (the EMA callback was off): the test phase evaluates its "
                    "raw weights", final)
    return ema


def checkpoint_step(path: str | Path | None) -> int | None:
    """The ``global_step`` (optimizer steps taken) stored in a Lightning checkpoint; ``None`` if unreadable."""
    step = checkpoint_entry(path, "global_step")
    return None if step is None else int(step)


def checkpoint_run_dir(path: str | Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/<name>.ckpt``); ``None`` for one elsewhere."""
    path = Path(path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def read_rows_before(path: Path, step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a Lightning CSV log logged at a step before ``step`` (steps are 0-based: a
    checkpoint at ``global_step`` ``step`` holds the state after the rows of steps ``0 .. step - 1``)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = []
        for row in reader:
            try:
                if int(float(row.get("step") or "nan")) < step:
                    rows.append(row)
            except ValueError:  # no step: a row no resumed run can place
                continue
    return header, rows


@rank_zero_only
def continue_csv_logs(loggers: list[Any], out: Path, ckpt_path: str | Path | None, step: int | None) -> None:
    """A resumed run continues the CSV log of its checkpoint's run instead of starting a new one.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts (``version: ""`` reuses the folder),
    so a run resumed in its own folder lost the rows before the checkpoint. Here, before the writer starts, the
    rows of the checkpoint's run folder (this run's own for a resume in place; another run's for ``ckpt_path=``
    of a checkpoint elsewhere, if it has a CSV log) logged before the checkpoint's step are read; rows of later
    steps, logged by an interrupted run after its last checkpoint, are left out: the resumed run logs those steps
    again. They are written back as ``metrics.csv`` once the writer has started, and the writer is given their
    header, so that when a later row brings new columns its rewrite of the file (the union of the columns) keeps
    the old rows. Every other case is Lightning's: a fresh log."""
    if not ckpt_path or step is None or (src_run := checkpoint_run_dir(ckpt_path)) is None:
        return
    out = Path(out).resolve()
    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        own = Path(lg.log_dir).resolve() / "metrics.csv"
        if src_run == out:
            src = own
        else:
            try:
                src = src_run / own.relative_to(out)
            except ValueError:  # a log outside the run folder: no source run's log to match it with
                continue
        if not src.is_file():
            continue
        header, rows = read_rows_before(src, step)
        if not header:
            continue
        own.parent.mkdir(parents=True, exist_ok=True)
        tmp = own.with_name(f".{own.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        with warnings.catch_warnings():  # "Previous log files in this directory will be deleted": not these rows
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            experiment = lg.experiment  # Lightning's writer starts: it deletes an existing metrics.csv
        os.replace(tmp, own)
        experiment.metrics_keys = list(header)


def test_checkpoint(cfg: DictConfig, ckpt_path: Path, out: Path, *, kind: str = "score", use_ema: bool = True,
                    source: Any = None, logger: Any = False) -> dict[str, float]:
    """Evaluate the test split (of ``source``, else ``build_data(cfg)``) with the (EMA) weights of a ``kind``
    checkpoint; per-image values go to ``out``."""
    module, _, _ = module_from_checkpoint(ckpt_path, use_ema=use_ema, kind=kind)
    module.output_dir = str(out)
    dm = build_datamodule(cfg, build_data(cfg) if source is None else source)
    progress = (cfg.get("callbacks") or {}).get("progress")  # the run's progress settings (log_every_s, force)
    callbacks = [hydra.utils.instantiate(progress)] if progress and progress.get("_target_") else []
    trainer = make_trainer(cfg.trainer, callbacks=callbacks, logger=logger, enable_checkpointing=False)
    step, zero = checkpoint_step(ckpt_path), is_global_zero()

    def make_stop(signum: int, requeue: bool) -> Preempted:
        return Preempted(signum, -1 if step is None else step, Path(ckpt_path), requeue=requeue, is_global_zero=zero,
                         during="the test evaluation")

    try:  # a signal stops the evaluation at once (exit 128 + signal): the checkpoint is on disk, a rerun tests it
        with preemption.stop_on_signals(make_stop, forward_to=preemption.launched):  # one signal stops every rank
            results = trainer.test(module, datamodule=dm, verbose=False)
    except Preempted as stop:
        preemption.finish(stop, rerun_hint(out))
    return scalar_metrics(results[0] if results else trainer.callback_metrics)


# ----------------------------------------------------------------------------- trainers, metrics, tables
def make_trainer(trainer_cfg: DictConfig, *, callbacks: list | None = None, logger: Any = False, **overrides):
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # signals are scoreflow.lit.preemption's: no second SIGUSR1 handler/requeue
        plugins.append(SLURMEnvironment(auto_requeue=False))
    callbacks = list(callbacks or [])
    if not any(isinstance(c, ProgressBar) for c in callbacks) and trainer_cfg.get("enable_progress_bar", True) \
            and overrides.get("enable_progress_bar", True):
        callbacks.append(TerminalProgressBar())  # one bar style: Lightning's default is Rich when installed
    trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=logger, plugins=plugins, **overrides)
    # scoreflow.lit.preemption owns SIGTERM (and SIGUSR1/2, SIGINT): in the training loop (PreemptionCheckpoint) and
    # in the test phase (stop_on_signals). Lightning's handler, registered at each fit/test, ran first and under DDP
    # called dist.broadcast inside the handler: with the signal on one rank only (kill of rank 0) the test phase
    # waited there for ever, and a rank signalled before the training loop died in a collective.
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and hasattr(connector, "register_signal_handlers"):
        connector.register_signal_handlers = _no_lightning_signal_handlers  # picklable: ddp_spawn pickles the trainer
    return trainer


def _no_lightning_signal_handlers() -> None:
    """Registers nothing: in place of Lightning's ``_SignalConnector.register_signal_handlers`` (make_trainer)."""


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def is_global_zero() -> bool:
    """Whether this process is global rank 0 (Lightning sets the rank when a DDP run starts; 0 outside DDP). Under
    ``strategy=ddp`` every rank runs the task after ``fit``: only rank 0 writes the run's files and prints."""
    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (the standard error of one image, a diverged run's loss) as None:
    ``NaN``/``Infinity`` are not JSON, and strict readers (JavaScript, jq, many dashboards) refuse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json`` atomically (a temporary file of this process, renamed), as strict JSON (non-finite
    numbers as null: :func:`json_safe`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(json_safe(metrics), indent=2, sort_keys=True, allow_nan=False))
    tmp.replace(path)
    return path


def _fmt(mean: float | None, se: float | None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.4f} ± {se:.4f}" if se is not None else f"{mean:.4f}"


def train_speed(metrics: dict[str, float]) -> str | None:
    """The ``Throughput`` summary in one line (``1234 img/s (steady state, 480 steps), 12.3 TFLOP/s, 14.1 % MFU``,
    the parts that are known); ``None`` without one."""
    if "train/img_per_s" not in metrics:
        return None
    steps = int(metrics.get("train/throughput_steps", 0))
    how = (f"steady state, {steps} steps" if metrics.get("train/throughput_steady")
           else f"{steps} steps, not steady state: run shorter than the warm-up")
    parts = [f"{metrics['train/img_per_s']:.0f} img/s ({how})"]
    if "train/tflops" in metrics:
        parts.append(f"{metrics['train/tflops']:.3g} TFLOP/s")
    if "train/mfu" in metrics:
        parts.append(f"{100 * metrics['train/mfu']:.1f} % MFU")
    return ", ".join(parts)


def results_title(tested: bool, module: Any, metrics: dict[str, Any], steps: int, val_every: Any) -> str:
    """The results table's title: the test split, or with ``test=false`` the last validation and its step, or that
    none ran (``val_every`` beyond the run's steps: the table showed "last validation (step 5)" with every value
    ``-``)."""
    if tested:
        return "test split"
    if not any(k.startswith("val/") for k in metrics):
        return f"no validation ran in {steps} steps (val_every={val_every}; test=false)"
    val_step = getattr(module, "last_validation_step", None)  # None under ddp_spawn (its module stayed here)
    return f"validation subset, last validation (step {steps if val_step is None else val_step}; test=false)"


def results_table(metrics: dict[str, float], title: str = "results", extra: dict[str, Any] | None = None) -> str:
    """A short plain-text table of the headline numbers."""
    def bpd(q: str) -> str:
        bad = metrics.get(f"test/{q}_num_nonfinite")
        if bad:  # kept in the mean, which is then not finite: say how many (they were left out, silently)
            n = metrics.get(f"test/{q}_num_images", metrics.get("test/num_images"))
            return f"{metrics.get(f'test/{q}')} ({bad:.0f}{f' of {n:.0f}' if n else ''} images non-finite)"
        return _fmt(metrics.get(f"test/{q}"), metrics.get(f"test/{q}_se"))

    rows = [
        ("bits/dim (ODE)", bpd("bpd_ode")),
        ("bits/dim (bound)", bpd("bpd_bound")),
        ("mean NFE (ODE)", f"{metrics['test/nfe']:.0f}" if "test/nfe" in metrics else "-"),
    ]
    if "test/num_images" in metrics:  # the test phase's (test_subset: debug=fast tests 16 images, not the split)
        rows.append(("images", f"{metrics['test/num_images']:.0f}"))
    if "test/fid" in metrics:
        rows.append(("FID", f"{metrics['test/fid']:.2f}"))
    for k, v in (extra or {}).items():
        rows.append((k, str(v)))
    w = max(len(r[0]) for r in rows)
    lines = [f"== {title} ==", *(f"  {a:<{w}}  {b}" for a, b in rows)]
    return "\n".join(lines)
