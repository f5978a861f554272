"""The end of a ``-m`` sweep: one table of its jobs and the first unsuccessful job's exit code, not the first
failure's traceback (``scoreflow.tasks.launchers``, ``hydra_plugins.scoreflow_launchers``); a job stopped by a
signal under ``hydra/launcher=local`` resumes when the same command runs again; train.py prints the results."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from scoreflow.tasks.errors import ConfigError, DataError
from scoreflow.tasks.launchers import (
    JobOutcome,
    JobStopped,
    basic_sweep,
    finish,
    gpu_slots,
    machine_gpus,
    outcome_of_lost_job,
    outcome_of_return,
    parallel_job,
    run_queue,
    summary,
    varying,
    worker_thread_env,
)

ROOT = Path(__file__).resolve().parents[2]
READY = "pre-emption: SIGUSR1/SIGUSR2/SIGTERM/SIGINT"
STOP = ("scoreflow: SIGTERM at step 12: checkpoint written to /s/0_sde=vp/checkpoints/last.ckpt; to resume, run the "
        "same command again with hydra.sweep.dir=/s (exit code 143)")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "WANDB_SERVICE", "_WANDB"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def test_a_lost_job_is_stopped_when_its_error_stream_ends_with_the_checkpoint_line():
    o = outcome_of_lost_job(0, ["sde=vp"], "/s/0_sde=vp", "noise\nscoreflow: SIGTERM: checkpoint at the end\n" + STOP)
    assert (o.status, o.code) == ("stopped", 143)
    assert o.detail == "SIGTERM at step 12: checkpoint written to /s/0_sde=vp/checkpoints/last.ckpt"
    killed = outcome_of_lost_job(1, ["sde=ve"], None, "line 1\nKilled\n")
    assert (killed.status, killed.code) == ("failed", 1) and killed.detail.endswith("Killed")
    assert "line 1" in killed.screen  # the tail of the error stream goes below the table
    silent = outcome_of_lost_job(2, [], None, "", log_path="/s/.submitit/7/7_0_log.err")
    assert silent.detail == ("ended without a result: no error output: killed (out of memory? SIGKILL?); its log: "
                             "/s/.submitit/7/7_0_log.err")
    timeout = outcome_of_lost_job(3, [], None, STOP.replace("SIGTERM", "SIGUSR2"), timeout_signal="SIGUSR2")
    assert timeout.status == "stopped"
    assert timeout.detail.endswith("(hydra.launcher.timeout_min reached: raise it to go on)")


def test_jobs_stopped_in_the_test_phase_or_in_evaluate_py_are_listed_as_stopped():
    """The stop lines of the test phase and of ``evaluate.py`` (no checkpoint written then: the trained weights or
    the finished batches are on disk) make a job ``stopped``, in a submitit sweep (its error stream) and in an
    in-process one (the exception); before, they were ``failed: ended without a result`` and a wrong
    "at step -1: checkpoint written to <the evaluation folder>"."""
    from scoreflow.lit.preemption import EvaluationStopped, Preempted
    from scoreflow.tasks.launchers import StopsAsResults

    test_phase = ("scoreflow: SIGTERM during the test evaluation: stopped; /s/0/checkpoints/last.ckpt (step 20) holds "
                  "the trained weights; the same command again with hydra.sweep.dir=/s takes no training step and "
                  "evaluates them (exit code 143)")
    o = outcome_of_lost_job(0, [], "/s/0", test_phase)
    assert (o.status, o.code) == ("stopped", 143)
    assert o.detail == "SIGTERM during the test evaluation: stopped; /s/0/checkpoints/last.ckpt (step 20) holds " \
                       "the trained weights"
    stop = EvaluationStopped(signal.SIGUSR1, "/s/1", requeue=True, is_global_zero=True)
    o = outcome_of_lost_job(1, [], "/s/1", "noise\nscoreflow: " + stop.message("9_1"))
    assert (o.status, o.detail) == ("stopped", "SIGUSR1 during the evaluation: stopped; the finished batches are "
                                               "kept in /s/1")
    back = pickle.loads(pickle.dumps(stop))  # a joblib worker sends it back
    assert (type(back), back.code, back.requeue, back.summary()) == (EvaluationStopped, 138, True, stop.summary())

    def stops(exc):
        def task(cfg):
            raise exc
        return task

    for exc in (stop, Preempted(15, 20, Path("/s/0/checkpoints/last.ckpt"), requeue=False, is_global_zero=True,
                                during="the test evaluation")):
        with pytest.raises(JobStopped) as got:
            StopsAsResults(stops(exc))(None)
        assert (got.value.code, str(got.value)) == (exc.code, exc.summary())


def test_outcomes_of_returned_jobs_anticipated_error_crash_and_success():
    hydra_cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": "/s/3_x"}}})
    ok = outcome_of_return(3, JobReturn(overrides=["a=1"], hydra_cfg=hydra_cfg, status=JobStatus.COMPLETED), "t.py")
    assert (ok.status, ok.code, ok.folder) == ("done", 0, "/s/3_x")
    bad = DataError("CIFAR-10 not found. Looked for: /x\nExpected layout: ...", key="data.root", value="/x")
    failed = outcome_of_return(4, JobReturn(overrides=["a=2"], status=JobStatus.FAILED, _return_value=bad), "t.py")
    assert (failed.status, failed.code, failed.detail) == ("failed", 2, "CIFAR-10 not found. Looked for: /x")
    assert "config key: data.root" in failed.screen
    bug = ZeroDivisionError("division by zero")
    crashed = outcome_of_return(5, JobReturn(overrides=["a=3"], hydra_cfg=hydra_cfg, status=JobStatus.FAILED,
                                             _return_value=bug), "t.py")
    assert (crashed.status, crashed.code, crashed.exception) == ("crashed", 1, bug)
    assert crashed.detail == "ZeroDivisionError: division by zero (traceback in /s/3_x/t.log)"
    stop = JobStopped(15, 143, "SIGTERM at step 7: checkpoint written to /s/3_x/checkpoints/last.ckpt")
    stopped = outcome_of_return(6, JobReturn(overrides=["a=4"], status=JobStatus.FAILED,
                                             _return_value=pickle.loads(pickle.dumps(stop))), "t.py")
    assert (stopped.status, stopped.code) == ("stopped", 143)
    assert stopped.detail == "SIGTERM at step 7: checkpoint written to /s/3_x/checkpoints/last.ckpt"


def test_summary_lists_the_swept_values_the_status_and_how_to_resume():
    outcomes = [outcome_of_lost_job(0, ["debug=fast", "sde=vp"], "/s/0_sde=vp", STOP),
                JobOutcome(1, ["debug=fast", "sde=ve"], "done", folder="/s/1_sde=ve")]
    assert varying(outcomes) == [["sde=vp"], ["sde=ve"]]
    text = summary(outcomes, "train.py", "/s")
    lines = text.splitlines()
    assert lines[0] == "[scoreflow] train.py -m: 2 jobs: 1 done, 1 stopped"
    assert lines[1].split()[:3] == ["#0", "sde=vp", "stopped"] and "last.ckpt" in lines[1]
    assert lines[2].split() == ["#1", "sde=ve", "done", "/s/1_sde=ve"]
    assert "run the same command again with hydra.sweep.dir=/s" in lines[3]
    long = [JobOutcome(0, ["x=" + "a" * 80], "done", folder="/f"), JobOutcome(1, ["x=b"], "failed", 2, "bad")]
    assert max(len(ln.split("  ")[1].strip()) for ln in summary(long, "t.py", "/s").splitlines()[1:3]) <= 48


def test_finish_exits_with_the_first_unsuccessful_code_reraises_a_crash_and_leaves_other_sweepers_alone(capsys):
    done = JobOutcome(0, ["a=1"], "done")
    finish([done], "t.py", "/s")  # all done: nothing printed, no exit
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as e:
        finish([done, JobOutcome(1, ["a=2"], "failed", 2, "bad"), JobOutcome(2, ["a=3"], "stopped", 143, "x")],
               "t.py", "/s")
    assert e.value.code == 2
    try:  # a crash in this process (the sequential launcher): raised again, with its frames
        1 / 0  # noqa: B018
    except ZeroDivisionError as err:
        bug = err
    with pytest.raises(ZeroDivisionError):
        finish([JobOutcome(0, ["a=1"], "failed", 2, "bad"), JobOutcome(1, ["a=2"], "crashed", 1, "Z", exception=bug)],
               "t.py", "/s")
    assert "1 failed, 1 crashed" in capsys.readouterr().err
    finish([JobOutcome(0, ["a=1"], "failed", 2, "bad")], "t.py", "/s", stop=False)  # Optuna handles it itself
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as e:  # the sweep itself was stopped: the signal's code
        finish([JobOutcome(0, ["a=1"], "stopped", 143, "x"), JobOutcome(1, ["a=2"], "not started", 1, "n")], "t.py",
               "/s", stopped_by=2)
    assert e.value.code == 130 and "1 stopped, 1 not started" in capsys.readouterr().err
    unpickled = pickle.loads(pickle.dumps(bug))  # a crash in another process: its traceback as text, exit 1
    unpickled.scoreflow_traceback = "Traceback (most recent call last):\n  ...\nZeroDivisionError: division by zero"
    with pytest.raises(SystemExit) as e:
        finish([JobOutcome(0, ["a=1"], "crashed", 1, "Z", exception=unpickled)], "t.py", "/s")
    assert e.value.code == 1 and "job #0: Traceback (most recent call last)" in capsys.readouterr().err


@pytest.mark.parametrize("launcher", ["sequential", "local", "parallel", "slurm"])
def test_every_launcher_config_selects_a_summary_launcher_and_knows_the_sweeper(launcher):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
        default = compose("train", overrides=[], return_hydra_config=True)
        optuna = compose("train", overrides=["hparams_search=optuna_lr_ema"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.launcher._target_.startswith("hydra_plugins.scoreflow_launchers.Summary")
    assert default.hydra.launcher._target_ == "hydra_plugins.scoreflow_launchers.SummaryBasicLauncher"
    assert basic_sweep(cfg) and not basic_sweep(optuna)


def test_a_sweep_with_failed_jobs_prints_one_table_and_no_traceback(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "data=cifar10", f"data.root={tmp_path / 'none'}", "sde=vp,ve",
           f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]
    assert "[scoreflow] train.py -m: 2 jobs: 2 failed" in p.stderr
    assert p.stderr.count("CIFAR-10 not found") == 4  # each job's screen, then its row in the table
    assert f"#0 folder (log, config): {sweep}/0_" in p.stderr


@pytest.mark.slow  # 10-110 s on 2 cores: `make test-all` runs it
def test_a_local_sweep_job_stopped_by_sigterm_is_reported_then_resumed_by_the_same_command(tmp_path):
    """Job #0 (2 steps) finishes, job #1 gets SIGTERM once training: the submitting command prints the table and
    exits 143 (was: submitit's UncompletedJobError traceback, exit 1); the same command again resumes job #1 from
    its checkpoint to the end, exit 0, and prints the sweep's results table."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=local", "debug=fast", "trainer.accelerator=cpu",
           "test=false", "callbacks=minimal", "val_every=1000", "checkpoint_every=1000", "trainer.max_steps=2,1000",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:  # signal job #1 alone: once it trains and job #0 has ended (its process gone)
        while True:
            logs = list(sweep.glob("1_*/train.log"))
            jobs = subprocess.run(["pgrep", "-f", f"submitit.core._submit {sweep}"], capture_output=True, text=True)
            pids = [int(x) for x in jobs.stdout.split()]
            if logs and READY in logs[0].read_text() and list(sweep.glob("0_*/metrics.json")) and len(pids) == 1:
                break
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        os.kill(pids[0], signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in out + err and "UncompletedJobError" not in err, err[-3000:]
    assert "[scoreflow] train.py -m: 2 jobs: 1 done, 1 stopped" in err
    row = next(ln for ln in err.splitlines() if ln.strip().startswith("#1 "))
    assert "trainer.max_steps=1000" in row and "stopped" in row and "checkpoint written to" in row
    assert f"run the same command again with hydra.sweep.dir={sweep}" in err

    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    job1 = next(sweep.glob("1_*"))
    metrics = json.loads((job1 / "metrics.json").read_text())
    assert metrics["train/steps"] == 1000 and metrics["train/segments"] == 2
    assert "auto_resume: resuming from" in (job1 / "train.log").read_text()
    assert "| `trainer.max_steps=1000` |" in again.stdout and (sweep / "sweep_table.md").is_file()


class _Handle:
    def __init__(self, log: list, item: str, gpus: list[int] | None):
        self.log, self.item, self.gpus, self.polls = log, item, gpus, 0
        log.append(("start", item, gpus))

    def done(self) -> bool:  # each job runs for two polls
        self.polls += 1
        if self.polls >= 2 and ("end", self.item) not in self.log:
            self.log.append(("end", self.item))
        return self.polls >= 2


def test_the_local_queue_gives_each_running_job_its_own_gpus_and_starts_the_next_when_a_set_is_free():
    events: list = []
    handles = run_queue(list("abcde"), lambda item, gpus: _Handle(events, item, gpus), gpu_slots([4, 5, 6, 7, 9], 2),
                        None, poll_s=0)
    assert [h.item for h in handles] == list("abcde")
    assert gpu_slots([4, 5, 6, 7, 9], 2) == [[4, 5], [6, 7]]  # GPU 9 idle: no set of two left
    running: dict[str, list[int]] = {}
    for e in events:  # never two running jobs on one GPU, never more than two at once
        if e[0] == "start":
            assert not set(e[2]) & {g for gs in running.values() for g in gs}, events
            running[e[1]] = e[2]
            assert len(running) <= 2
        else:
            running.pop(e[1])
    assert [e[2] for e in events if e[0] == "start"][:2] == [[4, 5], [6, 7]]
    # without GPUs: everything at once (or max_parallel at a time)
    events.clear()
    run_queue(list("abc"), lambda item, gpus: _Handle(events, item, gpus), [], None, poll_s=0)
    assert [e[0] for e in events] == ["start"] * 3
    events.clear()
    run_queue(list("abc"), lambda item, gpus: _Handle(events, item, gpus), [], 1, poll_s=0)
    assert [e[0] for e in events][:3] == ["start", "end", "start"]
    with pytest.raises(ConfigError, match="each job asks for 4 GPUs"):
        gpu_slots([0, 1], 4)
    assert gpu_slots([0, 1, 2], -1) == [[0, 1, 2]] and gpu_slots([], -1) == []  # devices=-1: all, one job at a time


def test_machine_gpus_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert machine_gpus() == [2, 3]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert machine_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1a2b,GPU-3c4d")
    assert machine_gpus() is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi: no GPUs
    assert machine_gpus() == []


@pytest.mark.slow  # 10-110 s on 2 cores: `make test-all` runs it
def test_a_local_sweep_shares_out_the_gpus_one_job_per_gpu_at_a_time(tmp_path):
    """Three one-GPU jobs on a machine with "GPUs" 0 and 1 (hydra.launcher.gpus; CPU training here): the first two
    start on GPU 0 and GPU 1, the third when one of them has ended, on the GPU it freed."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=local", "hydra.launcher.gpus=[0,1]", "debug=fast",
           "trainer.accelerator=cpu", "trainer.max_steps=2", "val_every=1000", "test=false", "callbacks=minimal",
           "seed=1,2,3", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    visible, start, end = {}, {}, {}
    for job in sweep.glob("[0-9]*_*"):
        log = (job / "train.log").read_text()
        num = int(job.name.split("_", 1)[0])
        visible[num] = re.search(r"CUDA_VISIBLE_DEVICES=(\S*)", log).group(1)
        start[num] = (job / ".hydra" / "config.yaml").stat().st_mtime
        end[num] = (job / "metrics.json").stat().st_mtime
    assert sorted(visible) == [0, 1, 2] and {visible[0], visible[1]} == {"0", "1"}, visible
    # the third starts once a GPU is free, on a GPU of a job that had ended by then (metrics.json is written a
    # moment before the job's process exits, so of two jobs ending within that moment either may free its GPU first)
    assert start[2] >= min(end[0], end[1]) - 0.5, (start, end, visible)
    assert visible[2] in {visible[k] for k in (0, 1) if end[k] <= start[2] + 0.5}, (start, end, visible)


@pytest.mark.slow  # 10-110 s on 2 cores: `make test-all` runs it
def test_a_rerun_sweep_skips_the_jobs_that_finished_and_keeps_the_numbering(tmp_path):
    sweep = tmp_path / "sweep"
    base = [sys.executable, "train.py", "-m", "debug=fast", "trainer.accelerator=cpu", "val_every=1000", "test=false",
            "callbacks=minimal", f"hydra.sweep.dir={sweep}"]
    first = subprocess.run([*base, "trainer.max_steps=2,3"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    stamps = {p: p.stat().st_mtime_ns for p in sweep.glob("*/metrics.json")}
    assert len(stamps) == 2
    again = subprocess.run([*base, "trainer.max_steps=2,3,4"], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert log.count("finished earlier in") == 2 and "#2 : " in log, log[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the finished runs were not touched
    new = [p for p in sweep.glob("2_*/metrics.json")]
    assert len(new) == 1 and json.loads(new[0].read_text())["train/steps"] == 4
    assert "(3 runs, 0 failed)" in (sweep / "sweep_table.md").read_text()
    rerun = subprocess.run([*base, "trainer.max_steps=2", "rerun_finished=true"], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "finished earlier" not in rerun.stdout + rerun.stderr, rerun.stderr[-3000:]
    job0 = list(sweep.glob("0_*/metrics.json"))  # the same folder: rerun_finished is not part of its name
    assert len(job0) == 1 and job0[0].stat().st_mtime_ns != stamps[job0[0]]


def _ready(folder: Path, pattern: str) -> bool:
    """The job log matching ``pattern`` under ``folder`` says its training loop runs."""
    log = next(iter(folder.glob(pattern)), None)
    return log is not None and READY in log.read_text()


def _sigterm_when(cmd: list[str], ready, target=None) -> tuple[int, str, str]:
    """Run ``cmd``; once ``ready()`` holds, SIGTERM to ``target(proc)`` (a pid; default: the command itself); its exit
    code, stdout and stderr."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while not ready():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        os.kill(target(proc) if target else proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out, err


def _ctrl_c_once_two_jobs_train(launcher: list[str], sweep: Path, max_steps: str = "100000,100001"
                                ) -> tuple[int, str, str]:
    """A sweep over ``max_steps`` (``launcher`` picks the launcher), SIGINT to its whole process group (a terminal's
    Ctrl-C) once jobs #0 and #1 are in their training loop; its exit code, stdout and stderr."""
    cmd = [sys.executable, "train.py", "-m", *launcher, "debug=fast", "trainer.accelerator=cpu", "test=false",
           "callbacks=minimal", "val_every=100000", "checkpoint_every=100000", f"trainer.max_steps={max_steps}",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while not all((log := next(iter(sweep.glob(f"{n}_*/train.log")), None)) and READY in log.read_text()
                      for n in (0, 1)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out, err


@pytest.mark.slow  # 10-110 s on 2 cores: `make test-all` runs it
def test_ctrl_c_on_a_local_sweep_stops_every_job_at_a_checkpoint_and_prints_the_table(tmp_path):
    """Ctrl-C in a terminal (SIGINT to the whole process group: the submitting command, submitit's controllers and
    the jobs): each training job writes its checkpoint, the command lists them and exits 130. Was: three
    KeyboardInterrupt tracebacks, and the controllers killing their job a second after the signal."""
    sweep = tmp_path / "sweep"
    code, out, err = _ctrl_c_once_two_jobs_train(["hydra/launcher=local"], sweep)
    assert code == 130, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert "[scoreflow] train.py -m: SIGINT: stopping 2 running job(s)" in err  # the command's own Ctrl-C
    assert "[scoreflow] train.py -m: 2 jobs: 2 stopped" in err
    for job in sweep.glob("[01]_*"):
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert "SIGINT at step" in (job / "train.log").read_text()
    left = subprocess.run(["pgrep", "-f", f"submitit.*{sweep}"], capture_output=True, text=True).stdout.split()
    assert not left, left


def test_a_parallel_job_queued_before_a_stop_does_not_start_and_workers_get_their_share_of_threads(tmp_path,
                                                                                                 monkeypatch):
    stop = tmp_path / ".scoreflow_stop"
    stop.write_text("2")
    assert parallel_job(str(stop), 0, ["a=1"], None, None, None, {}) == ("not started", 2)  # no Hydra job run
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("joblib.cpu_count", lambda: 8)
    env = worker_thread_env(2)
    assert env["OMP_NUM_THREADS"] == "4" and env["MKL_NUM_THREADS"] == "3"  # joblib's rule: a set variable is kept


def test_ctrl_c_on_a_parallel_sweep_stops_every_job_at_a_checkpoint_and_prints_the_table(tmp_path):
    """hydra/launcher=parallel, 2 workers, 3 jobs: Ctrl-C (SIGINT to the whole process group) once jobs #0 and #1
    train. Each writes its checkpoint, the queued job #2 does not start, the command lists them and exits 130. Was:
    joblib ended its workers at once, and one of two jobs had not written its checkpoint; no table."""
    sweep = tmp_path / "sweep"
    code, out, err = _ctrl_c_once_two_jobs_train(["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"], sweep,
                                                 max_steps="100000,100001,100002")
    assert code == 130, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert "[scoreflow] train.py -m: SIGINT: stopping the jobs of 2 worker process(es)" in err
    assert "[scoreflow] train.py -m: 3 jobs: 2 stopped, 1 not started" in err
    rows = {ln.split()[0]: ln for ln in err.splitlines() if ln.startswith("  #")}
    assert "SIGINT at step" in rows["#0"] and "checkpoint written to" in rows["#1"], rows
    assert "not started: the sweep was stopped" in rows["#2"]
    for job in sweep.glob("[01]_*"):
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert not list(sweep.glob("2_*")) and not (sweep / ".scoreflow_stop").exists()


@pytest.mark.slow  # ~10 s
def test_sigterm_to_a_parallel_sweep_starting_up_stops_its_jobs_and_a_signal_to_one_worker_stops_its_job_alone(
        tmp_path):
    """SIGTERM to the command while its jobs start up (before or in their training loop): every job ends (stopped,
    with or without a checkpoint), the third never starts, exit 143. Then SIGTERM to the only worker of a
    1-worker sweep while job #0 trains: #0 is stopped at a checkpoint, #1 still runs in that worker and finishes."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "debug=fast",
           "trainer.accelerator=cpu", "test=false", "callbacks=minimal", "val_every=100000",
           "checkpoint_every=100000", "trainer.max_steps=100000,100001,100002", f"hydra.sweep.dir={sweep}"]
    code, out, err = _sigterm_when(cmd, lambda: bool(list(sweep.glob("0_*"))))
    assert code == 143 and "Traceback" not in out + err, err[-3000:]
    assert "[scoreflow] train.py -m: 3 jobs: 2 stopped, 1 not started" in err, err[-3000:]
    rows = {ln.split()[0]: ln for ln in err.splitlines() if ln.startswith("  #")}
    for n in ("#0", "#1"):
        assert ("SIGTERM: stopped outside the training loop" in rows[n]
                or "SIGTERM at step" in rows[n] and "checkpoint written to" in rows[n]), rows

    one = tmp_path / "one"
    cmd = [*cmd[:4], "hydra.launcher.n_jobs=1", *cmd[5:-2], "trainer.max_steps=100000,3", f"hydra.sweep.dir={one}"]

    def the_worker(proc) -> int:
        workers = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "popen_loky"], capture_output=True, text=True)
        assert len(workers.stdout.split()) == 1, workers.stdout
        return int(workers.stdout.split()[0])

    code, out, err = _sigterm_when(cmd, lambda: _ready(one, "0_*/train.log"), target=the_worker)
    assert code == 143 and "Traceback" not in out + err, err[-3000:]
    assert "[scoreflow] train.py -m: 2 jobs: 1 done, 1 stopped" in err, err[-3000:]
    assert json.loads(next(one.glob("1_*/metrics.json")).read_text())["train/steps"] == 3


@pytest.mark.slow  # 10-110 s on 2 cores: `make test-all` runs it
def test_sigterm_on_a_sequential_sweep_lists_the_done_stopped_and_unstarted_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "debug=fast", "trainer.accelerator=cpu", "test=false", "callbacks=minimal",
           "val_every=100000", "checkpoint_every=100000", "trainer.max_steps=2,100000,3", f"hydra.sweep.dir={sweep}"]
    code, out, err = _sigterm_when(cmd, lambda: _ready(sweep, "1_*/train.log"))
    assert code == 143, err[-3000:]
    assert "Traceback" not in out + err and "[scoreflow] train.py -m: 3 jobs: 1 done, 1 stopped, 1 not started" in err
    rows = {ln.split()[0]: ln for ln in err.splitlines() if ln.startswith("  #")}
    assert "checkpoint written to" in rows["#1"] and "not started" in rows["#2"]
    assert (sweep / "sweep_table.md").is_file()  # the results of the finished job #0
    assert not list(sweep.glob("2_*"))


def test_a_sweep_with_a_bad_value_is_refused_on_one_screen_before_any_job(tmp_path):
    """Each swept value is composed before Hydra starts (was: Hydra's message with its config search path, exit 1)."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "sde=vp,ve", "data=digits,digitz", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "usage error: In 'train': Could not find 'data/digitz'" in p.stderr and "Traceback" not in p.stderr
    assert "Config search path" not in p.stderr and not sweep.exists()
    typo = subprocess.run([*cmd[:3], "module.optim.lrr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "did you mean module.optim.lr" in typo.stderr and not sweep.exists()


def test_an_evaluate_sweep_ends_with_its_results_table(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "evaluate.py", "-m", f"ckpt_path={ROOT / 'tests/data/release-53daf68_digits_tiny.ckpt'}",
           "evaluation.test_num_t=2,4", "evaluation.method=rk4", "evaluation.steps=1", "progress=false", "device=cpu",
           "solver_check_images=0", "num_images=6", "batch_size=3", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"### {sweep} (2 runs, 0 failed)" in p.stdout
    rows = [ln for ln in (sweep / "sweep_table.md").read_text().splitlines() if ln.startswith("| `evaluation")]
    assert len(rows) == 2 and all(ln.endswith("| - | - |") for ln in rows)  # no training steps or time: evaluations


@pytest.mark.slow  # 10-110 s on 2 cores: `make test-all` runs it
def test_an_optuna_search_minimises_the_trials_metric_and_a_failed_trial_ends_on_one_line(tmp_path):
    """hparams_search=optuna_lr_ema end to end: Optuna's best value is the smallest val/bpd_bound the trials wrote. A
    trial that fails with an anticipated error (no data) ends the search with the job's message and one line from
    the sweeper, not a traceback (was: the job's traceback through Hydra) nor alembic's start-up log lines."""
    import yaml

    sweep = tmp_path / "search"
    base = [sys.executable, "train.py", "-m", "hparams_search=optuna_lr_ema", "hydra.sweeper.n_trials=2", "debug=fast"]
    p = subprocess.run([*base, f"hydra.sweep.dir={sweep}"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [json.loads(f.read_text())["val/bpd_bound"] for f in sweep.glob("*/metrics.json")]
    assert len(values) == 2 and best["best_value"] == pytest.approx(min(values), rel=1e-6)
    assert "setup plugin alembic" not in p.stdout + p.stderr

    failed = tmp_path / "failed"
    q = subprocess.run([*base, "data=cifar10", f"data.root={tmp_path / 'none'}", f"hydra.sweep.dir={failed}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    out = q.stdout + q.stderr
    assert q.returncode == 2 and "Traceback" not in out, out[-3000:]  # the job's own exit code (usage error)
    assert "usage error: CIFAR-10 not found" in q.stderr  # the job's own screen
    assert re.search(r"^\[scoreflow\] train\.py -m: job #0 failed: CIFAR-10 not found.*\(job folder: ", q.stderr,
                     re.M), q.stderr[-3000:]
    # ... and ends there: no "Error executing job with overrides" lines, no HYDRA_FULL_ERROR hint after it
    assert q.stderr.rstrip().splitlines()[-1].startswith("[scoreflow] train.py -m: job #0 failed: CIFAR-10 not found")
    assert "Error executing job" not in out and "HYDRA_FULL_ERROR=1 for a complete" not in out

    # a search that lets its trials fail (max_failure_rate=1) and has none left: one line, not Optuna's traceback
    r = subprocess.run([*base, "hydra.sweeper.max_failure_rate=1.0", "data=cifar10", f"data.root={tmp_path / 'none'}",
                        f"hydra.sweep.dir={tmp_path / 'all_failed'}"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in out, out[-3000:]
    assert "no trial of the search finished: 2 failed" in r.stderr and "job #0 failed: CIFAR-10" in r.stderr
