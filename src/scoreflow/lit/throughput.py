"""Training throughput (images/s, TFLOP/s, MFU) as a Lightning callback, with no host sync per step.

Lightning's ``ThroughputMonitor`` calls ``torch.cuda.synchronize()`` after every training batch, the per-step
host sync that a fast GPU run must not have. :class:`Throughput` keeps a host-side image count per batch (the
batch's shape, no device access) and reads the clock, after a device sync, only

* at the end of a window of ``every_n_steps`` optimizer steps (logged) and once at the end of the warm-up;
* when the clock pauses (validation, checkpoint writes) and resumes (the next training batch);
* at the end of training (the steady-state summary).

FLOPs per image are counted once, at fit start, by ``FlopCounterMode`` (2 per multiply-add) on one forward +
backward of ``pl_module.score_model`` on a batch of one: the model FLOPs of a denoising score-matching step, so
MFU (their rate over the device's dense peak) compares runs and cards, not the hardware's full instruction count.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from scoreflow.lit.dequant_module import DequantLitModule
from scoreflow.lit.optim import log_every_optimizer_steps

# what ``summary()`` may hold; ``tasks/common.fit`` copies these keys into the run's metrics
SUMMARY_KEYS = ("train/img_per_s", "train/tflops", "train/mfu", "train/throughput_steps", "train/throughput_steady")

# Dense peaks (NVIDIA H100/H200 datasheets, without sparsity; the H200 SXM computes like the H100 SXM, the NVL
# cards alike). Lightning 2.6.6 does not recognise "NVIDIA H200" (the SXM card's name: it expects "sxm1"/"nvl1"),
# its H200 and H100 NVL entries are the with-sparsity figures (twice the dense ones), and an H100 whose name says
# neither HBM3, NVL nor PCIe (e.g. "NVIDIA H100") is unknown to it: SXM, the cards of clusters, is assumed.
_SXM = {torch.float64: 33.5e12, torch.float32: 66.9e12, "tfloat32": 494.7e12, torch.bfloat16: 989.4e12,
        torch.float16: 989.4e12}
_NVL = {torch.float64: 30e12, torch.float32: 60e12, "tfloat32": 417.5e12, torch.bfloat16: 835.5e12,
        torch.float16: 835.5e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one ``device`` computing in ``dtype``; ``None`` where unknown (CPUs, unlisted GPUs).

    float32 counts as TF32 when cuDNN convolutions (``torch.backends.cudnn.allow_tf32``, on by default) or matmuls
    may use it: Lightning looks at the matmul setting only, but the convolutions carry most of a U-Net's FLOPs."""
    if device.type != "cuda":
        return get_available_flops(device, dtype)
    tf32 = torch.backends.cudnn.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    if dtype is torch.float32 and tf32:
        dtype = "tfloat32"
    name = torch.cuda.get_device_name(device).lower()
    if "h200" in name or ("h100" in name and "pcie" not in name and "hbm2e" not in name):
        return (_NVL if "nvl" in name else _SXM).get(dtype)
    if dtype == "tfloat32" and torch.cuda.get_device_capability(device)[0] < 8:
        dtype = torch.float32  # before Ampere there is no TF32
    return get_available_flops(device, dtype)


def training_flops_per_image(score_model: nn.Module, data_shape: tuple[int, ...], device: torch.device) -> int:
    """FLOPs of one forward + backward (gradients of the trainable parameters) of ``score_model(x, t)`` on one
    example ``x [1, *data_shape]``, ``t [1]``, as ``FlopCounterMode`` counts them (2 per multiply-add; matmuls,
    convolutions, attention).

    Leaves no trace: gradients come from ``torch.autograd.grad`` (``.grad`` is untouched, and DDP's hooks on
    gradient accumulation never fire), the network runs in eval mode (no dropout draws, no normalisation
    statistics updated) and its train/eval flags are restored, the global RNGs are restored, and a
    ``torch.compile``\\ d network runs eagerly (a batch of one would otherwise trigger a recompilation with
    dynamic shapes)."""
    params = [p for p in score_model.parameters() if p.requires_grad]
    modes = {m: m.training for m in score_model.modules()}
    dtype = params[0].dtype if params else torch.float32
    x = torch.zeros(1, *data_shape, device=device, dtype=dtype)  # FLOPs do not depend on the values
    t = torch.full((1,), 0.5, device=device, dtype=dtype)
    rng_devices = [device] if device.type == "cuda" else []
    try:
        score_model.eval()
        with torch.random.fork_rng(devices=rng_devices), torch.enable_grad(), \
                torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            out = score_model(x, t)
            if params:
                torch.autograd.grad(out, params, grad_outputs=torch.ones_like(out), allow_unused=True)
    finally:
        for m, training in modes.items():
            m.training = training
    return counter.get_total_flops()


