"""scoreflow's Hydra launchers: Hydra's own (basic, joblib, submitit local/SLURM) ending a sweep with one table of its
jobs instead of the first failure's traceback, skipping the jobs a rerun sweep finished already, and (local)
sharing out the machine's GPUs. Hydra instantiates launchers from the ``hydra_plugins`` package only, hence this
module; what the tables show is in :mod:`scoreflow.tasks.launchers`.
``conf/hydra/launcher/{sequential,parallel,local,slurm}.yaml`` select these classes."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _HydraOptunaSweeper
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

from scoreflow.tasks.errors import ConfigError, ScoreflowError, format_error, full_error
from scoreflow.tasks.launchers import (
    JobOutcome,
    StopsAsResults,
    basic_sweep,
    command_name,
    finish_launch,
    finished_earlier,
    gpu_slots,
    machine_gpus,
    optimized_metric,
    outcome_of_lost_job,
    outcome_of_return,
    parallel_job,
    parallel_worker_signals,
    run_queue,
    worker_thread_env,
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
        outcomes[num] = JobOutcome(num, list(overrides), "done", folder=folder, detail="finished earlier:")
        returns[num] = JobReturn(overrides=list(overrides), cfg=cfg, status=JobStatus.COMPLETED,
                                 _return_value=optimized_metric(cfg, metrics))
    return outcomes, returns


def not_started(num: int, overrides: Sequence[str]) -> tuple[JobOutcome, JobReturn]:
    outcome = JobOutcome(num, list(overrides), "not started", 1, "not started: the sweep was stopped")
    return outcome, JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                              _return_value=RuntimeError("not started: the sweep was stopped"))


class TrialFailed(CompactHydraException):
    """A job that failed with an anticipated error (or was stopped) under a sweeper that handles failed jobs itself
    (Optuna): what the sweeper sees instead of the job's exception, so that Hydra, when the sweeper gives up on it,
    prints this message rather than a traceback (:class:`OptunaSweeper`: this message alone, exit ``exit_code``,
    the job's own)."""

    def __init__(self, text: str, exit_code: int = 1):
        super().__init__(text)
        self.exit_code = exit_code


class FailedTrialReturn(JobReturn):
    """A failed job's return as a sweeper reads it: raises its :class:`TrialFailed` without Hydra's "Error executing
    job with overrides: [...]" line before it (the job's screen and the sweeper's line already name the job)."""

    @property
    def return_value(self) -> Any:
        if self.status == JobStatus.FAILED:
            raise self._return_value
        return self._return_value

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value


class OptunaSweeper(_HydraOptunaSweeper):
    """Hydra's Optuna sweeper (``hparams_search=optuna_lr_ema`` selects this one), ending a search that gave up on a
    failed trial with that trial's one line and its exit code, not Hydra's "Set the environment variable
    HYDRA_FULL_ERROR=1" line after it. ``HYDRA_FULL_ERROR=1`` keeps Hydra's own report."""

    def sweep(self, arguments: list[str]) -> None:
        FAILED_TRIALS.clear()
        try:
            return super().sweep(arguments)
        except TrialFailed as e:
            if full_error():
                raise
            self._exit(str(e), e.exit_code)
        except ValueError as e:  # hydra.sweeper.max_failure_rate let every trial fail: Optuna has no best trial
            if "No trials are completed" not in str(e) or not FAILED_TRIALS or full_error():
                raise
            first = FAILED_TRIALS[0]
            lines = [f"[scoreflow] {command_name()} -m: no trial of the search finished: "
                     f"{len(FAILED_TRIALS)} failed (hydra.sweeper.max_failure_rate let the search go on); the first:",
                     "  " + str(first).splitlines()[0]]
            self._exit("\n".join(lines), first.exit_code)

    @staticmethod
    def _exit(text: str, code: int) -> None:
        sys.stdout.flush()
        print(text, file=sys.stderr, flush=True)
        sys.exit(code)


FAILED_TRIALS: list[TrialFailed] = []  # this search's failed trials, in order (OptunaSweeper's last line)


def for_sweeper(config: Any, outcomes: Sequence[JobOutcome], returns: list[JobReturn], screens: bool
                ) -> list[JobReturn]:
    """The returns handed back to a sweeper other than the basic one (which gets the jobs' table from
    :func:`finish_launch` instead). ``screens``: the jobs ran elsewhere (submitit), so their messages were not on
    this terminal and go into the sweeper's failure message whole."""
    if basic_sweep(config) or full_error():
        return returns
    out = list(returns)
    for i, (outcome, ret) in enumerate(zip(outcomes, returns)):
        if outcome.status in ("failed", "stopped", "not started") and ret.status == JobStatus.FAILED:
            where = f" (job folder: {outcome.folder})" if outcome.folder else ""
            text = f"[scoreflow] {command_name()} -m: job #{outcome.num} {outcome.status}: {outcome.detail}{where}"
            if screens and outcome.screen:
                text += "\n" + outcome.screen
            out[i] = FailedTrialReturn(**{f.name: getattr(ret, f.name) for f in fields(ret)})
            out[i]._return_value = TrialFailed(text, outcome.code or 1)
            FAILED_TRIALS.append(out[i]._return_value)
    return out


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def report_and_exit(e: ScoreflowError) -> None:
    sys.stdout.flush()
    print(format_error(e, command_name()), file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


def start_in_process(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
                     ) -> tuple[Path, dict[int, JobOutcome], dict[int, JobReturn]]:
    """What Hydra's basic and joblib launchers do first (globals, logging, the sweep folder), then the jobs that
    finished earlier (:func:`split_finished`)."""
    setup_globals()
    assert launcher.hydra_context is not None and launcher.config is not None
    assert launcher.task_function is not None
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir, *split_finished(launcher, job_overrides, initial_job_idx)


class SummaryBasicLauncher(BasicLauncher):
    """Hydra's basic launcher: the jobs one after another in this process, each numbered as in the full sweep. A
    job stopped by a signal (Ctrl-C, SIGTERM: its checkpoint written) stops the sweep: the jobs after it are
    listed as not started, and the exit code is the signal's."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if full_error():
            return super().launch(job_overrides, initial_job_idx)
        _, outcomes, returns = start_in_process(self, job_overrides, initial_job_idx)
        log.info(f"Launching {len(job_overrides) - len(outcomes)} jobs locally")
        task, command, stopped_by = StopsAsResults(self.task_function), command_name(), None
        for k, overrides in enumerate(job_overrides):
            num = initial_job_idx + k
            if num in outcomes:
                continue
            if stopped_by is not None:
                outcomes[num], returns[num] = not_started(num, overrides)
                continue
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = num
                cfg.hydra.job.num = num
            try:
                ret = run_job(hydra_context=self.hydra_context, task_function=task, config=cfg,
                              job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            except (SystemExit, KeyboardInterrupt) as e:  # Ctrl-C outside the training loop (exit 130), an exit
                code = 130 if isinstance(e, KeyboardInterrupt) else (e.code if isinstance(e.code, int) else 1)
                stopped = code > 128
                if stopped:
                    stopped_by = code - 128
                detail = (f"{signal_name(code - 128)}: stopped outside the training loop (no checkpoint of this stop)"
                          if stopped else f"exited with code {code}")
                outcomes[num] = JobOutcome(num, list(overrides), "stopped" if stopped else "failed", code, detail,
                                           job_folder(cfg))
                returns[num] = JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                                         _return_value=RuntimeError(detail))
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
                continue
            returns[num] = ret
            outcomes[num] = outcome_of_return(num, ret, command)
            if outcomes[num].status == "stopped":
                stopped_by = ret._return_value.signum
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        nums = [initial_job_idx + k for k in range(len(job_overrides))]
        finish_launch(self.config, [outcomes[n] for n in nums], screens=False, stopped_by=stopped_by)
        return for_sweeper(self.config, [outcomes[n] for n in nums], [returns[n] for n in nums], screens=False)


class SummaryJoblibLauncher(JoblibLauncher):
    """Hydra's joblib launcher: the jobs in parallel worker processes (loky's, as joblib's default backend; of the
    joblib keys, ``n_jobs`` applies), each numbered as in the full sweep. Ctrl-C or SIGTERM to the submitting
    command stops every running job the way ``local`` does (each in training writes its checkpoint; the queued ones
    do not start), waits for them, lists them and exits with the signal's code. A signal sent to one worker stops
    its job alone."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if full_error():
            return super().launch(job_overrides, initial_job_idx)
        from joblib import effective_n_jobs
        from joblib.externals.loky import ProcessPoolExecutor

        sweep_dir, outcomes, returns = start_in_process(self, job_overrides, initial_job_idx)
        nums = [initial_job_idx + k for k in range(len(job_overrides))]
        todo = [(num, list(o)) for num, o in zip(nums, job_overrides) if num not in outcomes]
        stopped_by = None
        if todo:
            workers = min(effective_n_jobs(self.joblib.get("n_jobs", -1)), len(todo))
            log.info(f"{workers} worker process(es) are launching {len(todo)} jobs; sweep output dir: {sweep_dir}")
            for num, overrides in todo:
                log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            task, state = StopsAsResults(self.task_function), Singleton.get_state()
            executor = ProcessPoolExecutor(max_workers=workers, initializer=parallel_worker_signals,
                                           env=worker_thread_env(workers))
            futures: dict[int, Any] = {}
            stop_file = sweep_dir / ".scoreflow_stop"  # tells the queued jobs not to start
            stop_file.unlink(missing_ok=True)
            try:
                with stop_requests():
                    for num, overrides in todo:
                        futures[num] = executor.submit(parallel_job, str(stop_file), num, overrides,
                                                       self.hydra_context, self.config, task, state)
                    while not all(f.done() for f in futures.values()):
                        time.sleep(0.2)
            except (KeyboardInterrupt, StopRequested) as e:
                stopped_by = e.signum if isinstance(e, StopRequested) else int(signal.SIGINT)
                self._stop_workers(executor, futures, stopped_by, stop_file)
            executor.shutdown(wait=True)
            stop_file.unlink(missing_ok=True)
            command = command_name()
            for num, overrides in todo:
                returns[num], outcomes[num] = self._result(num, overrides, futures.get(num), command)
        finish_launch(self.config, [outcomes[n] for n in nums], screens=False, stopped_by=stopped_by)
        return for_sweeper(self.config, [outcomes[n] for n in nums], [returns[n] for n in nums], screens=False)

    @staticmethod
    def _stop_workers(executor: Any, futures: dict[int, Any], signum: int, stop_file: Path) -> None:
        """The queued jobs are dropped and every worker gets SIGTERM: a job in training writes its checkpoint (one
        already stopping on the terminal's Ctrl-C goes on with that), one outside its training loop ends. Then wait
        for them; a second Ctrl-C or SIGTERM stops waiting and ends the workers."""
        stop_file.write_text(str(signum))
        for f in futures.values():
            f.cancel()
        pids = list(getattr(executor, "_processes", None) or {})
        print(f"\n[scoreflow] {command_name()} -m: {signal_name(signum)}: stopping the jobs of {len(pids)} worker "
              "process(es); each job in training writes its checkpoint (Ctrl-C again: stop waiting)",
              file=sys.stderr, flush=True)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        try:
            with stop_requests():
                while not all(f.done() for f in futures.values()):
                    time.sleep(0.2)
        except (KeyboardInterrupt, StopRequested):
            print(f"[scoreflow] stopped waiting; the worker processes {' '.join(map(str, pids))} are ended now, "
                  "perhaps before their checkpoints (each job's last.ckpt is its last complete one)", file=sys.stderr,
                  flush=True)
            executor.shutdown(wait=False, kill_workers=True)
            stop_file.unlink(missing_ok=True)
            sys.exit(128 + signum)

    def _result(self, num: int, overrides: list[str], future: Any, command: str) -> tuple[JobReturn, JobOutcome]:
        if future is None or future.cancelled():
            outcome, ret = not_started(num, overrides)
            return ret, outcome
        try:
            ret = future.result()
        except BaseException as e:  # the worker died (killed, out of memory: loky's TerminatedWorkerError)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            detail = f"its worker process ended without a result: {type(e).__name__}: {first}".rstrip(": ")
            return (JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=RuntimeError(detail)),
                    JobOutcome(num, overrides, "failed", 1, detail, self._job_folder(overrides, num)))
        if isinstance(ret, tuple):
            what, signum = ret
            if what == "not started":
                detail = "not started: the sweep was stopped"
                outcome = JobOutcome(num, overrides, "not started", 1, detail)
            else:
                detail = f"{signal_name(signum)}: stopped outside the training loop (no checkpoint of this stop)"
                outcome = JobOutcome(num, overrides, "stopped", 128 + signum, detail, self._job_folder(overrides, num))
            return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=RuntimeError(detail)), outcome
        return ret, outcome_of_return(num, ret, command)

    def _job_folder(self, overrides: Sequence[str], num: int) -> str | None:
        return job_folder(job_config(self, overrides, num))


