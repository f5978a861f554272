"""scoreflow's Hydra launchers: Hydra's own (basic, submitit local/SLURM) ending a sweep with one table of its
jobs instead of the first failure's traceback. Hydra instantiates launchers from the ``hydra_plugins`` package
only, hence this module; what the table shows is in :mod:`scoreflow.tasks.launchers`.
``conf/hydra/launcher/{sequential,local,slurm}.yaml`` select these classes."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

from scoreflow.tasks.errors import full_error
from scoreflow.tasks.launchers import (
    JobOutcome,
    basic_sweep,
    command_name,
    earlier_metric,
    finish_launch,
    finished_earlier,
    gpu_slots,
    machine_gpus,
    outcome_of_lost_job,
    outcome_of_return,
    run_queue,
)

log = logging.getLogger(__name__)


def job_config(launcher: Any, overrides: Sequence[str], num: int) -> DictConfig | None:
    """The config job ``num`` composes (its folder: ``hydra.sweep.dir``/``hydra.sweep.subdir``); None if it fails."""
    try:
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        return cfg
    except Exception:  # noqa: BLE001 - the job itself will report what is wrong
        return None


def job_folder(cfg: DictConfig | None) -> str | None:
    return None if cfg is None else str(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir))


def split_finished(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
                   ) -> tuple[dict[int, JobOutcome], dict[int, JobReturn]]:
    """The jobs of a rerun sweep (``hydra.sweep.dir=`` of an earlier one) that finished there already
    (:func:`finished_earlier`): their outcomes and returns, by job number. Only for train.py under the basic
    sweeper, and not with ``rerun_finished=true``."""
    config = launcher.config
    if not (basic_sweep(config) and config.get("task_name") == "train") or config.get("rerun_finished", False):
        return {}, {}
    outcomes, returns = {}, {}
    for k, overrides in enumerate(job_overrides):
        num = initial_job_idx + k
        cfg = job_config(launcher, overrides, num)
        if cfg is None or (metrics := finished_earlier(job_folder(cfg), list(overrides), cfg)) is None:
            continue
        folder = job_folder(cfg)
        log.info(f"\t#{num} finished earlier in {folder}: skipped (rerun_finished=true runs it again)")
        outcomes[num] = JobOutcome(num, list(overrides), "done", folder=folder, detail="finished earlier")
        returns[num] = JobReturn(overrides=list(overrides), cfg=cfg, status=JobStatus.COMPLETED,
                                 _return_value=earlier_metric(cfg, metrics))
    return outcomes, returns


class _Summary:
    """A launcher that runs every job and returns their results (basic, joblib), ending with the sweep's table."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if full_error():
            return super().launch(job_overrides, initial_job_idx)
        skipped, returns = split_finished(self, job_overrides, initial_job_idx)
        # the jobs to run, in runs of consecutive numbers (a job's number is part of its folder's name)
        todo = [initial_job_idx + k for k in range(len(job_overrides)) if initial_job_idx + k not in skipped]
        while todo:
            n = next((i for i in range(1, len(todo)) if todo[i] != todo[0] + i), len(todo))
            first, chunk = todo[0], [job_overrides[j - initial_job_idx] for j in todo[:n]]
            returns.update(zip(todo[:n], super().launch(chunk, first)))
            todo = todo[n:]
        ordered = [returns[initial_job_idx + k] for k in range(len(job_overrides))]
        command = command_name()
        outcomes = [skipped.get(initial_job_idx + i) or outcome_of_return(initial_job_idx + i, r, command)
                    for i, r in enumerate(ordered)]
        finish_launch(self.config, outcomes, screens=self.SCREENS)
        return ordered


class SummaryBasicLauncher(_Summary, BasicLauncher):
    """Hydra's basic launcher: the jobs one after another in this process (each prints its own error screen)."""

    SCREENS = False


class SummaryJoblibLauncher(_Summary, JoblibLauncher):
    """Hydra's joblib launcher: the jobs in parallel worker processes (their error screens interleave above)."""

    SCREENS = True


