"""The one optimization mechanism of every module: Adam + warm-up (+ cosine decay) + global-norm clip, stepped
by hand so that a non-finite loss or gradient norm skips the step (counted, logged) and too many in a row stop
the run with a message naming the step.

Two guards, the same maths when every step is finite:

* default: the loss and the gradient norm are checked on the host (one device sync per step); a skipped step
  does not count (``global_step``, the learning-rate schedule and the EMA do not advance);
* ``module.optim.fused=true``: ``Adam(fused=True)``, and the check stays on the device: the fused kernel gets the
  step's non-finite flag as ``found_inf`` (the mechanism of ``torch.amp.GradScaler``) and leaves the weights, the
  moments and Adam's step count unchanged, so the host never waits for the device. The skipped step still counts
  as a step (``global_step``, schedule, EMA ramp; the EMA averages the unchanged weights once more). Counts are
  kept on the device and read every ``trainer.log_every_n_steps`` steps (and before a checkpoint), where a warning
  is printed and a streak of ``max_bad_steps`` stops the run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from scoreflow.lit.settings import OptimConfig, adam_only_settings

log = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    pass


def lr_factor(step: int, warmup_steps: int, decay_steps: int | None = None, min_lr_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up over ``warmup_steps`` (ScoreFlow's schedule), then, if
    ``decay_steps`` is set, a cosine decay to ``min_lr_ratio`` at step ``decay_steps`` (held there after)."""
    # (step + 1): the first update already has lr / warmup_steps; ScoreFlow/score_sde use step / warmup, whose first
    # update has lr 0 (the schedules differ by one step of 5000)
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if not decay_steps or decay_steps <= warmup_steps:
        return warm
    frac = min(1.0, max(0.0, (step - warmup_steps) / (decay_steps - warmup_steps)))
    return warm * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac)))


OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""``factory(params, lr=...) -> Optimizer``: a Hydra ``_partial_`` optimizer (``module.optimizer``)."""


def adam_with_warmup(params: list[torch.nn.Parameter], o: OptimConfig | dict[str, Any],
                     factory: OptimizerFactory | None = None) -> dict[str, Any]:
    """Adam (or ``factory(params, lr=o.lr)``) with a linear learning-rate warm-up over ``o.warmup_steps`` steps
    (docs/reference.md §7) and an optional cosine decay (``o.decay_steps``, ``o.min_lr_ratio``), per step."""
    o = OptimConfig.from_mapping(o)
    if factory is None:
        # foreach: torch's default on GPUs, but not on CPUs, where the per-tensor loop cost 2.8 ms a step for the
        # default run's unet_small against 2.0 (the same weights, bit for bit: tests/unit/test_units.py)
        opt = torch.optim.Adam(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                               foreach=None if o.fused else True, fused=True if o.fused else None)
    else:
        adam_only = adam_only_settings(o)
        if adam_only:
            raise ValueError(f"module.optim {adam_only} set the built-in Adam, but module.optimizer gives the "
                             "optimizer: put them on module.optimizer")
        opt = factory(params, lr=o.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, o.decay_steps, o.min_lr_ratio))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def apply_requested_settings(opt: torch.optim.Optimizer, sched: Any, o: OptimConfig, builtin_adam: bool) -> list[str]:
    """After a checkpoint restored ``opt`` and ``sched``: the requested ``o.lr`` (and, for the built-in Adam, its
    ``betas``, ``eps``, ``weight_decay``, ``fused``) in place of the stored ones, which Lightning's restore brings
    back silently. The schedule's step is kept: the warm-up/decay factor of the current step applies to the new
    learning rate. Returns ``'<key> <stored> -> <requested>'`` for each change (empty when nothing differs: an
    exact resume is untouched)."""
    changes: dict[str, str] = {}
    for i, group in enumerate(opt.param_groups):
        base = float(group.get("initial_lr", group["lr"]))
        factor = sched.lr_lambdas[i](sched.last_epoch) if sched is not None and hasattr(sched, "lr_lambdas") else None
        if not math.isclose(base, o.lr, rel_tol=1e-12, abs_tol=0.0):
            changes["lr"] = f"lr {base:g} -> {o.lr:g}"
            group["initial_lr"] = o.lr
            if sched is not None and hasattr(sched, "base_lrs"):
                sched.base_lrs[i] = o.lr
            group["lr"] = o.lr * (1.0 if factor is None else factor)
        elif factor is not None and not math.isclose(group["lr"], o.lr * factor, rel_tol=1e-9, abs_tol=1e-15):
            # the same lr, another warm-up/decay: the stored rate was the old schedule's at this step
            changes.setdefault("schedule", f"learning rate at this step {group['lr']:g} -> {o.lr * factor:g} "
                                           "(warm-up/decay settings)")
            group["lr"] = o.lr * factor
        if sched is not None and hasattr(sched, "_last_lr") and i < len(sched._last_lr):
            sched._last_lr[i] = group["lr"]
        if not builtin_adam:
            continue
        requested = {"betas": tuple(float(b) for b in o.betas), "eps": float(o.eps),
                     "weight_decay": float(o.weight_decay)}
        for key, want in requested.items():
            have = group.get(key)
            have = tuple(float(b) for b in have) if key == "betas" else float(have)
            if have != want:
                changes[key] = f"{key} {have} -> {want}"
                group[key] = want
        if bool(group.get("fused")) != bool(o.fused):
            changes["fused"] = f"fused {bool(group.get('fused'))} -> {bool(o.fused)}"
            group["fused"], group["foreach"] = (True, None) if o.fused else (None, True)
    if changes and sched is not None and hasattr(sched, "_last_lr"):
        sched._last_lr = [float(g["lr"]) for g in opt.param_groups]
    return list(changes.values())


def log_every_optimizer_steps(trainer: Any, module: Any) -> int:
    """``trainer.log_every_n_steps`` in optimizer steps. Lightning counts batches; under gradient accumulation
    ``tasks.common.fit`` gives the trainer ``log_every_n_steps`` times ``accumulate_grad_batches``, so that it
    writes once per logged optimizer step (at its last micro-batch), not at each of its micro-batches."""
    every = int(getattr(trainer, "log_every_n_steps", 50) or 50)
    n = int(getattr(getattr(module, "optim_cfg", None), "accumulate_grad_batches", 1) or 1)
    return max(1, every // n)


class GuardedOptimization(pl.LightningModule):
    """Manual optimization with the NaN guard, shared by the score, dequantization and classifier modules.

    Subclasses set ``self.optim_cfg`` (an :class:`OptimConfig`), ``self.max_bad_steps`` and, to replace the built-in
    Adam, ``self.optimizer_factory`` (``factory(params, lr=...)``), and call
    :meth:`guarded_step` with the training loss; ``bad_steps_total`` is checkpointed by the subclass.
    """

    optim_cfg: OptimConfig
    optimizer_factory: OptimizerFactory | None = None
    max_bad_steps: int = 20

    def on_train_start(self) -> None:
        """A resumed run trains with the requested optimizer settings, not the checkpoint's
        (:func:`apply_requested_settings`); a change is logged once."""
        self._guard_at_end = None  # a new fit: guard_state is the live one again
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return
        configs = trainer.lr_scheduler_configs
        changes = apply_requested_settings(trainer.optimizers[0], configs[0].scheduler if configs else None,
                                           self.optim_cfg, self.optimizer_factory is None)
        if changes and trainer.is_global_zero:
            log.warning("resume: module.optim differs from the checkpoint's (stored -> requested): %s; the requested "
                        "values apply from step %d", ", ".join(changes), trainer.global_step)

    def _init_guard(self) -> None:
        self.automatic_optimization = False
        self.bad_steps_total = 0
        self._bad_in_a_row = 0
        self._bad_counts: Tensor | None = None  # fused guard, on the device: (skipped since last read, streak, max)
        self._bad_read_step = 0  # global_step of the last read of those counts
        self._guard_at_end: dict[str, int] | None = None  # guard_state before the end-of-fit read
        self._micro = 0  # micro-batches of the current optimizer step so far (optim.accumulate_grad_batches)
        self._skipped = False  # the default guard skipped the step of the current batch (no global_step)
        self._loss_ok: Tensor | None = None  # every loss of those micro-batches finite
        self._loss_sum: Tensor | None = None  # their losses summed (train/loss logs the mean)
        self._trainable: list[Tensor] | None = None  # the optimizer's parameters (configure_optimizers), clipped
        self._step_logs: dict[str, tuple[Any, dict[str, Any]]] = {}  # log_step: the latest value of each name

    def log_step(self, name: str, value: Any, **kwargs: Any) -> None:
        """A training value of this step (``train/loss``, ...), passed to Lightning's ``self.log`` (``on_step``) in
        :meth:`on_train_batch_end` of the batches whose step logs Lightning writes (every
        ``trainer.log_every_n_steps``, and when training stops), so the loggers and the progress bar get the same
        values as with a ``self.log`` at every step. A ``self.log`` costs ~0.2 ms of host time (Lightning moves its
        stored result to the value's device at each call): 4 a step were more than the rest of the step's Python
        besides the network, on the host that a GPU step waits for."""
        self._step_logs[name] = (value, kwargs)

    def _step_logs_written_now(self) -> bool:
        trainer = self._trainer
        if trainer is None:
            return True
        flag = getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", None)
        return True if flag is None else bool(flag or trainer.fast_dev_run)  # unknown Lightning: every step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after the callbacks' on_train_batch_end (which may stop training: Lightning then writes this step's logs)
        # and right before Lightning decides, with the same test, whether to write this step's logs
        # only at an optimizer step's end (its last micro-batch): its own values, not the previous step's
        if self._step_logs and not self.accumulating and self._step_logs_written_now():
            for name, (value, kwargs) in self._step_logs.items():
                self.log(name, value, on_step=True, on_epoch=False, **kwargs)
            self.log_optimizer_step_axis(on_step=True, on_epoch=False)

    def optimizer_step_axis(self) -> int | None:
        """While fitting, the loggers' x axis: the optimizer step this batch belongs to (0-based: step ``k``'s values
        at ``k``, and a validation after ``k + 1`` steps at ``k``, as Lightning logs them), instead of Lightning's
        count of batches, which under manual optimization counts micro-batches and the batches whose step the
        default guard skipped. A skipped step's row is at the step it attempted, which the next batch takes again.
        ``None`` (Lightning's own axis, the same numbers) without accumulation until a step is skipped."""
        if self._trainer is None or self.trainer.state.fn != "fit":
            return None
        if self.optim_cfg.accumulate_grad_batches == 1 and not self.bad_steps_total:
            return None
        # inside an optimizer step (micro-batches left) or after a skipped one: that step, global_step; after a
        # step: global_step - 1
        return self.global_step if self._micro or self._skipped else max(self.global_step - 1, 0)

    def log_optimizer_step_axis(self, **kwargs: Any) -> None:
        """Log :meth:`optimizer_step_axis` as ``step``, Lightning's documented override of the logged step; called
        where the step's training values and the validation results are logged (nothing without accumulation)."""
        if (index := self.optimizer_step_axis()) is not None:
            self.log("step", float(index), **kwargs)

    @property
    def accumulating(self) -> bool:
        """Inside an optimizer step of several micro-batches (``optim.accumulate_grad_batches``): gradients are
        partial, so no checkpoint is written now (pre-emption waits for the step's last micro-batch)."""
        return self._micro != 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # DDP: only the step's last micro-batch all-reduces (DDP reads the flag in its forward, which comes next)
        n = self.optim_cfg.accumulate_grad_batches
        ddp = getattr(self._trainer.strategy, "model", None) if self._trainer is not None else None
        if n > 1 and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            ddp.require_backward_grad_sync = self._micro == n - 1

    def configure_optimizers(self):
        precision = str(getattr(self._trainer, "precision", "32-true"))
        if precision.startswith("16"):
            raise ValueError(
                f"trainer.precision={precision} is not supported: fp16 needs loss scaling (a GradScaler), under which "
                "the gradient clip and the NaN guard of this manual optimization would see scaled gradients, and "
                "fp16 weights would reach the float32/float64 likelihood; use trainer.precision=bf16-mixed (Ampere "
                "or newer) or 32-true")
        if self.optim_cfg.accumulate_grad_batches < 1:
            raise ValueError(f"module.optim.accumulate_grad_batches must be >= 1, got "
                             f"{self.optim_cfg.accumulate_grad_batches}")
        self._trainable = [p for p in self.parameters() if p.requires_grad]  # what the clip sees, every step
        self._step_logs = {}
        return adam_with_warmup(self._trainable, self.optim_cfg, self.optimizer_factory)

    def guarded_step(self, loss: Tensor, batch_index: int) -> Tensor | None:
        """Backward, clip and step on ``loss``; skip the step (and return ``None``) when the loss or the gradient
        norm is not finite. Logs ``train/loss``, ``train/grad_norm``, ``train/lr``; returns the gradient norm.

        Every rank runs the backward, even of a non-finite loss (DDP all-reduces the gradients inside it: a rank
        that left it out would leave the others waiting), and the ranks agree on the skip (the flag's maximum over
        ranks), so the replicas stay identical. With ``optim.fused`` the skip happens on the device and the
        gradient norm is always returned.

        With ``optim.accumulate_grad_batches = n > 1`` an optimizer step takes ``n`` calls (micro-batches): each
        backpropagates ``loss / n`` into the summed gradients and returns ``None`` except the last, which clips,
        checks (every loss of the step and the gradient norm) and steps as above."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        n = self.optim_cfg.accumulate_grad_batches
        if self._micro == 0:
            opt.zero_grad(set_to_none=True)
            self._loss_ok = None
            self._skipped = False
        self.manual_backward(loss / n if n > 1 else loss)
        ok = torch.isfinite(loss.detach())
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok
        self._loss_sum = loss.detach() if self._micro == 0 else self._loss_sum + loss.detach()
        self._micro = (self._micro + 1) % n
        if self._micro:
            return None
        # the step's loss: the mean over its micro-batches (NaN in the logs when one is NaN)
        self.log_step("train/loss", self._loss_sum / n if n > 1 else self._loss_sum, prog_bar=True)
        loss_ok = self._loss_ok
        clip = self.optim_cfg.grad_clip
        params = self._trainable  # set with the optimizer: walking the modules every step cost up to ~0.4 ms
        if params is None:  # a step without configure_optimizers (an optimizer set up by hand)
            params = [p for p in self.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else math.inf)
        bad = self._agree((~(loss_ok & torch.isfinite(gnorm))).to(torch.float32))
        if self.optim_cfg.fused:
            return self._step_on_device(opt, sched, bad, gnorm, batch_index)
        lr = sched.get_last_lr()[0]  # the rate of this step (after sched.step() it is the next step's)
        # this step's own values, also when it is skipped (a skipped row showed the last good step's, so a
        # diverging run looked normal on the dashboard; audit)
        self.log_step("train/grad_norm", gnorm.detach())
        self.log_step("train/lr", lr)
        if bad.item():
            opt.zero_grad(set_to_none=True)
            if not loss_ok:
                why = f"non-finite loss ({float(loss.detach())})" if n == 1 else \
                    f"non-finite loss in one of its {n} micro-batches"
            elif not torch.isfinite(gnorm):
                why = f"non-finite gradient norm ({float(gnorm)})"
            else:
                why = "non-finite loss or gradient norm on another rank"
            self._skip(why, batch_index)
            self._skipped = True  # this batch's row is logged at the step it attempted (optimizer_step_axis)
            return None
        opt.step()
        sched.step()
        self._bad_in_a_row = 0
        return gnorm

    def _agree(self, flag: Tensor) -> Tensor:
        """The maximum of ``flag`` over the ranks (one all-reduce, queued on the device: no host sync)."""
        if self._trainer is not None and self.trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def _step_on_device(self, opt, sched, bad: Tensor, gnorm: Tensor, batch_index: int) -> Tensor:
        inner = opt.optimizer
        inner.found_inf = bad  # fused Adam: no update of weights, moments or step where 1
        lr = sched.get_last_lr()[0]  # the rate of this step (after sched.step() it is the next step's)
        opt.step()
        inner.found_inf = None
        sched.step()
        self._count_bad(bad)
        self.log_step("train/grad_norm", gnorm.detach())
        self.log_step("train/lr", lr)
        every = log_every_optimizer_steps(self._trainer, self)
        if self.global_step - self._bad_read_step >= every:
            self.read_bad_steps(batch_index)
        return gnorm

    def bad_streak(self) -> int:
        """The current run of skipped steps (checkpointed: a resumed run does not start its count again). The
        fused guard's count is on the device."""
        if self.optim_cfg.fused and self._bad_counts is not None:
            return int(self._bad_counts[1])
        return self._bad_in_a_row

    def guard_state(self) -> dict[str, int]:
        """The guard's checkpoint entries: ``bad_steps_total`` (every skipped step, read or not), ``bad_streak``
        and, for the fused guard, its device counts as they are (``bad_unread``, ``bad_longest``) and the step
        they were last read at (``bad_read_step``). They were read (and reset) when a checkpoint was saved, and the
        read step was not kept: a resumed run read them at other steps than the uninterrupted run, logged its
        skipped steps at other rows, and a streak that ended before the checkpoint never stopped it (audit)."""
        if self._guard_at_end is not None:
            return dict(self._guard_at_end)
        state = {"bad_steps_total": self.bad_steps_total, "bad_streak": self.bad_streak()}
        if self.optim_cfg.fused and self._bad_counts is not None:
            unread, _, longest = (int(v) for v in self._bad_counts.tolist())
            state |= {"bad_steps_total": self.bad_steps_total + unread, "bad_unread": unread,
                      "bad_longest": longest, "bad_read_step": int(self._bad_read_step)}
        return state

    def load_guard_state(self, state: dict[str, Any], step: int) -> None:
        """Restore :meth:`guard_state` of a checkpoint at ``step`` (an earlier release's: read at that step)."""
        unread = int(state.get("bad_unread", 0))
        self.bad_steps_total = int(state.get("bad_steps_total", 0)) - unread
        self.restore_bad_streak(int(state.get("bad_streak", 0)))
        self._restored_counts = (unread, self._bad_in_a_row, int(state.get("bad_longest", self._bad_in_a_row)))
        self._bad_read_step = int(state.get("bad_read_step", step))

    def restore_bad_streak(self, streak: int) -> None:
        self._bad_in_a_row = streak
        self._restored_counts = (0, streak, streak)

    def _count_bad(self, bad: Tensor) -> None:
        if self._bad_counts is None or self._bad_counts.device != bad.device:
            counts = getattr(self, "_restored_counts", (0, 0, 0))
            self._bad_counts = torch.tensor(counts, dtype=torch.int64, device=bad.device)
        c, b = self._bad_counts, bad.to(torch.int64)
        c[0] += b
        c[1] = (c[1] + 1) * b
        c[2] = torch.maximum(c[2], c[1])

    def read_bad_steps(self, batch_index: int | None = None, stop: bool = True) -> None:
        """Fused guard: read the device's counts of skipped steps since the last read (one host sync), add them to
        ``bad_steps_total`` and warn; ``stop`` (in the training step): log them, and raise when a streak reached
        ``max_bad_steps``."""
        start, self._bad_read_step = self._bad_read_step, self.global_step
        if self._bad_counts is None:
            return
        skipped, streak, longest = (int(v) for v in self._bad_counts.tolist())
        self._bad_counts[0] = 0
        self._bad_counts[2] = streak
        if not skipped:
            return
        total = self.bad_steps_total = self.bad_steps_total + skipped
        if stop:  # inside the training step (Lightning refuses logs from the checkpoint and end hooks)
            self.log("train/skipped_steps", float(total))
        msg = (f"steps {start + 1}-{self.global_step}"
               f"{f' (batch {batch_index})' if batch_index is not None else ''}: {skipped} non-finite loss or "
               f"gradient norm, optimizer step skipped")
        if stop and longest >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"{msg}. {longest} non-finite steps in a row (max_bad_steps={self.max_bad_steps}): stopping. "
                "Lower the learning rate, check the data scaling, or raise eps."
            )
        print(f"[scoreflow] warning: {msg} (longest streak {longest}; {total} in all)")

    def on_train_end(self) -> None:
        if self.optim_cfg.fused:  # the last counts reported (bad_steps_total complete after fit), while a checkpoint
            self._guard_at_end = self.guard_state()  # saved after it keeps them unread, as the uninterrupted run's
            self.read_bad_steps(stop=False)

    def _skip(self, why: str, batch_index: int) -> None:
        self.bad_steps_total += 1
        self._bad_in_a_row += 1
        self.log("train/skipped_steps", float(self.bad_steps_total))
        msg = f"step {self.global_step} (batch {batch_index}): {why}; optimizer step skipped"
        if self._bad_in_a_row >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"{msg}. {self._bad_in_a_row} non-finite steps in a row (max_bad_steps={self.max_bad_steps}): "
                "stopping. Lower the learning rate, check the data scaling, or raise eps."
            )
        if self._bad_in_a_row == 1:  # once per streak: the error at max_bad_steps gives the count
            print(f"[scoreflow] warning: {msg}")
