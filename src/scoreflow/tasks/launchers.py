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

from scoreflow.tasks.errors import classify, format_error

STOP_LINE = re.compile(r"^scoreflow: (SIG\w+ at step \d+: checkpoint written to .*?)(?:; to resume.*)?$")
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


def outcome_of_return(num: int, ret: JobReturn, command: str) -> JobOutcome:
    """The outcome of a job that returned to its launcher (the basic launcher, or a submitit job with a result)."""
    overrides = list(ret.overrides or [])
    folder = None
    if ret.hydra_cfg is not None:
        folder = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir", default=None)
    if ret.status == JobStatus.COMPLETED:
        return JobOutcome(num, overrides, "done", folder=folder)
    exc = ret._return_value
    known = classify(exc) if isinstance(exc, BaseException) else None
    if known is None:
        first = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        return JobOutcome(num, overrides, "crashed", 1, first, folder, exception=exc)
    message = str(exc).strip().splitlines()
    return JobOutcome(num, overrides, "failed", known[0], message[0] if message else type(exc).__name__, folder,
                      screen=format_error(exc, command, folder))


def outcome_of_lost_job(num: int, overrides: list[str], folder: str | None, error_stream: str) -> JobOutcome:
    """A submitit job that ended without a result: stopped by a signal after its checkpoint (scoreflow's stop line
    on its error stream), or killed (out of memory, ``scancel`` before training, a node failure)."""
    lines = [ln for ln in error_stream.splitlines() if ln.strip()]
    for line in reversed(lines):
        m = STOP_LINE.match(line)
        if m:
            code = EXIT_CODE.search(line)
            return JobOutcome(num, overrides, "stopped", int(code.group(1)) if code else 1, m.group(1), folder)
    tail = "\n".join(lines[-12:])
    last = lines[-1].strip() if lines else "no error output"
    return JobOutcome(num, overrides, "failed", 1, f"ended without a result: {last}", folder, screen=tail)


def varying(outcomes: Sequence[JobOutcome]) -> list[list[str]]:
    """Each job's overrides without those every job shares (the swept values, in the command's order)."""
    common = set.intersection(*(set(o.overrides) for o in outcomes)) if len(outcomes) > 1 else set()
    return [[x for x in filter_overrides(o.overrides) if x not in common] for o in outcomes]


def summary(outcomes: Sequence[JobOutcome], command: str, sweep_dir: str, screens: bool = True) -> str:
    """The table; ``screens``: below it, the first failed job's full message (False where the jobs printed theirs
    on this terminal already)."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "stopped", "failed", "crashed")}
    head = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    rows = [f"[scoreflow] {command} -m: {len(outcomes)} job{'s' * (len(outcomes) != 1)}: {head}"]
    labels = [" ".join(v) or "(no overrides)" for v in varying(outcomes)]
    width = min(max(len(label) for label in labels), 48)
    for o, label in zip(outcomes, labels):
        text = (o.folder or "") if o.status == "done" else o.detail
        rows.append(f"  #{o.num:<3} {label:<{width}}  {o.status:<7}  {text}")
    unfinished = [o for o in outcomes if o.status != "done"]
    for o in [o for o in unfinished if o.status != "stopped" and o.folder][:3]:
        rows.append(f"  #{o.num} folder (log, config): {o.folder}")
    if any(o.status == "stopped" for o in unfinished):
        rows.append(f"  to resume: run the same command again with hydra.sweep.dir={sweep_dir} (the stopped jobs go on"
                    " from their last.ckpt; the finished ones are skipped)")
    first_screen = next((o for o in unfinished if o.screen), None) if screens else None
    if first_screen is not None:
        rows.append(f"\njob #{first_screen.num}:\n{first_screen.screen}")
    return "\n".join(rows)


def finish(outcomes: list[JobOutcome], command: str, sweep_dir: str, *, screens: bool = True, stop: bool = True,
           results: bool = False) -> None:
    """End a launch: ``results``: the sweep's results table first (train.py, :mod:`scoreflow.tasks.sweep_table`);
    then, when a job did not finish, the jobs' table and an exit with the first such job's code. A crash (a bug) is
    re-raised for Hydra's traceback instead. ``stop=False`` for a sweeper that handles failed jobs itself (Optuna's
    ``max_failure_rate``): the table only."""
    if results and any(o.status == "done" for o in outcomes):
        sys.stdout.flush()  # the table's command, as a user would type it (a task module is not imported here)
        subprocess.run([sys.executable, "-m", "scoreflow.tasks.sweep_table", sweep_dir], check=False)
    if all(o.status == "done" for o in outcomes):
        return
    sys.stdout.flush()
    print(summary(outcomes, command, sweep_dir, screens), file=sys.stderr, flush=True)
    if not stop:
        return
    crash = next((o for o in outcomes if o.status == "crashed"), None)
    if crash is not None and crash.exception is not None:
        raise crash.exception
    sys.exit(next(o.code for o in outcomes if o.status != "done"))


def basic_sweep(config: Any) -> bool:
    """Whether the sweeper is Hydra's basic one (which stops at a failed job) rather than, e.g., Optuna's."""
    target = OmegaConf.select(config, "hydra.sweeper._target_", default="") or ""
    return str(target).endswith("BasicSweeper")


def finish_launch(config: Any, outcomes: list[JobOutcome], *, screens: bool) -> None:
    """:func:`finish` with what the launcher's config says: the sweep folder, the sweeper, the task."""
    basic = basic_sweep(config)
    finish(outcomes, command_name(), str(config.hydra.sweep.dir), screens=screens, stop=basic,
           results=basic and OmegaConf.select(config, "task_name", default="") == "train")


