"""Callbacks: periodic sample grids (EMA weights, PNG + logger) and atomic checkpoint writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from scoreflow.sampling import sample, sampler_options
from scoreflow.visualize import levels_to_unit, log_image, save_image_grid, save_scatter


class SampleGrid(Callback):
    """Every ``every_n_steps`` optimizer steps (at the next validation, so EMA weights are in place),
    draw ``num_samples`` samples with fixed per-sample seeds, save ``samples/step_XXXXXXX.png`` in the run
    directory and log the image to W&B / TensorBoard when those loggers are active.

    Args:
        sampler: a sampler as ``conf/sampler/*.yaml`` gives it: a partial of a registered sampler function (what
            Hydra instantiates from ``_target_`` + ``_partial_: true``) or a mapping (``_target_`` or ``kind``, and
            options); default: the probability-flow ODE, RK4 with 50 steps.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 64,
        sampler: Callable[..., Any] | Mapping[str, Any] | None = None,
        dirname: str = "samples",
    ):
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.kind, self.options = sampler_options(sampler or {"kind": "ode", "method": "rk4", "steps": 50})
        self.dirname = dirname
        self._last = 0

    def state_dict(self) -> dict[str, Any]:  # a resumed run draws its next grid when the uninterrupted one would
        return {"last": self._last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last = int(state_dict.get("last", 0))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.every_n_steps:
            return
        step = trainer.global_step
        final = trainer.max_steps and step >= trainer.max_steps
        if step < self._last + self.every_n_steps and not final:
            return
        self._last = step
        self.draw(trainer, pl_module, step)

    @torch.no_grad()
    def draw(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Path | None:
        """Draw the grid; on several processes each draws every ``world``-th seed and rank 0 gathers them (each rank
        drew all of them before), so a fixed-step sampler's grid is the same on any number of processes."""
        shape = tuple(pl_module.data_shape)
        world, rank = int(getattr(trainer, "world_size", 1)), int(trainer.global_rank)
        seeds = list(range(rank, self.num_samples, world))
        x = torch.zeros((0, *shape), device=pl_module.device)  # a rank past the last seed draws none
        if seeds:
            res = sample(pl_module._score_fn(), pl_module.sde, (len(seeds), *shape), seeds=seeds,
                         device=pl_module.device, kind=self.kind, **self.options)
            x = res.samples
        x = (x.float() - pl_module.shift) / pl_module.scale
        if world > 1:
            x = gather_interleaved(pl_module, x, self.num_samples)
        if rank != 0:
            return None
        out = Path(pl_module.output_dir or trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step_{step:07d}.png"
        if len(shape) == 3:
            save_image_grid(levels_to_unit(x, pl_module.num_levels), path)
        else:
            save_scatter(x, path, title=f"samples at step {step}")
        for logger in trainer.loggers:
            log_image(logger, "samples", path, logged_step(pl_module, step))
        return path


def gather_interleaved(pl_module: pl.LightningModule, x: torch.Tensor, n: int) -> torch.Tensor:
    """Rank ``r``'s rows are items ``r, r + world, ...`` of ``n``: all ranks' rows back in item order (padded to one
    length for the collective, the padding dropped)."""
    world = int(pl_module.trainer.world_size)
    per = -(-n // world)
    padded = x.new_zeros((per, *x.shape[1:]))
    padded[: x.shape[0]] = x
    every = pl_module.all_gather(padded)  # [world, per, ...]
    return every.transpose(0, 1).reshape(world * per, *x.shape[1:])[:n]


def logged_step(pl_module: pl.LightningModule, step: int) -> int:
    """The loggers' x value of what a validation pass logs after ``step`` optimizer steps: the 0-based step its
    numbers are logged at (Lightning's ``step - 1``, or the module's optimizer-step axis under accumulation or after
    a skipped step), so a sample grid drawn in that pass sits at its validation's step (it was one to the right)."""
    axis = getattr(pl_module, "optimizer_step_axis", None)
    index = axis() if callable(axis) else None
    return index if index is not None else max(step - 1, 0)


class StepValidation(Callback):
    """Validate every ``every`` optimizer steps (``trainer.global_step``), not every ``every`` training batches as
    Lightning counts them: a batch whose step the NaN guard skipped, or a micro-batch of gradient accumulation, is a
    batch but no step. Counting batches moved every validation after a skipped step one step early and dropped the
    one at ``trainer.max_steps`` (with it the ODE validation the default run computes there). Lightning has no
    public hook for this: the training epoch loop's ``_should_check_val_fx`` is replaced for the fit (its other
    cases, stopping early, are kept)."""

    def __init__(self, every: int):
        self.every = int(every)
        self._last: int | None = None  # the step validated last (never twice at one step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        if self.every < 1 or not hasattr(loop, "_should_check_val_fx"):
            return
        self._last = trainer.global_step  # a resumed run: its start step is not validated again

        def should_check(data_fetcher: Any) -> bool:
            if not loop._should_check_val_epoch():
                return False
            if trainer.should_stop and getattr(trainer.fit_loop, "_can_stop_early", False):
                return True
            step = trainer.global_step
            if step == self._last or step % self.every:
                return False
            self._last = step
            return True

        loop._should_check_val_fx = should_check


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (``every_n_train_steps``: ``checkpoints/last.ckpt`` every ``checkpoint_every``
    steps, the Table-2 snapshots) whose save at step s waits until that step is complete: its logged values, and its
    validation and sample grid when one is due, i.e. until the start of the next training batch or the end of
    training. Written at the end of the step itself, as Lightning writes it, the checkpoint is restored as if that
    step's validation had not happened, so a run killed during that validation (SIGKILL, out of memory, a lost node)
    and resumed from it never ran it. The pre-emption checkpoint waits the same way and calls :meth:`flush` before it
    stops the run. The decision (which steps, which file) is Lightning's, unchanged."""

    _pending: int | None = None  # the batch index whose end asked for a save

    def _generate_state_key(self, **kwargs: Any) -> str:  # ModelCheckpoint's: checkpoints of earlier releases,
        return f"ModelCheckpoint{kwargs!r}"  # which it wrote, restore its state without a missing-callback warning

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._pending = batch_idx

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.flush(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush(trainer, pl_module)
        super().on_train_end(trainer, pl_module)

    def flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's save decision for the last completed step, now that it is complete."""
        if self._pending is not None:
            batch_idx, self._pending = self._pending, None
            super().on_train_batch_end(trainer, pl_module, None, None, batch_idx)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file in the same folder, then ``os.replace``: a crash mid-write
    never leaves a truncated ``last.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