def _counted_flops_apply(pl_module: pl.LightningModule) -> bool:
    """Whether a training step costs one forward + backward of ``score_model`` per image (plain DSM training). Not
    for the classifier (no ``score_model``), ISM (the Hutchinson divergence adds a double backward) or the learned
    dequantizer (``J_phi`` evaluates the network at ``num_t`` more times per image)."""
    return (
        isinstance(getattr(pl_module, "score_model", None), nn.Module)
        and hasattr(pl_module, "data_shape")
        and getattr(pl_module, "loss_name", "dsm") == "dsm"
        and not isinstance(pl_module, DequantLitModule)
    )


def _batch_size(batch: Any) -> int:
    return int((batch[0] if isinstance(batch, (list, tuple)) else batch).shape[0])


class _Mark:
    """The counters at one instant: optimizer step, images of this rank, seconds on the clock."""

    __slots__ = ("step", "images", "seconds")

    def __init__(self, step: int, images: int, seconds: float):
        self.step, self.images, self.seconds = step, images, seconds


class Throughput(Callback):
    """Training images/s over windows of ``every_n_steps`` optimizer steps (default: the trainer's
    ``log_every_n_steps``), logged from rank 0 as ``train/img_per_s`` (all ranks together), with ``train/tflops``
    where the FLOPs per image are counted and ``train/mfu`` (fraction of the devices' dense peak) where the peak
    is known too (CUDA). Validation (and the sanity check) and checkpoint writes are off the clock: it pauses in
    ``on_validation_start`` and ``on_save_checkpoint`` and resumes at the next training batch, so the loading of
    that batch is not timed either.

    After training, :meth:`summary` (also put in ``trainer.callback_metrics``, which a ``ddp_spawn`` run sends back
    to the main process) gives the rate after the first ``warmup_steps`` steps (``torch.compile``, cuDNN
    autotuning, allocator growth); a run too short for that averages the steps after its first window
    (``train/throughput_steady`` 0). Nothing is checkpointed: a resumed run starts measuring afresh.

    Args:
        every_n_steps: steps per logged window; ``None``: ``trainer.log_every_n_steps`` (0: no windows logged).
        warmup_steps: steps of this run left out of the summary.
        count_flops: count the FLOPs per image at fit start (for TFLOP/s and MFU).
    """

    def __init__(self, every_n_steps: int | None = None, warmup_steps: int = 20, count_flops: bool = True):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be positive or None, got {every_n_steps}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.every_n_steps = every_n_steps
        self.warmup_steps = warmup_steps
        self.count_flops = count_flops
        self.flops_per_image: int | None = None
        self.peak_flops: float | None = None
        self._reset()

    def _reset(self) -> None:
        self._window = 0
        self._world_size = 1
        self._images = 0  # this rank's training images so far
        self._seconds = 0.0  # clock time up to the last reading
        self._t0: float | None = None  # perf_counter at the last reading while the clock runs; None: paused
        self._step = self._first_step = 0  # set at the first batch (a resumed run's step is restored after fit start)
        self._start: _Mark | None = None  # the first training batch
        self._first_window: _Mark | None = None
        self._last_window: _Mark | None = None
        self._steady: _Mark | None = None  # the end of the warm-up
        self._summary: dict[str, float] = {}

    # ------------------------------------------------------------------ the clock
    @staticmethod
    def _sync(trainer: pl.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def _read(self, trainer: pl.Trainer) -> None:
        """Bring ``_seconds`` up to now (after the device has finished the queued work)."""
        if self._t0 is None:
            return
        self._sync(trainer)
        now = time.perf_counter()
        self._seconds += now - self._t0
        self._t0 = now

    def _pause(self, trainer: pl.Trainer) -> None:
        self._read(trainer)
        self._t0 = None

    def _mark(self) -> _Mark:
        return _Mark(self._step, self._images, self._seconds)

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self._world_size = trainer.world_size
        self._window = self.every_n_steps if self.every_n_steps is not None else \
            log_every_optimizer_steps(trainer, pl_module)
        if self.count_flops and self.flops_per_image is None and _counted_flops_apply(pl_module):
            self.flops_per_image = training_flops_per_image(
                pl_module.score_model, tuple(pl_module.data_shape), pl_module.device
            )
        self.peak_flops = peak_flops(trainer.strategy.root_device, _plugin_to_compute_dtype(trainer.precision_plugin))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._t0 is not None:
            return
        self._sync(trainer)  # validation's queued work is not training time
        self._t0 = time.perf_counter()
        if self._start is None:
            self._step = self._first_step = trainer.global_step
            self._start = self._mark()
            if self.warmup_steps == 0:
                self._steady = self._start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += _batch_size(batch)  # every batch drawn, skipped steps (non-finite loss) included
        step = trainer.global_step
        if step == self._step:  # no optimizer step happened
            return
        self._step = step
        window_end = bool(self._window) and step % self._window == 0
        warmup_end = self._steady is None and step - self._first_step >= self.warmup_steps
        if not (window_end or warmup_end):
            return
        self._read(trainer)
        if warmup_end:
            self._steady = self._mark()
        if window_end:
            previous, self._last_window = self._last_window or self._start, self._mark()
            self._first_window = self._first_window or self._last_window
            # logged at the step Lightning gives this batch's own `self.log` values (one below global_step), or at
            # the module's own x axis (the optimizer step, under gradient accumulation)
            axis = getattr(pl_module, "optimizer_step_axis", None)
            log_step = axis() if axis is not None else None
            if log_step is None:
                log_step = trainer.fit_loop.epoch_loop._batches_that_stepped
            self._log(trainer, self._rates(previous, self._last_window), log_step)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._pause(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause(trainer)
        end = self._mark()
        steady = self._steady is not None and end.step > self._steady.step
        begin = self._steady if steady else next(
            (m for m in (self._first_window, self._start) if m is not None and end.step > m.step), None)
        if begin is None:
            return
        self._summary = self._rates(begin, end)
        if self._summary:
            self._summary["train/throughput_steps"] = float(end.step - begin.step)
            self._summary["train/throughput_steady"] = float(steady)
            if trainer.is_global_zero:
                summary = {k: torch.tensor(v, dtype=torch.float64) for k, v in self._summary.items()}
                trainer.callback_metrics.update(summary)

    # ------------------------------------------------------------------ results
    def _rates(self, begin: _Mark, end: _Mark) -> dict[str, float]:
        seconds = end.seconds - begin.seconds
        if seconds <= 0 or end.images <= begin.images:
            return {}
        img_per_s = (end.images - begin.images) * self._world_size / seconds
        out = {"train/img_per_s": img_per_s}
        if self.flops_per_image:
            out["train/tflops"] = img_per_s * self.flops_per_image / 1e12
            if self.peak_flops:
                out["train/mfu"] = img_per_s * self.flops_per_image / (self.peak_flops * self._world_size)
        return out

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        # straight to the loggers: a window's end need not fall on a step where Lightning flushes `self.log` values
        if not metrics or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def summary(self) -> dict[str, float]:
        """``train/img_per_s`` after the warm-up (all ranks), ``train/tflops`` and ``train/mfu`` where known, and
        ``train/throughput_steps`` (steps averaged) and ``train/throughput_steady`` (1: the warm-up was left out; 0:
        the run was shorter, the steps after the first window are averaged); empty before the end of training."""
        return dict(self._summary)
