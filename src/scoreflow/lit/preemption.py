"""Pre-emption: a signal during training writes a checkpoint at the current step, then the run stops.

* SIGUSR1 / SIGUSR2 (SLURM's time-limit warning, ``sbatch --signal=USR1@90``; USR2 is submitit's default):
  checkpoint, then ``scontrol requeue`` when running as a SLURM batch job; the requeued job resumes from it.
* SIGTERM (``scancel``, SLURM pre-emption, ``kill``) and SIGINT (Ctrl-C): checkpoint, then stop. No requeue:
  ``scancel`` sends SIGTERM, and a job that requeued itself on it could never be cancelled. SLURM's own
  pre-emption with ``PreemptMode=REQUEUE`` requeues the job by itself.

The handlers only set a flag; the checkpoint is written once the optimizer step in progress is complete: its
logged values written, its validation and sample grid done when one is due at that step, i.e. at the start of the
next training batch (``on_train_batch_start``, before it is used) or, after the last step, in ``on_train_end``
(where the final checkpoint has just been written). So a resumed run neither repeats nor misses a validation and
its log lacks no row. Checkpoints go through the trainer's checkpoint IO (``AtomicCheckpointIO``: temporary file +
``os.replace``). Under DDP the ranks agree on the step with one max-reduction per step, so a signal that reached one
rank only still stops all of them at the same step. It runs between the processes' CPUs (a gloo group of its own
when the training's backend is NCCL): reading a reduction on the GPU waited for the whole previous step each step,
the host sync the fused guard and CUDA graphs avoid. Then :class:`Preempted` (a ``SystemExit`` with code 128 +
signal number, as a shell reports a process killed by that signal) leaves ``Trainer.fit``; the caller requeues and
prints :meth:`Preempted.message` (see ``tasks/common.py:fit``). A stop signal (SIGTERM, SIGINT) overrides an earlier
requeue signal: ``scancel`` after SLURM's time-limit warning cancels the job.

Outside the training loop, during the final test evaluation, :func:`stop_on_signals` ends the run at once with the
same exit codes (requeue included): ``last.ckpt`` is on disk, and the same command again only tests it. ``evaluate.py``
stops the same way (:class:`EvaluationStopped`): its finished batches are on disk, and the same command continues.

SLURM, ``timeout`` and a terminal's Ctrl-C signal the whole process group: the DataLoader workers ignore these
signals (``scoreflow.lit.datamodule.ignore_stop_signals``), so that only the main process acts on them.

The handlers replace Lightning's own SIGTERM (and SLURM SIGUSR1) handlers for the duration of the training loop
(installed in ``on_train_start``, after Lightning registers its own; restored in ``on_train_end`` /
``on_exception``), so one handler acts on each signal.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_NONE, _REQUEUE, _STOP = 0, 1, 2  # reduced with max across ranks: a stop request wins (scancel must cancel)


class Preempted(SystemExit):
    """Training stopped on a signal after writing ``ckpt_path`` at ``step``. Exit code ``128 + signum``.

    A ``SystemExit`` (like Lightning's ``SIGTERMException``) so that generic ``except Exception`` error reporting
    does not present it as a crash, and no scheduler records the run as successful.
    """

    def __init__(self, signum: int, step: int, ckpt_path: Path, *, requeue: bool, is_global_zero: bool,
                 during: str | None = None):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.step = step
        self.ckpt_path = Path(ckpt_path)
        self.requeue = requeue
        self.is_global_zero = is_global_zero
        self.during = during  # None: in the training loop (the checkpoint was written); else what was stopped

    def __reduce__(self) -> tuple:  # picklable (a joblib worker sends it back): the keyword arguments too
        return _rebuild_preempted, (self.signum, self.step, str(self.ckpt_path), self.requeue, self.is_global_zero,
                                    self.during)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    def summary(self) -> str:
        """What happened, in one line (a sweep's table of jobs lists it)."""
        if self.during:  # the test phase: nothing to write, the training's checkpoint is on disk
            return f"{self.signal_name} during {self.during}: stopped; {self.ckpt_path} (step {self.step}) holds " \
                   "the trained weights"
        return f"{self.signal_name} at step {self.step}: checkpoint written to {self.ckpt_path}"

    def message(self, requeued_job: str | None = None, resume_hint: str = "") -> str:
        hint = f" with {resume_hint}" if resume_hint else ""
        if self.during:
            if requeued_job:
                return f"{self.summary()}; SLURM job {requeued_job} requeued, it evaluates them again"
            return f"{self.summary()}; the same command again{hint} takes no training step and evaluates them " \
                   f"(exit code {self.code})"
        if requeued_job:
            return f"{self.summary()}; SLURM job {requeued_job} requeued, it resumes from this checkpoint"
        return f"{self.summary()}; to resume, run the same command again{hint} (exit code {self.code})"


class EvaluationStopped(Preempted):
    """``evaluate.py`` stopped by a signal. Nothing is written then: every finished batch is already in
    ``folder`` (``partial*.jsonl``, ``fid_samples/``), and the same command continues from them (under SLURM the
    requeued job does). The batch in progress is lost; a line it left half-written is dropped by the rerun."""

    def __init__(self, signum: int, folder: str | Path, *, requeue: bool, is_global_zero: bool):
        super().__init__(signum, -1, Path(folder), requeue=requeue, is_global_zero=is_global_zero,
                         during="the evaluation")

    def __reduce__(self) -> tuple:  # picklable, keyword arguments included (see Preempted)
        return _rebuild_evaluation_stopped, (self.signum, str(self.ckpt_path), self.requeue, self.is_global_zero)

    def summary(self) -> str:
        return f"{self.signal_name} during the evaluation: stopped; the finished batches are kept in {self.ckpt_path}"

    def message(self, requeued_job: str | None = None, resume_hint: str = "") -> str:
        if requeued_job:
            return f"{self.summary()}; SLURM job {requeued_job} requeued, it continues from them"
        hint = f" with {resume_hint}" if resume_hint else ""
        return f"{self.summary()}; the same command again{hint} continues (exit code {self.code})"


def _rebuild_evaluation_stopped(signum: int, folder: str, requeue: bool, is_global_zero: bool) -> EvaluationStopped:
    return EvaluationStopped(signum, folder, requeue=requeue, is_global_zero=is_global_zero)


def _rebuild_preempted(signum: int, step: int, ckpt_path: str, requeue: bool, is_global_zero: bool,
                       during: str | None = None) -> Preempted:
    return Preempted(signum, step, Path(ckpt_path), requeue=requeue, is_global_zero=is_global_zero, during=during)


@contextmanager
def stop_on_signals(stop: Callable[[int, bool], Preempted], signals: tuple[int, ...] = (*REQUEUE_SIGNALS,
                                                                                          *STOP_SIGNALS),
                    forward_to: Callable[[], list[Any]] | None = None):
    """Outside a training loop (the final test evaluation, ``evaluate.py``): ``signals`` raise ``stop(signum,
    requeue)`` at once (a :class:`Preempted`: exit code 128 + signal; the caller's :func:`finish` requeues on a SIGUSR
    under SLURM and prints its message). Nothing is written then: what is finished is on disk. Later signals are
    ignored while the stop unwinds. Without it Lightning's own SIGTERM handler ended ``Trainer.test`` with exit code
    0 and no results (Ctrl-C: its "graceful shutdown", exit code 1), and under SLURM ``evaluate.py`` died on SLURM's
    SIGUSR1 without a requeue, while submitit's handler ignored SIGTERM. ``forward_to``: the child processes
    (``subprocess.Popen``) this one launched (Lightning Fabric's local launcher), which get the signal too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signum)
        for proc in (forward_to() if forward_to else []):
            if proc.poll() is None:
                proc.send_signal(signum)
        raise stop(signum, signum in REQUEUE_SIGNALS)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


_LAUNCHED: list[Any] = []  # the processes of the other ranks this one started (Lightning's local DDP launcher)


def remember_launched(trainer: pl.Trainer) -> None:
    """Keep the processes ``trainer``'s launcher started for the other local ranks (``strategy=ddp`` run as a
    script: Lightning starts them in ``fit``), so that a signal to this process in the test phase, when the next
    trainer has none, reaches them too (:func:`launched`)."""
    procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None)
    if procs:
        _LAUNCHED[:] = list(procs)


def launched() -> list[Any]:
    return list(_LAUNCHED)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this SLURM *batch* job (``<array job>_<task>`` for array jobs), or
    None outside SLURM and in interactive allocations (``srun --pty bash``), which must not be requeued."""
    if "SLURM_NTASKS" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; the job goes back to the queue and SLURM ends this allocation."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.error("scontrol requeue %s failed: %s", job_id, err)
        return False
    if done.returncode:
        log.error("scontrol requeue %s failed (%d): %s", job_id, done.returncode, done.stderr.strip())
    return done.returncode == 0


def finish(stop: Preempted, resume_hint: str = "") -> None:
    """After ``Trainer.fit`` let :class:`Preempted` out (loggers closed): requeue on global rank 0 when a
    SIGUSR asked for it under SLURM, print the one-line message there, and re-raise the exit."""
    if stop.is_global_zero:
        job = slurm_job_id() if stop.requeue else None
        requeued = job if job and requeue_slurm_job(job) else None
        line = stop.message(requeued, resume_hint)
        _to_log_files(logging.WARNING, line)  # the terminal gets the line once, below; the run's log file too
        print(f"scoreflow: {line}", file=sys.stderr, flush=True)
    raise stop


def _to_log_files(level: int, text: str) -> None:
    """``text`` as a record of this module's logger to the root logger's file handlers only (Hydra's
    ``<task>.log``), not to its console handler."""
    record = log.makeRecord(log.name, level, __file__, 0, text, None, None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


class PreemptionCheckpoint(Callback):
    """Turns SIGUSR1/SIGUSR2/SIGTERM/SIGINT during the training loop into a checkpoint at ``ckpt_path`` once the
    current step is complete (its logs, validation and sample grid), then raises :class:`Preempted`. A second
    Ctrl-C exits at once (130), without one. ``written_at_train_end``: another callback, listed before this one,
    writes ``ckpt_path`` in ``on_train_end`` (``FinalCheckpoint``), so a signal pending then needs no second write."""

    def __init__(self, ckpt_path: str | Path, *, written_at_train_end: bool = False):
        self.ckpt_path = Path(ckpt_path)
        self.written_at_train_end = written_at_train_end
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._agree: Callable[[int], int] | None = None  # the ranks' max of a request code (several processes)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            self.quit_now()
        if self.signum in REQUEUE_SIGNALS and signum in STOP_SIGNALS:  # scancel after the time-limit warning
            self.signum = signum
            os.write(2, f"\nscoreflow: {signal.Signals(signum).name}: stop without requeue\n".encode())
        if self.signum is None:
            self.signum = signum
            hint = " (Ctrl-C again stops without one)" if signum == signal.SIGINT else ""
            # os.write, not print: the handler may interrupt a buffered write to stderr (the progress bar)
            note = f"\nscoreflow: {signal.Signals(signum).name}: checkpoint at the end of this step{hint}\n"
            os.write(2, note.encode())

    def quit_now(self) -> None:
        """The second Ctrl-C: exit 130 at once, without a checkpoint and without unwinding. A KeyboardInterrupt
        could land inside a checkpoint write (``torch.save`` then fails with a chained traceback) and would take
        Lightning's shutdown path (exit 1). The checkpoint file in place is intact: writes go to a temporary
        file that is renamed when complete, and the next run deletes an unfinished one."""
        last = self.ckpt_path if self.ckpt_path.is_file() else None
        kept = f"; {last} is the last checkpoint written" if last else ""
        line = f"SIGINT again: stopped at once, without a checkpoint{kept} (exit code 130)"
        _to_log_files(logging.WARNING, line)
        os.write(2, f"\nscoreflow: {line}\n".encode())
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - the signal may have interrupted a write to this stream
                pass
        os._exit(130)

    def _install(self) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for s in (*REQUEUE_SIGNALS, *STOP_SIGNALS):
            self._previous[s] = signal.signal(s, self._handler)

    def _restore(self) -> None:
        for s, h in self._previous.items():
            if s == signal.SIGINT and self.signum == signal.SIGINT:
                continue  # stopping on Ctrl-C: until the process exits, a second one still quits at once
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # nothing writes checkpoints yet
            remove_stale_temporaries(self.ckpt_path.parent)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signum = signal.SIGTERM if trainer.received_sigterm else None  # caught by Lightning's handler
        self._agree = host_max_reduction(trainer) if trainer.world_size > 1 else None
        self._install()
        if trainer.is_global_zero:
            log.info("pre-emption: SIGUSR1/SIGUSR2/SIGTERM/SIGINT write %s at the end of the step", self.ckpt_path)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # the previous step is complete: its values logged, its validation and sample grid done (Lightning runs them
        # after on_train_batch_end, where a checkpoint would be restored as if neither had happened: a resumed run
        # lost that step's log row and validation); this batch is fetched but unused (a restore takes it again)
        if not getattr(pl_module, "accumulating", False):  # mid-step (accumulate_grad_batches): gradients partial
            self._stop_if_signalled(trainer, pl_module, write=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the last step's validation and sample grid: without this a signal then was announced, then ignored
        try:
            self._stop_if_signalled(trainer, pl_module, write=not self.written_at_train_end)
        finally:
            self._agree = None
        self._restore()

    def _stop_if_signalled(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, write: bool) -> None:
        code = _NONE if self.signum is None else _REQUEUE if self.signum in REQUEUE_SIGNALS else _STOP
        if trainer.world_size > 1:  # every rank must stop at the same step (save_checkpoint has a barrier)
            code = (self._agree or host_max_reduction(trainer))(code)
        if code == _NONE:
            return
        signum = self.signum  # another rank's request: its kind
        if signum is None or (code == _STOP) != (signum in STOP_SIGNALS):
            signum = signal.SIGUSR1 if code == _REQUEUE else signal.SIGTERM
        from scoreflow.lit.callbacks import PeriodicCheckpoint  # (it imports the samplers; this module stays light)

        for cb in trainer.callbacks:  # a periodic save (a Table-2 snapshot) this step asked for, before stopping
            if isinstance(cb, PeriodicCheckpoint):
                cb.flush(trainer, pl_module)
        if write:
            trainer.save_checkpoint(self.ckpt_path)
        self._restore()
        raise Preempted(signum, trainer.global_step, self.ckpt_path, requeue=code == _REQUEUE,
                        is_global_zero=trainer.is_global_zero)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()


def host_max_reduction(trainer: pl.Trainer) -> Callable[[int], int]:
    """``f(value) -> max over the ranks``, computed between the processes' CPUs: a gloo group of its own beside an
    NCCL training (created here, collectively: every rank calls this at the same point), the training's own group
    when it is gloo already. Without ``torch.distributed`` (a strategy of another kind), or when no gloo group can be
    made between the hosts: the strategy's reduction (on the device), with a warning."""
    import torch.distributed as dist

    group: Any = None
    if dist.is_available() and dist.is_initialized() and dist.get_backend() != "gloo":
        try:
            group = dist.new_group(backend="gloo")
        except Exception as e:  # noqa: BLE001 - no gloo between these hosts (e.g. GLOO_SOCKET_IFNAME unset): the device
            log.warning("pre-emption: no gloo group between the processes (%s); the ranks agree on a stop through "
                        "the training's own backend, one host sync per step", e)
            group = False
    if group is not False and dist.is_available() and dist.is_initialized():

        def reduce(value: int) -> int:
            t = torch.tensor([value], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            return int(t[0])

        return reduce

    def strategy_reduce(value: int) -> int:
        device = trainer.strategy.root_device
        return int(trainer.strategy.reduce(torch.tensor(value, device=device), reduce_op="max"))

    return strategy_reduce


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files of checkpoint writes killed midway (``AtomicCheckpointIO``: the
    checkpoint they were replacing is intact). Only while nothing writes to ``folder``."""
    stale = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished checkpoint write(s) in %s", len(stale), folder)
    return stale
