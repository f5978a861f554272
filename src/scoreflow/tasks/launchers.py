"""Hydra launchers that end a sweep with one table of its jobs, not with the first failure's traceback.

Hydra's launchers stop a multirun at its first failed job with a traceback: the basic launcher re-raises the
job's exception after running every job, and the submitit plugin (``hydra/launcher=submitit_local`` /
``submitit_slurm``) raises ``UncompletedJobError`` (36 lines) as soon as it collects a job that left no result,
e.g. one stopped by SIGTERM after writing its checkpoint, without waiting for the others. These subclasses run
and collect every job the same way, then print::

    [scoreflow] train.py -m: 2 jobs: 1 done, 1 stopped
      #0  sde=vp  stopped  SIGTERM at step 1535: checkpoint written to .../checkpoints/last.ckpt
      #1  sde=ve  done     .../1_sde=ve
      to resume: run the same command again with hydra.sweep.dir=multirun/train/2026-11-28_12-12-24 ...

and exit with the first unsuccessful job's code (a usage error 2, a run failure 1, a signal 128 + its number),
so that no scheduler records a sweep with a failed job as a success. An unanticipated error (a bug) keeps its
traceback: after the table, Hydra reports it as before. ``HYDRA_FULL_ERROR=1`` restores Hydra's behaviour.

The launcher classes are in ``hydra_plugins.scoreflow_launchers`` (Hydra loads plugins from that package only):
``hydra/launcher=sequential`` (the default, conf/hydra/default.yaml: the jobs one after another in this process),
``hydra/launcher=local`` (each job a separate process through submitit's local executor, as on SLURM) and
``hydra/launcher=slurm``. This module holds what they share.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from omegaconf import OmegaConf

from scoreflow.tasks.errors import ConfigError, classify, format_error

# Preempted.message: its summary (a checkpoint written, or stopped in the test phase or evaluate.py), then the way on
STOP_LINE = re.compile(r"^scoreflow: (SIG\w+ (?:at step \d+: checkpoint written to |during ).*?)"
                       r"(?:; (?:to resume|the same command again|SLURM job)\b.*)?$")
EXIT_CODE = re.compile(r"\(exit code (\d+)\)")


@dataclass
class JobOutcome:
    """What became of one job of a sweep."""

    num: int
    overrides: list[str]
    status: str  # "done" | "failed" | "stopped" (a signal: checkpoint written) | "crashed" (an unanticipated error)
    code: int = 0
    detail: str = ""  # one line
    folder: str | None = None
    screen: str = ""  # the anticipated error's full message, or the tail of the job's error stream
    exception: BaseException | None = None  # a crash, re-raised after the table


class JobStopped(Exception):
    """A job of an in-process or joblib sweep stopped by a signal after writing its checkpoint, or during an
    evaluation (scoreflow's ``Preempted``, a ``SystemExit``, turned into an ordinary, picklable result so the
    launcher can list it). ``text``: its ``summary()``."""

    def __init__(self, signum: int, code: int, text: str):
        super().__init__(signum, code, text)
        self.signum, self.code, self.text = signum, code, text

    def __str__(self) -> str:
        return self.text


class StopsAsResults:
    """The task function of a sequential or joblib sweep: a job stopped by a signal returns a failed result
    (:class:`JobStopped`) instead of ending the process, so the launcher lists every job; an unanticipated error
    keeps its traceback as text on the exception (``scoreflow_traceback``: a pickled exception has no frames).
    Not for submitit jobs: a SLURM job must exit with the signal's code (and be requeued)."""

    def __init__(self, task: Callable[[Any], Any]):
        self.task = task

    def __call__(self, cfg: Any) -> Any:
        try:
            return self.task(cfg)
        except SystemExit as e:
            if hasattr(e, "signum") and hasattr(e, "summary"):  # scoreflow.lit.preemption.Preempted
                raise JobStopped(e.signum, e.code, e.summary()) from None
            raise


class WorkerStopped(SystemExit):
    """SIGTERM to a ``parallel`` worker whose job is outside its training loop (starting up, evaluating): the job
    ends there. A ``SystemExit``, so Hydra's ``run_job`` lets it through instead of recording a failed job."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


# The state of this process as a ``parallel`` worker. Here, not in hydra_plugins.scoreflow_launchers: Hydra's plugin
# scan imports that module again inside each job, and the signal handler must see the job's flag.
_WORKER: dict[str, Any] = {"job": False}


def _worker_stop(signum: int, frame: Any) -> None:
    if _WORKER["job"]:
        raise WorkerStopped(signum)


def parallel_worker_signals() -> None:
    """The initializer of a ``parallel`` worker process. A terminal's Ctrl-C reaches the workers too (one process
    group): they ignore SIGINT outside a training loop, which installs its own handlers while it runs (so a job in
    training writes its checkpoint), and the submitting command passes SIGTERM on to every worker. SIGTERM ends a job
    outside its training loop; an idle worker ignores it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_stop)