def command_name() -> str:
    return Path(sys.argv[0]).name or "scoreflow"


def machine_gpus() -> list[int] | None:
    """The GPU indices a local sweep shares out: ``CUDA_VISIBLE_DEVICES`` of this process when set (numbers only;
    None for UUIDs, which submitit cannot pass on), else those ``nvidia-smi`` lists; [] without GPUs."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        parts = [p.strip() for p in env.split(",") if p.strip()]
        return [int(p) for p in parts] if all(p.isdigit() for p in parts) else None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(x) for x in out.stdout.split() if x.strip().isdigit()] if out.returncode == 0 else []


def gpu_slots(gpus: Sequence[int], per_job: int) -> list[list[int]]:
    """Disjoint sets of ``per_job`` GPUs out of ``gpus`` (the leftover GPUs stay idle)."""
    if per_job < 1:
        return []
    if len(gpus) < per_job:
        raise ValueError(f"each job asks for {per_job} GPU(s) (hydra.launcher.gpus_per_node, from trainer.devices) "
                         f"but this machine has {len(gpus)}: {list(gpus)}; lower trainer.devices or set "
                         "hydra.launcher.gpus=[...]")
    return [list(gpus[i * per_job:(i + 1) * per_job]) for i in range(len(gpus) // per_job)]


def run_queue(items: Sequence[Any], submit: Callable[[Any, list[int] | None], Any], slots: list[list[int]],
              max_parallel: int | None, poll_s: float = 1.0) -> list[Any]:
    """Start ``submit(item, gpus)`` for each item in order, with at most ``max_parallel`` running (default: one per
    slot, or all at once without slots) and each slot (a set of GPUs) used by one job at a time; returns the
    handles (with ``.done()``) once the last item has started."""
    limit = max_parallel or (len(slots) if slots else len(items))
    handles: list[Any] = []
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
    if sorted(map(str, earlier)) != sorted(overrides) or metrics.get("train/steps", -1) < max_steps:
        return None
    if OmegaConf.select(cfg, "test", default=True) and not any(k.startswith("test/") for k in metrics):
        return None
    return metrics


def earlier_metric(cfg: Any, metrics: dict[str, Any]) -> float | None:
    """What the finished job returned to the sweeper, read as ``scoreflow.tasks.common.optimized_metric`` reads it
    (``optimized_metric``; without test metrics its ``val/`` form, then the validation bound)."""
    name = OmegaConf.select(cfg, "optimized_metric", default=None)
    if not name:
        return None
    for key in (str(name), f"val/{str(name).split('/', 1)[-1]}", "val/bpd_bound"):
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key])
    return None
