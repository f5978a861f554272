"""Lightning's tqdm bars on a terminal only: in a log file (SLURM, ``> out.txt``, a subprocess) every redraw
and every validation bar is a line of noise around the lines that matter. There, a plain progress line instead,
at most one per ``log_every_s`` seconds and stage (training, validation, test), so that a log shows a run is alive
and when it will end::

    progress: train step 1200/3600 (33 %), 14.1 steps/s, ~2m50s left, train/loss 0.123
    progress: test batch 12/50 (24 %), 3m10s elapsed, ~10m02s left

The metrics are in the CSV/W&B logs and the final table either way. ``force=true`` keeps the bars everywhere;
``log_every_s=0`` turns the lines off."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

log = logging.getLogger("scoreflow.progress")


def duration(seconds: float) -> str:
    """``'45s'``, ``'2m50s'``, ``'3h05m'``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class TerminalProgressBar(TQDMProgressBar):
    """tqdm bars on a terminal; plain ``progress:`` log lines every ``log_every_s`` seconds elsewhere (rank 0)."""

    def __init__(self, refresh_rate: int = 10, process_position: int = 0, leave: bool = False, force: bool = False,
                 log_every_s: float = 120.0):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if log_every_s < 0:
            raise ValueError(f"log_every_s must be >= 0 (0: no progress lines), got {log_every_s}")
        self.lines = not force and not sys.stdout.isatty()  # the bars write to stdout
        if self.lines:
            self.disable()
        self.log_every_s = float(log_every_s)
        self._stage_start: dict[str, float] = {}
        self._last_line: dict[str, float] = {}
        self._fit_start_step = 0

    # ------------------------------------------------------------------ the lines
    def _due(self, trainer: pl.Trainer, stage: str) -> bool:
        if not self.lines or not self.log_every_s or not trainer.is_global_zero:
            return False
        now = time.monotonic()
        if now - self._last_line.get(stage, self._stage_start.get(stage, now)) < self.log_every_s:
            return False
        self._last_line[stage] = now
        return True

    def _start(self, stage: str) -> None:
        self._stage_start[stage] = time.monotonic()
        self._last_line.pop(stage, None)

    def _elapsed(self, stage: str) -> float:
        return time.monotonic() - self._stage_start.get(stage, time.monotonic())

    def _batch_done(self, trainer: pl.Trainer, stage: str, done: int, total: float | int | None) -> None:
        """A validation or test batch ended: its ``progress:`` line when one is due."""
        if not self._due(trainer, stage):
            return
        elapsed = self._elapsed(stage)
        if total is None or not math.isfinite(total) or total <= 0:
            log.info("progress: %s batch %d, %s elapsed", stage, done, duration(elapsed))
            return
        left = elapsed / max(done, 1) * (total - done)
        log.info("progress: %s batch %d/%d (%.0f %%), %s elapsed, ~%s left", stage, done, int(total),
                 100 * done / total, duration(elapsed), duration(left))

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start("train")
        self._fit_start_step = trainer.global_step  # a resumed run starts at its checkpoint's step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self._due(trainer, "train"):
            return
        step, elapsed = trainer.global_step, self._elapsed("train")
        taken = step - self._fit_start_step
        rate = taken / elapsed if elapsed > 0 else 0.0
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        parts = [f"train step {step}/{total} ({100 * step / total:.0f} %)" if total else f"train step {step}",
                 f"{rate:.1f} steps/s"]
        if total and rate > 0:  # validation pauses included: the time the run will really take
            parts.append(f"~{duration((total - step) / rate)} left")
        for k, v in trainer.callback_metrics.items():  # the last logged training loss (one host sync per line)
            if k.startswith("train/") and "loss" in k and getattr(v, "numel", lambda: 1)() == 1:
                parts.append(f"{k} {float(v):.4g}")
        log.info("progress: %s", ", ".join(parts))

    # ------------------------------------------------------------------ validation and test
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._start("validation")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._batch_done(trainer, "validation", batch_idx + 1, self.total_val_batches_current_dataloader)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._start("test")
        if self.lines and self.log_every_s and trainer.is_global_zero:  # the test phase can take hours: say so
            total = sum(n for n in trainer.num_test_batches if math.isfinite(n))
            log.info("progress: test started, %d batch%s", total, "" if total == 1 else "es")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._batch_done(trainer, "test", batch_idx + 1, self.total_test_batches_current_dataloader)