def parallel_job(stop_file: str, num: int, overrides: Sequence[str], hydra_context: Any, config: Any,
                 task: Any, state: dict[Any, Any]) -> Any:
    """One job in a ``parallel`` worker (Hydra's joblib ``execute_job``). Returns its ``JobReturn``, or
    ``("not started", signum)`` when the sweep was stopped before it started (``stop_file`` holds the signal: a job
    already handed to a worker cannot be cancelled) or ``("stopped", signum)`` for one stopped outside its training
    loop."""
    import contextlib

    from hydra_plugins.hydra_joblib_launcher._core import execute_job

    with contextlib.suppress(OSError, ValueError):
        return ("not started", int(Path(stop_file).read_text()))
    _WORKER["job"] = True
    try:
        return execute_job(num, overrides, hydra_context, config, task, state)
    except WorkerStopped as e:
        return ("stopped", e.signum)
    finally:
        _WORKER["job"] = False


def worker_thread_env(workers: int) -> dict[str, str]:
    """What joblib's loky backend gives its workers: each thread pool limited to its share of the cores
    (``cpu_count() // workers``), unless the variable is set here already."""
    from joblib import cpu_count

    share = str(max(cpu_count() // max(workers, 1), 1))
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMBA_NUM_THREADS", "NUMEXPR_NUM_THREADS")
    env = {name: os.environ.get(name, share) for name in names}
    if "ENABLE_IPC" not in os.environ:
        env["ENABLE_IPC"] = "1"
    return env


def outcome_of_return(num: int, ret: JobReturn, command: str) -> JobOutcome:
    """The outcome of a job that returned to its launcher (the basic launcher, or a submitit job with a result)."""
    overrides = list(ret.overrides or [])
    folder = None
    if ret.hydra_cfg is not None:
        folder = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir", default=None)
    if ret.status == JobStatus.COMPLETED:
        return JobOutcome(num, overrides, "done", folder=folder)
    exc = ret._return_value
    if isinstance(exc, JobStopped):
        return JobOutcome(num, overrides, "stopped", exc.code, str(exc), folder)
    known = classify(exc) if isinstance(exc, BaseException) else None
    if known is None:
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        where = f" (traceback in {folder}/{Path(command).stem}.log)" if folder else ""
        return JobOutcome(num, overrides, "crashed", 1, first + where, folder, exception=exc)
    message = str(exc).strip().splitlines()
    return JobOutcome(num, overrides, "failed", known[0], message[0] if message else type(exc).__name__, folder,
                      screen=format_error(exc, command, folder))


def outcome_of_lost_job(num: int, overrides: list[str], folder: str | None, error_stream: str,
                        log_path: str | None = None, timeout_signal: str | None = None) -> JobOutcome:
    """A submitit job that ended without a result: stopped by a signal after its checkpoint (scoreflow's stop line
    on its error stream), or killed (out of memory, ``scancel`` before training, a node failure). ``log_path``: its
    error stream's file; ``timeout_signal``: the signal the executor sends at ``timeout_min`` (local: SIGUSR2)."""
    lines = [ln for ln in error_stream.splitlines() if ln.strip()]
    for line in reversed(lines):
        m = STOP_LINE.match(line)
        if m:
            code = EXIT_CODE.search(line)
            detail = m.group(1)
            if timeout_signal and detail.startswith(timeout_signal + " "):
                detail += " (hydra.launcher.timeout_min reached: raise it to go on)"
            return JobOutcome(num, overrides, "stopped", int(code.group(1)) if code else 1, detail, folder)
    tail = "\n".join(lines[-12:])
    last = lines[-1].strip() if lines else "no error output: killed (out of memory? SIGKILL?)"
    where = f"; its log: {log_path}" if log_path else ""
    return JobOutcome(num, overrides, "failed", 1, f"ended without a result: {last}{where}", folder, screen=tail)


def varying(outcomes: Sequence[JobOutcome]) -> list[list[str]]:
    """Each job's overrides without those every job shares (the swept values, in the command's order)."""
    common = set.intersection(*(set(o.overrides) for o in outcomes)) if len(outcomes) > 1 else set()
    return [[x for x in filter_overrides(o.overrides) if x not in common] for o in outcomes]


LABEL_WIDTH = 48


def summary(outcomes: Sequence[JobOutcome], command: str, sweep_dir: str, screens: bool = True) -> str:
    """The table; ``screens``: below it, the first failed job's full message (False where the jobs printed theirs
    on this terminal already)."""
    statuses = ("done", "stopped", "failed", "crashed", "not started", "running")
    counts = {s: sum(o.status == s for o in outcomes) for s in statuses}
    head = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    rows = [f"[scoreflow] {command} -m: {len(outcomes)} job{'s' * (len(outcomes) != 1)}: {head}"]
    labels = [" ".join(v) or "(no overrides)" for v in varying(outcomes)]
    labels = [label if len(label) <= LABEL_WIDTH else label[:LABEL_WIDTH - 3] + "..." for label in labels]
    width = max(len(label) for label in labels)
    status_width = max(len(o.status) for o in outcomes)
    for o, label in zip(outcomes, labels):
        text = " ".join(x for x in (o.detail, o.folder or "") if x) if o.status == "done" else o.detail
        rows.append(f"  #{o.num:<3} {label:<{width}}  {o.status:<{status_width}}  {text}")
    unfinished = [o for o in outcomes if o.status != "done"]
    listed = [o for o in unfinished if o.status in ("failed", "crashed") and o.folder]
    for o in listed[:10]:
        rows.append(f"  #{o.num} folder (log, config): {o.folder}")
    if len(listed) > 10:
        rows.append(f"  ... {len(listed) - 10} more failed jobs: their folders are in {sweep_dir}")
    if any(o.status in ("stopped", "not started", "failed") for o in unfinished):
        rows.append(f"  to go on: run the same command again with hydra.sweep.dir={sweep_dir} (stopped jobs resume"
                    " from their last.ckpt, failed and unstarted ones start, finished ones are skipped)")
    first_screen = next((o for o in unfinished if o.screen), None) if screens else None
    if first_screen is not None:
        rows.append(f"\njob #{first_screen.num}:\n{first_screen.screen}")
    return "\n".join(rows)


def finish(outcomes: list[JobOutcome], command: str, sweep_dir: str, *, screens: bool = True, stop: bool = True,
           results: bool = False, stopped_by: int | None = None) -> None:
    """End a launch: ``results``: the sweep's results table first (train.py and evaluate.py:
    :mod:`scoreflow.tasks.sweep_table`);
    then, when a job did not finish, the jobs' table and an exit with the first such job's code (128 + the signal
    with ``stopped_by``: the sweep itself was stopped). A crash (a bug) ends with its traceback: re-raised when it
    happened in this process, else printed from its text. ``stop=False``: a sweeper that handles failed jobs
    itself (Optuna): nothing is printed and nothing exits here."""
    if not stop:
        return
    if results and any(o.status == "done" for o in outcomes):
        sys.stdout.flush()  # the table's command, as a user would type it (a task module is not imported here)
        subprocess.run([sys.executable, "-m", "scoreflow.tasks.sweep_table", sweep_dir], check=False)
    if all(o.status == "done" for o in outcomes):
        return
    sys.stdout.flush()
    print(summary(outcomes, command, sweep_dir, screens), file=sys.stderr, flush=True)
    crash = next((o for o in outcomes if o.status == "crashed"), None)
    if crash is not None and crash.exception is not None and stopped_by is None:
        if crash.exception.__traceback__ is not None:
            raise crash.exception
        text = getattr(crash.exception, "scoreflow_traceback", None)
        print(f"\njob #{crash.num}: " + (text or f"{type(crash.exception).__name__}: {crash.exception}"),
              file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(128 + stopped_by if stopped_by else next(o.code for o in outcomes if o.status != "done"))


def basic_sweep(config: Any) -> bool:
    """Whether the sweeper is Hydra's basic one (which stops at a failed job) rather than, e.g., Optuna's."""
    target = OmegaConf.select(config, "hydra.sweeper._target_", default="") or ""
    return str(target).endswith("BasicSweeper")


def finish_launch(config: Any, outcomes: list[JobOutcome], *, screens: bool, stopped_by: int | None = None) -> None:
    """:func:`finish` with what the launcher's config says: the sweep folder, the sweeper, the task."""
    basic = basic_sweep(config)
    finish(outcomes, command_name(), str(config.hydra.sweep.dir), screens=screens, stop=basic,
           results=basic and OmegaConf.select(config, "task_name", default="") in ("train", "evaluate"),
           stopped_by=stopped_by)


def command_name() -> str:
    return Path(sys.argv[0]).name or "scoreflow"


def machine_gpus() -> list[int] | None:
    """The GPU indices a local sweep shares out: ``CUDA_VISIBLE_DEVICES`` of this process when set (numbers only;
    None for UUIDs, which submitit cannot pass on), else those ``nvidia-smi`` lists (or the driver's
    ``/proc/driver/nvidia/gpus``); [] without GPUs."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        parts = [p.strip() for p in env.split(",") if p.strip()]
        return [int(p) for p in parts] if all(p.isdigit() for p in parts) else None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0:
            return [int(x) for x in out.stdout.split() if x.strip().isdigit()]
    except (OSError, subprocess.SubprocessError):
        pass
    proc = Path("/proc/driver/nvidia/gpus")  # the driver's list, without nvidia-smi on PATH
    return list(range(len(list(proc.iterdir())))) if proc.is_dir() else []


def gpu_slots(gpus: Sequence[int], per_job: int) -> list[list[int]]:
    """Disjoint sets of ``per_job`` GPUs out of ``gpus`` (the leftover GPUs stay idle); ``per_job`` -1: all of them
    (``trainer=ddp``'s ``devices: -1``), one job at a time."""
    if per_job == -1:
        return [list(gpus)] if gpus else []
    if per_job < 1:
        return []
    if len(gpus) < per_job:
        raise ConfigError(f"each job asks for {per_job} GPUs (hydra.launcher.gpus_per_node, from trainer.devices) but "
                          f"{len(gpus)} are there to share out: {list(gpus)}", key="trainer.devices", value=per_job,
                          fix=f"trainer.devices={len(gpus)} or fewer, or name the GPUs: hydra.launcher.gpus=[...]")
    return [list(gpus[i * per_job:(i + 1) * per_job]) for i in range(len(gpus) // per_job)]


def run_queue(items: Sequence[Any], submit: Callable[[Any, list[int] | None], Any], slots: list[list[int]],
              max_parallel: int | None, poll_s: float = 1.0, handles: list[Any] | None = None) -> list[Any]:
    """Start ``submit(item, gpus)`` for each item in order, with at most ``max_parallel`` running (default: one per
    slot, or all at once without slots) and each slot (a set of GPUs) used by one job at a time; returns the
    handles (with ``.done()``) once the last item has started, in ``handles`` if given (so that an interruption
    leaves the ones started)."""
    limit = max_parallel or (len(slots) if slots else len(items))
    handles = [] if handles is None else handles
    free, running = list(range(len(slots))), {}  # running: handle index -> its slot
    while len(handles) < len(items):
        while len(handles) < len(items) and len(running) < limit and (free or not slots):
            slot = free.pop(0) if slots else None
            handles.append(submit(items[len(handles)], slots[slot] if slot is not None else None))
            running[len(handles) - 1] = slot
        if len(handles) == len(items):
            break
        time.sleep(poll_s)
        for i in [i for i in running if handles[i].done()]:
            slot = running.pop(i)
            if slot is not None:
                free.append(slot)
    return handles


def finished_earlier(folder: str | None, overrides: list[str], cfg: Any) -> dict[str, Any] | None:
    """The metrics of a run that finished in ``folder`` with these overrides (a rerun sweep's job that has nothing
    left to do): its ``metrics.json`` reaches ``trainer.max_steps`` and holds the test metrics (with ``test=true``),
    and its ``.hydra/overrides.yaml`` lists the same overrides. None otherwise (not run, stopped, another config)."""
    if folder is None:
        return None
    run = Path(folder)
    try:
        metrics = json.loads((run / "metrics.json").read_text())
        earlier = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
        max_steps = int(OmegaConf.select(cfg, "trainer.max_steps"))
    except (OSError, ValueError, TypeError, yaml.YAMLError):
        return None
    def same(xs: Sequence[Any]) -> list[str]:  # rerun_finished=... says how to run, not what
        return sorted(str(x) for x in xs if str(x).split("=", 1)[0].lstrip("+~") != "rerun_finished")

    if same(earlier) != same(overrides) or metrics.get("train/steps", -1) < max_steps:
        return None
    if OmegaConf.select(cfg, "test", default=True) and not any(k.startswith("test/") for k in metrics):
        return None
    return metrics


def optimized_metric(cfg: Any, metrics: dict[str, Any]) -> float | None:
    """What ``train()`` returns to a Hydra sweeper (and a skipped finished job returns in its place):
    ``metrics[cfg.optimized_metric]``; without a test phase (``test=false``) the validation metric of the same name
    (``test/bpd_ode`` -> ``val/bpd_ode``), then the validation bound (the ODE is measured on validation images only
    every ``nll_every`` steps). Here, not in ``common``, so that the launcher reads it without torch."""
    name = OmegaConf.select(cfg, "optimized_metric", default=None)
    if not name:
        return None
    for key in (str(name), f"val/{str(name).split('/', 1)[-1]}", "val/bpd_bound"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None