class _SummarySubmitit(BaseSubmititLauncher):
    """The submitit plugin's launcher, collecting every job (also those that left no result) before the table."""

    OWN_KEYS: tuple[str, ...] = ()  # launcher keys of ours, not submitit's

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if full_error():
            return super().launch(job_overrides, initial_job_idx)
        import submitit
        from submitit.core.utils import FailedJobError, UncompletedJobError

        assert self.config is not None and job_overrides
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        skipped, done_returns = split_finished(self, job_overrides, initial_job_idx)
        args = []
        for k, overrides in enumerate(job_overrides):
            num = initial_job_idx + k
            if num not in skipped:
                log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
                args.append((list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        jobs = dict(zip((a[2] for a in args), self._submit(self._executor(submitit), args) if args else []))
        if jobs:
            log.info(f"submitted {len(jobs)} job(s); waiting for them (their logs: {sweep_dir}/.submitit/)")
        command, returns, outcomes = command_name(), [], []
        for k, overrides in enumerate(job_overrides):
            num = initial_job_idx + k
            if num in skipped:
                returns.append(done_returns[num])
                outcomes.append(skipped[num])
                continue
            try:
                ret = jobs[num].results()[0]
            except (UncompletedJobError, FailedJobError) as e:
                stream = (jobs[num].stderr() or "") if isinstance(e, UncompletedJobError) else str(e)
                outcomes.append(outcome_of_lost_job(num, list(overrides), self._job_folder(overrides, num), stream))
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=e))
                continue
            returns.append(ret)
            outcomes.append(outcome_of_return(num, ret, command))
        finish_launch(self.config, outcomes, screens=True)
        return returns

    def _submit(self, executor: Any, args: list[tuple]) -> list[Any]:
        """All the jobs at once, as one array (a SLURM job array: the scheduler queues them)."""
        return executor.map_array(self, *zip(*args))

    def _executor(self, submitit: Any) -> Any:
        """The executor the plugin builds: ``submitit_folder`` and ``max_num_timeout`` at construction, the queue
        keys of :class:`BaseQueueConf` as they are and the rest with the executor's prefix (``slurm_partition``)."""
        at_init = {"submitit_folder", "max_num_timeout", *self.OWN_KEYS}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": self.params[k] for k in ["max_num_timeout"] if k in self.params})
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"{self._EXECUTOR}_{k}": v
                                      for k, v in self.params.items() if k not in at_init})
        return executor

    def _job_folder(self, overrides: Sequence[str], num: int) -> str | None:
        return job_folder(job_config(self, overrides, num))


class SummaryLocalLauncher(_SummarySubmitit):
    """Each job in its own process on this machine (submitit's local executor), with the machine's GPUs shared out:
    every job gets ``gpus_per_node`` GPUs of its own (``CUDA_VISIBLE_DEVICES``) and waits until a set is free, so
    8 GPUs run 8 one-GPU jobs at a time (submitit alone gives every job GPU 0). Without GPUs all jobs start at
    once, unless ``max_parallel`` says otherwise."""

    _EXECUTOR = "local"
    OWN_KEYS = ("gpus", "max_parallel")

    def _submit(self, executor: Any, args: list[tuple]) -> list[Any]:
        per_job = self.params.get("gpus_per_node")
        per_job = len(per_job) if isinstance(per_job, (list, tuple)) else int(per_job or 0)
        gpus = self.params.get("gpus")
        gpus = machine_gpus() if gpus is None else [int(g) for g in gpus]
        slots = gpu_slots(gpus, per_job) if gpus else []
        if gpus is None:
            log.info("CUDA_VISIBLE_DEVICES names GPUs by UUID: every job gets submitit's default GPUs")

        def start(a: tuple, gpu_set: list[int] | None) -> Any:
            if gpu_set is not None:
                executor.update_parameters(visible_gpus=tuple(gpu_set), gpus_per_node=len(gpu_set))
                log.info(f"\t#{a[2]} starts on GPU {','.join(map(str, gpu_set))}")
            return executor.submit(self, *a)

        return run_queue(args, start, slots, self.params.get("max_parallel"))

    def _executor(self, submitit: Any) -> Any:
        """submitit's LocalExecutor itself: the AutoExecutor in front of it does not pass ``visible_gpus`` on."""
        executor = submitit.LocalExecutor(folder=self.params["submitit_folder"])
        keys = ("timeout_min", "gpus_per_node", "tasks_per_node", "nodes", "stderr_to_stdout")
        executor.update_parameters(**{k: self.params[k] for k in keys if self.params.get(k) is not None})
        return executor


class SummarySlurmLauncher(_SummarySubmitit):
    _EXECUTOR = "slurm"