class StopRequested(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_requests() -> Iterator[None]:
    """SIGTERM to the submitting command raises :class:`StopRequested`, SIGINT ``KeyboardInterrupt``, also where
    SIGINT was ignored when the command started (a background job of a non-interactive shell: ``kill -INT`` of
    its process group reached the jobs' training loops, and the command started the queued jobs)."""

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise StopRequested(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def sigint_ignored_in_children() -> Iterator[None]:
    """Processes started inside inherit an ignored SIGINT: a terminal's Ctrl-C then reaches a local job's training
    loop (which installs its own handler and writes its checkpoint) but not submitit's controller, which would
    otherwise kill the job one second later."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _SummarySubmitit(BaseSubmititLauncher):
    """The submitit plugin's launcher, collecting every job (also those that left no result) before the table."""

    OWN_KEYS: tuple[str, ...] = ()  # launcher keys of ours, not submitit's
    TIMEOUT_SIGNAL: str | None = None

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
        handles: list[Any] = []
        stopped_by = None
        try:
            with stop_requests():
                if args:
                    self._submit(self._executor(submitit), args, handles)
                    log.info(f"submitted {len(handles)} job(s); waiting for them (their logs: {sweep_dir}/.submitit/)")
                for job in handles:
                    while not job.done():
                        time.sleep(1.0)
        except ScoreflowError as e:
            report_and_exit(e)
        except (KeyboardInterrupt, StopRequested) as e:
            stopped_by = e.signum if isinstance(e, StopRequested) else int(signal.SIGINT)
            self._stop_jobs(handles, stopped_by)
        jobs = dict(zip((a[2] for a in args), handles))
        command, returns, outcomes = command_name(), [], []
        for k, overrides in enumerate(job_overrides):
            num = initial_job_idx + k
            if num in skipped:
                returns.append(done_returns[num])
                outcomes.append(skipped[num])
                continue
            if num not in jobs:
                outcome, ret = not_started(num, overrides)
                outcomes.append(outcome)
                returns.append(ret)
                continue
            job = jobs[num]
            if not job.done():  # SLURM, after the submitting command was stopped: the job runs on
                outcomes.append(JobOutcome(num, list(overrides), "running", 0, f"still running: SLURM job {job.job_id}",
                                           self._job_folder(overrides, num)))
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED,
                                         _return_value=RuntimeError("still running")))
                continue
            try:
                ret = job.results()[0]
            except (UncompletedJobError, FailedJobError) as e:
                stream = (job.stderr() or "") if isinstance(e, UncompletedJobError) else str(e)
                outcomes.append(outcome_of_lost_job(num, list(overrides), self._job_folder(overrides, num), stream,
                                                    str(job.paths.stderr), self.TIMEOUT_SIGNAL))
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=e))
                continue
            returns.append(ret)
            outcomes.append(outcome_of_return(num, ret, command))
        finish_launch(self.config, outcomes, screens=True, stopped_by=stopped_by)
        return for_sweeper(self.config, outcomes, returns, screens=True)

    def _submit(self, executor: Any, args: list[tuple], handles: list[Any]) -> None:
        """All the jobs at once, as one array (a SLURM job array: the scheduler queues them)."""
        try:
            handles.extend(executor.map_array(self, *zip(*args)))
        except (RuntimeError, OSError) as e:  # no sbatch/srun here, sbatch refused the job (FailedSubmissionError)
            raise ConfigError(f"submitting the sweep to {self._EXECUTOR} failed: {e}", key="hydra/launcher",
                              value=self._EXECUTOR,
                              fix="submit from a machine with SLURM (sbatch, srun), check the hydra.launcher keys "
                                  "(partition, account, ...), or run the jobs on this machine: hydra/launcher=local"
                              ) from None

    def _stop_jobs(self, handles: list[Any], signum: int) -> None:
        """The submitting command was stopped. SLURM: the jobs run on (they are the cluster's now)."""
        print(f"\n[scoreflow] {command_name()} -m: {signal.Signals(signum).name}: the submitted jobs keep running on "
              "SLURM (squeue --me; scancel <job id> stops one)", file=sys.stderr, flush=True)

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
    once, unless ``max_parallel`` says otherwise. Ctrl-C or SIGTERM to the submitting command stops the running
    jobs the same way (each writes its checkpoint), lists them and exits with the signal's code."""

    _EXECUTOR = "local"
    OWN_KEYS = ("gpus", "max_parallel")
    TIMEOUT_SIGNAL = "SIGUSR2"  # what submitit's local controller sends at timeout_min

    def _submit(self, executor: Any, args: list[tuple], handles: list[Any]) -> None:
        per_job = self.params.get("gpus_per_node")
        per_job = len(per_job) if isinstance(per_job, (list, tuple)) else int(per_job or 0)
        gpus = self.params.get("gpus")
        gpus = machine_gpus() if gpus is None else [int(g) for g in gpus]
        if gpus is None:
            log.info("CUDA_VISIBLE_DEVICES names GPUs by UUID: every job gets submitit's default GPUs")
        slots = gpu_slots(gpus, per_job) if gpus else []

        def start(a: tuple, gpu_set: list[int] | None) -> Any:
            if gpu_set is not None:
                executor.update_parameters(visible_gpus=tuple(gpu_set), gpus_per_node=len(gpu_set))
                log.info(f"\t#{a[2]} starts on GPU {','.join(map(str, gpu_set))}")
            elif per_job < 0:  # devices -1 ("all") without GPUs to count: none asked of submitit
                executor.update_parameters(gpus_per_node=0)
            with sigint_ignored_in_children():
                return executor.submit(self, *a)

        run_queue(args, start, slots, self.params.get("max_parallel"), handles=handles)

    def _stop_jobs(self, handles: list[Any], signum: int) -> None:
        """SIGTERM to every running job (its controller passes it on): a job in its training loop writes its
        checkpoint and exits (one already stopping on Ctrl-C goes on with that), one starting up ends. Then wait
        for them; a second Ctrl-C or SIGTERM stops waiting."""
        running = [j for j in handles if not j.done()]
        print(f"\n[scoreflow] {command_name()} -m: {signal.Signals(signum).name}: stopping {len(running)} running "
              "job(s); each writes its checkpoint (Ctrl-C again: stop waiting)", file=sys.stderr, flush=True)
        for job in running:
            with contextlib.suppress(Exception):
                job._process.send_signal(signal.SIGTERM)  # the controller forwards SIGTERM to its tasks
        try:
            with stop_requests():
                while any(not j.done() for j in running):
                    time.sleep(0.5)
        except (KeyboardInterrupt, StopRequested):
            pids = [str(j.job_id) for j in running if not j.done()]
            print(f"[scoreflow] stopped waiting; still running: controller pid(s) {' '.join(pids)}", file=sys.stderr,
                  flush=True)
            sys.exit(128 + signum)

    def _executor(self, submitit: Any) -> Any:
        """submitit's LocalExecutor itself: the AutoExecutor in front of it does not pass ``visible_gpus`` on."""
        executor = submitit.LocalExecutor(folder=self.params["submitit_folder"])
        keys = ("timeout_min", "gpus_per_node", "tasks_per_node", "nodes", "stderr_to_stdout")
        params = {k: self.params[k] for k in keys if self.params.get(k) is not None}
        if isinstance(params.get("gpus_per_node"), int) and params["gpus_per_node"] < 0:
            params.pop("gpus_per_node")  # -1 ("all GPUs"): set per job by _submit
        executor.update_parameters(**params)
        return executor


class SummarySlurmLauncher(_SummarySubmitit):
    _EXECUTOR = "slurm"
