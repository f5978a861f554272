"""Pre-emption: a real signal sent to a running ``train.py`` writes a checkpoint at the current step and exits
128 + signal; the same command again resumes from it and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from scoreflow.lit import preemption
from scoreflow.lit.callbacks import AtomicCheckpointIO
from scoreflow.lit.preemption import Preempted, slurm_job_id
from scoreflow.tasks.build import to_container
from scoreflow.tasks.errors import CheckpointError
from scoreflow.tasks.resume import ORIGIN_KEY, resume_path, with_wandb_resume
from scoreflow.tasks.train import train
from tests.integration.signals import signal_when_ready

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
# no periodic checkpoint and no validation: any last.ckpt before the end is the pre-emption checkpoint
BASE = ["debug=fast", "trainer.accelerator=cpu", "test=false", "callbacks=minimal", "checkpoint_every=1000",
        "val_every=1000", "model.net.dropout=0.1", f"trainer.max_steps={STEPS}"]
READY = "pre-emption: SIGUSR1/SIGUSR2/SIGTERM/SIGINT"


def _env(**extra: str) -> dict[str, str]:
    # No SLURM variables, and no W&B service of this pytest process (an earlier in-process W&B test exports
    # WANDB_SERVICE): a child connected to it would leave its killed run "in use" there and the resumed run's
    # wandb.init(id=...) would be refused, as happened in the full suite.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_SERVICE", "_WANDB"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    return env


def run_and_signal(run_dir: Path, sig: int, extra: list[str] = (), env: dict | None = None,
                   after_s: float = 0.3, group: bool = False) -> subprocess.CompletedProcess:
    """Start ``train.py``, wait until its training loop has installed the handlers (the log line), let it take a
    few steps, send ``sig`` to it, and wait for it to exit. ``group``: send it to the whole process group, its
    DataLoader workers too, as SLURM (every process of the job step), ``timeout`` and a terminal's Ctrl-C do."""
    cmd = [sys.executable, "train.py", *BASE, *extra, f"hydra.run.dir={run_dir}"]
    log_file = run_dir / "train.log"
    return signal_when_ready(cmd, cwd=ROOT, env=env or _env(), sig=sig, group=group, after_s=after_s,
                             ready=lambda: log_file.is_file() and READY in log_file.read_text(),
                             what="its training loop started")


def stop_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("scoreflow: ") and "checkpoint written" in ln]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a_path, b_path))
    assert a["global_step"] == b["global_step"] == STEPS
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)
    for k in a["ema"]["shadow"]:
        torch.testing.assert_close(a["ema"]["shadow"][k], b["ema"]["shadow"][k], rtol=0, atol=0, msg=k)


def test_sigterm_then_same_command_resumes_exactly_and_appends_to_the_wandb_run(make_cfg, tmp_path):
    run = tmp_path / "run"
    stopped = run_and_signal(run, signal.SIGTERM, ["logger=wandb"])
    ckpt = run / "checkpoints" / "last.ckpt"
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    line = stop_line(stopped.stderr)
    step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    assert 0 < step < STEPS, f"the signal should land mid-run (step {step} of {STEPS})"
    assert f"SIGTERM at step {step}: checkpoint written to {ckpt}" in line and f"hydra.run.dir={run}" in line
    assert not list(ckpt.parent.glob(".*.tmp"))
    assert not (run / "metrics.json").exists()  # a stopped run neither tests nor reports

    resumed = subprocess.run([sys.executable, "train.py", *BASE, "logger=wandb", f"hydra.run.dir={run}"], cwd=ROOT,
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"auto_resume: resuming from {ckpt}" in (run / "train.log").read_text()
    assert json.loads((run / "metrics.json").read_text())["train/steps"] == STEPS

    train(make_cfg(BASE, sub="uninterrupted"))
    assert_same_weights(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt", ckpt)

    # W&B: one id stored in the run folder; both processes logged to it (offline: one folder each, same id)
    run_id = json.loads((run / "wandb_run.json").read_text())["id"]
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), offline


@pytest.mark.parametrize(
    ("sig", "slurm"),
    [(signal.SIGINT, False), pytest.param(signal.SIGUSR1, False, marks=pytest.mark.slow), (signal.SIGUSR1, True),
     pytest.param(signal.SIGTERM, True, marks=pytest.mark.slow)],
    ids=["ctrl-c", "usr1-local", "usr1-slurm-requeues", "sigterm-slurm-no-requeue"],
)
def test_each_signal_checkpoints_and_only_usr1_under_slurm_requeues(tmp_path, sig, slurm):
    """A fake ``scontrol`` on PATH records the requeue; SLURM's variables make this a batch job (array task)."""
    fake_bin, record = tmp_path / "bin", tmp_path / "scontrol.args"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    (fake_bin / "scontrol").chmod(0o755)
    extra = {}
    if slurm:
        extra = dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_PROCID="0",
                     SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost", SLURM_JOB_NAME="train",
                     SLURM_JOB_ID="4243", SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID="1")
    env = _env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", **extra)
    run = tmp_path / "run"
    stopped = run_and_signal(run, sig, env=env)
    assert stopped.returncode == 128 + sig, stopped.stderr[-3000:]
    line = stop_line(stopped.stderr)
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"]
    assert re.search(rf"{signal.Signals(sig).name} at step {step}: checkpoint written to ", line), line
    if slurm and sig == signal.SIGUSR1:
        assert record.read_text().split() == ["requeue", "4242_1"]
        assert "SLURM job 4242_1 requeued" in line
    else:
        assert not record.exists() and "run the same command again" in line


@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGINT, signal.SIGUSR1],
                         ids=["sigterm", "ctrl-c", "usr1"])  # sigterm: 25 s, and test_sigterm_then_same_command...
def test_a_signal_to_the_process_group_with_dataloader_workers_checkpoints_and_resumes_exactly(make_cfg, tmp_path,
                                                                                                sig):
    """SLURM signals every process of the job step, and Ctrl-C in a terminal reaches the whole foreground group:
    the DataLoader workers get the signal too. Torch's workers die on SIGTERM and exit on SIGINT, and the main
    process then fails at its next batch, before the step's checkpoint (seen on a GPU with ``timeout``). The
    workers ignore these signals; the main process checkpoints, stops and shuts them down."""
    run = tmp_path / "run"
    workers = ["datamodule.num_workers=2"]
    stopped = run_and_signal(run, sig, workers, group=True, after_s=0.5)  # step > 0: batches came from workers
    assert stopped.returncode == 128 + sig, stopped.stderr[-3000:]
    line = stop_line(stopped.stderr)
    assert "DataLoader worker" not in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stderr.count(f"scoreflow: {signal.Signals(sig).name}: checkpoint at the end") == 1  # not a worker
    ckpt = run / "checkpoints" / "last.ckpt"
    step = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    assert 0 < step < STEPS and f"at step {step}: checkpoint written to {ckpt}" in line, line
    if sig != signal.SIGTERM:
        return  # the resume is the same for every signal
    resumed = subprocess.run([sys.executable, "train.py", *BASE, *workers, f"hydra.run.dir={run}"], cwd=ROOT,
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train(make_cfg([*BASE, *workers], sub="uninterrupted"))
    assert_same_weights(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt", ckpt)


SECOND_CTRL_C = """
import os, signal, sys, time
from pathlib import Path
from scoreflow.lit.preemption import PreemptionCheckpoint

ckpt = Path(sys.argv[1])
cb = PreemptionCheckpoint(ckpt)
cb._install()
os.kill(os.getpid(), signal.SIGINT)
assert cb.signum == signal.SIGINT  # first Ctrl-C: a checkpoint is requested, nothing stops yet
print("first handled", flush=True)
if sys.argv[2] == "after_checkpoint":
    ckpt.write_bytes(b"ckpt")
    cb._restore()  # the checkpoint is written and the run is stopping (Lightning's teardown, the exit message)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("still running", flush=True)
"""


@pytest.mark.parametrize("when", ["mid_step", "after_checkpoint"])
def test_second_ctrl_c_quits_at_once_with_one_line(tmp_path, when):
    """A second Ctrl-C exits with 130 at once and one line (no traceback: a KeyboardInterrupt could land inside
    the checkpoint write), also while the stopping run is already past its checkpoint."""
    ckpt = tmp_path / "last.ckpt"
    done = subprocess.run([sys.executable, "-c", SECOND_CTRL_C, str(ckpt), when], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr[-3000:]
    assert "first handled" in done.stdout and "still running" not in done.stdout
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    lines = [ln for ln in done.stderr.splitlines() if "SIGINT again" in ln]
    assert len(lines) == 1 and lines[0].startswith("scoreflow: SIGINT again: stopped at once"), done.stderr
    assert (f"{ckpt} is the last checkpoint written" in lines[0]) == (when == "after_checkpoint")


def test_atomic_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"\x80half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # a write killed outright (SIGKILL) leaves its temporary file; the next run removes it before training
    (tmp_path / ".last.ckpt.abc123.tmp").write_bytes(b"partial")
    assert [p.name for p in preemption.remove_stale_temporaries(tmp_path)] == [".last.ckpt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_auto_resume_picks_the_run_folders_checkpoint_and_refuses_another_model(make_cfg, tmp_path):
    cfg = make_cfg(BASE)
    out = tmp_path / "run"
    assert resume_path(cfg, out) is None  # nothing to resume yet
    ckpt = out / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"global_step": 3, "scoreflow": {"config": to_container(cfg)}}, ckpt)
    assert resume_path(cfg, out) == str(ckpt)
    assert resume_path(make_cfg([*BASE, "auto_resume=false"]), out) is None
    assert resume_path(make_cfg([*BASE, "ckpt_path=/elsewhere.ckpt"]), out) == "/elsewhere.ckpt"
    # the folder's run started from ckpt_path=/elsewhere.ckpt: the same command again continues from the folder's
    # last.ckpt (it restarted from /elsewhere.ckpt, so a requeued job with ckpt_path= never progressed)
    torch.save({"global_step": 3, "scoreflow": {"config": to_container(cfg)}, ORIGIN_KEY: "/elsewhere.ckpt"}, ckpt)
    assert resume_path(make_cfg([*BASE, "ckpt_path=/elsewhere.ckpt"]), out) == str(ckpt)
    assert resume_path(make_cfg([*BASE, "ckpt_path=/another.ckpt"]), out) == "/another.ckpt"
    assert resume_path(make_cfg([*BASE, "ckpt_path=/elsewhere.ckpt", "auto_resume=false"]), out) == "/elsewhere.ckpt"
    with pytest.raises(CheckpointError, match=r"another sde/model.*\n  model.net.dropout: 0.1 -> 0.2") as err:
        resume_path(make_cfg([*BASE, "sde=ve", "model.net.dropout=0.2"]), out)
    assert "sde._target_" in str(err.value) and "auto_resume=false" in err.value.fix
    assert resume_path(make_cfg([*BASE, "sde=ve", "resume_allow_changes=true"]), out) == str(ckpt)
    # another seed is another run (a sweep's job renumbered into the folder of another seed's job)
    with pytest.raises(CheckpointError, match=r"\n  seed: 42 -> 7"):
        resume_path(make_cfg([*BASE, "seed=7"]), out)
    assert resume_path(make_cfg([*BASE, "seed=7", "resume_allow_changes=true"]), out) == str(ckpt)
    # a group the command leaves out (train_dequant takes sde/model/data from its score checkpoint) is not compared
    no_sde = make_cfg([*BASE, "sde=ve"])
    with open_dict(no_sde):
        del no_sde["sde"]
    assert resume_path(no_sde, out) == str(ckpt)


def test_wandb_run_id_is_stored_once_per_run_folder(make_cfg, tmp_path):
    group = make_cfg(["logger=wandb"]).logger
    a = with_wandb_resume(group, tmp_path / "a")
    again = with_wandb_resume(group, tmp_path / "a")
    b = with_wandb_resume(group, tmp_path / "b")
    assert a.wandb.id == again.wandb.id != b.wandb.id and a.wandb.resume == "allow"
    assert a.wandb.group == b.wandb.group == group.wandb.group  # a sweep's runs share the group
    assert "id" not in a.csv and "id" not in group.wandb  # other loggers and the input are untouched
    pinned = with_wandb_resume(make_cfg(["logger=wandb", "+logger.wandb.id=mine"]).logger, tmp_path / "c")
    assert pinned.wandb.id == "mine"
    # an id set in the config wins over a stored one, and is stored (it was ignored once the file existed)
    pinned = with_wandb_resume(make_cfg(["logger=wandb", "+logger.wandb.id=mine"]).logger, tmp_path / "a")
    assert pinned.wandb.id == "mine" and with_wandb_resume(group, tmp_path / "a").wandb.id == "mine"
    # a run that starts afresh in a used folder (auto_resume=false) gets a new W&B run, which later resumes keep
    fresh = with_wandb_resume(group, tmp_path / "b", fresh=True)
    assert fresh.wandb.id != b.wandb.id and with_wandb_resume(group, tmp_path / "b").wandb.id == fresh.wandb.id


def test_auto_resume_refuses_a_classifier_of_another_network(make_cfg, tmp_path):
    """train_classifier.py: the folder's checkpoint of another classifier network is refused by name (a wider one
    failed to load with a traceback; normalize_input=false resumed silently with another forward pass)."""
    base = ["classifier=small", "trainer.accelerator=cpu"]
    cfg = make_cfg(base, config_name="train_classifier")
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"global_step": 3, "scoreflow": {"config": to_container(cfg)}}, ckpt)
    assert resume_path(cfg, out) == str(ckpt)
    for change, line in (("classifier.net.widen_factor=1", "classifier.net.widen_factor: 2 -> 1"),
                         ("classifier.normalize_input=false", "classifier.normalize_input: True -> False")):
        with pytest.raises(CheckpointError, match="another sde/model/data/dequantization/classifier/seed") as err:
            resume_path(make_cfg([*base, change], config_name="train_classifier"), out)
        assert line in str(err.value)


def test_an_unreadable_last_ckpt_is_one_screen_naming_it(tmp_path):
    """A truncated ``last.ckpt`` in the run folder (a full disk during a copy): the rerun says which file and what
    to do, exit 2, no traceback (it was torch's ``PytorchStreamReader failed`` traceback)."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    done = subprocess.run([sys.executable, "train.py", *BASE, f"hydra.run.dir={run}"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and f"{ckpt}, which cannot be read as a checkpoint" in done.stderr
    assert "auto_resume=false" in done.stderr


def test_slurm_job_id(monkeypatch):
    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert slurm_job_id() == "77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "70_3"
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation is never requeued
    assert slurm_job_id() is None


def test_preempted_is_an_exit_with_the_signal_code():
    stop = Preempted(signal.SIGUSR1, 7, Path("/r/checkpoints/last.ckpt"), requeue=True, is_global_zero=True)
    assert isinstance(stop, SystemExit) and not isinstance(stop, Exception) and stop.code == 138
    assert stop.message("12_3") == ("SIGUSR1 at step 7: checkpoint written to /r/checkpoints/last.ckpt; "
                                    "SLURM job 12_3 requeued, it resumes from this checkpoint")


def test_one_handler_per_signal_during_training_and_restored_after(make_cfg, monkeypatch):
    """Under (fake) SLURM, Lightning would add its own SIGUSR1 requeue and SIGTERM handlers; during the training
    loop every signal goes to scoreflow's handler alone, and the previous handlers are back afterwards."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for k, v in dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_PROCID="0",
                     SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost", SLURM_JOB_NAME="train",
                     SLURM_JOB_ID="99").items():
        monkeypatch.setenv(k, v)
    sigs = (*preemption.REQUEUE_SIGNALS, *preemption.STOP_SIGNALS)
    before = {s: signal.getsignal(s) for s in sigs}
    seen = {}
    original = preemption.PreemptionCheckpoint.on_train_batch_start

    def probe(self, trainer, *args):
        seen.update(env=trainer._accelerator_connector.cluster_environment, mine=self._handler,
                    handlers={s: signal.getsignal(s) for s in sigs})
        return original(self, trainer, *args)

    monkeypatch.setattr(preemption.PreemptionCheckpoint, "on_train_batch_start", probe)
    train(make_cfg([*BASE, "trainer.max_steps=2"]))
    assert isinstance(seen["env"], SLURMEnvironment) and not seen["env"].auto_requeue
    assert all(h == seen["mine"] for h in seen["handlers"].values()), seen["handlers"]
    assert {s: signal.getsignal(s) for s in sigs} == before


@pytest.mark.slow
def test_ddp_sigterm_to_rank_zero_stops_both_ranks_at_one_step_and_resumes_exactly(tmp_path):
    """``strategy=ddp`` (what SLURM and trainer=ddp run), 2 CPU processes: SIGTERM reaches rank 0 only; the ranks
    agree on the step (no deadlock at the checkpoint barrier), and the resumed run equals an uninterrupted one."""
    ddp = ["trainer=ddp_cpu", "trainer.strategy=ddp"]
    run = tmp_path / "run"
    stopped = run_and_signal(run, signal.SIGTERM, ddp, after_s=1.0)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    stop_line(stopped.stderr)  # printed once (rank 0)
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"]
    assert 0 < step < STEPS
    for sub in ("run", "uninterrupted"):
        done = subprocess.run([sys.executable, "train.py", *BASE, *ddp, f"hydra.run.dir={tmp_path / sub}"], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")


# A real signal at a chosen point: the module sends it to its own process at the start of the training step of a
# given global_step (before that step's computation), of the validation after that many steps, or of the first test
# batch, then train.py runs as usual.
SELF_SIGNAL = """
import os, runpy, signal, sys
from scoreflow.lit.module import ScoreLitModule
where, at, sigs = sys.argv[1], int(sys.argv[2]), [getattr(signal, s) for s in sys.argv[3].split("+")]
hook = {"train": "training_step", "val": "validation_step", "test": "test_step"}[where]
original = getattr(ScoreLitModule, hook)
sent = []
def patched(self, *args, **kwargs):
    if not sent and (where == "test" or self.global_step == at):
        sent.append(1)
        for s in sigs:
            os.kill(os.getpid(), s)
    return original(self, *args, **kwargs)
setattr(ScoreLitModule, hook, patched)
sys.argv = ["train.py", *sys.argv[4:]]
runpy.run_path("train.py", run_name="__main__")
"""
VAL = ["debug=fast", "trainer.accelerator=cpu", "test=false", "callbacks=minimal", "checkpoint_every=1000",
       "model.net.dropout=0.1", "val_every=10", "trainer.max_steps=20"]


def signal_at(where: str, at: int, sigs: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SELF_SIGNAL, where, str(at), sigs, *args], cwd=ROOT,
                          env=env or _env(), capture_output=True, text=True, timeout=600)


def csv_rows(run: Path) -> list[dict[str, str]]:
    """The run's CSV log without its timing columns (images/s and the like differ between runs)."""
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in r.items() if not re.search(r"per_s|tflops|mfu|time", k)} for r in rows]


def test_a_signal_before_a_validation_step_stops_after_it_and_the_resumed_log_is_the_uninterrupted_one(tmp_path):
    """SIGTERM during the step before a validation (global step 9 -> 10, val_every=10): the checkpoint is written
    after that step's logged values, validation and sample grid, so the resumed run repeats none of them and
    misses none: its CSV log and weights equal an uninterrupted run's. (Written at the end of the step itself,
    the checkpoint was restored as if the validation at step 10 and the step's log row had not happened: the
    resumed log lacked both, and a signal at the last step left the run without its final validation.)"""
    run, ref = tmp_path / "run", tmp_path / "uninterrupted"
    stopped = signal_at("train", 9, "SIGTERM", [*VAL, f"hydra.run.dir={run}"])
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert f"SIGTERM at step 10: checkpoint written to {run / 'checkpoints' / 'last.ckpt'}" in stop_line(stopped.stderr)
    assert any(r["step"] == "9" and r.get("val/bpd_bound") for r in csv_rows(run))
    for out in (run, ref):
        done = subprocess.run([sys.executable, "train.py", *VAL, f"hydra.run.dir={out}"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert csv_rows(run) == csv_rows(ref)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (run, ref))
    assert a["global_step"] == b["global_step"] == 20
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["sigterm", "ctrl-c"])
def test_a_signal_during_the_test_evaluation_exits_with_its_code_and_a_rerun_tests(tmp_path, sig):
    """The final test evaluation is outside the training loop: a signal there stops the run at once with 128 +
    signal and one line naming the checkpoint (Lightning's own handler ended it with exit code 0 and no results,
    so a scheduler recorded success; Ctrl-C with exit code 1); the same command again only tests."""
    run = tmp_path / "run"
    args = ["debug=fast", "trainer.accelerator=cpu", "callbacks=minimal", "trainer.max_steps=4",
            "datamodule.eval_batch_size=8", f"hydra.run.dir={run}"]
    stopped = signal_at("test", 0, signal.Signals(sig).name, args)
    name = signal.Signals(sig).name
    assert stopped.returncode == 128 + sig, stopped.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    lines = [ln for ln in stopped.stderr.splitlines() if ln.startswith("scoreflow: ")]
    assert lines == [f"scoreflow: {name} during the test evaluation: stopped; {ckpt} (step 4) holds the trained "
                     f"weights; the same command again with hydra.run.dir={run} takes no training step and evaluates "
                     f"them (exit code {128 + sig})"], stopped.stderr[-3000:]
    assert not (run / "metrics.json").exists()
    again = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "test/bpd_bound" in json.loads((run / "metrics.json").read_text())


def test_sigterm_after_sigusr1_stops_without_requeue(tmp_path):
    """SLURM's time-limit warning (SIGUSR1) then ``scancel`` (SIGTERM): the cancel wins, no ``scontrol requeue``
    (a requeued job could not be cancelled)."""
    fake_bin, record = tmp_path / "bin", tmp_path / "scontrol.args"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = _env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
               SLURM_NNODES="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost",
               SLURM_JOB_NAME="train", SLURM_JOB_ID="4243")
    run = tmp_path / "run"
    stopped = signal_at("train", 3, "SIGUSR1+SIGTERM", [*BASE, f"hydra.run.dir={run}"], env=env)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM at step 4: checkpoint written to" in stop_line(stopped.stderr)
    assert "scoreflow: SIGTERM: stop without requeue" in stopped.stderr
    assert not record.exists()


@pytest.mark.slow
def test_a_signal_in_the_last_step_stops_after_the_final_validation(tmp_path):
    """The last step's validation runs before the stop (the signal was announced, then ignored: the run went on to
    the test phase and exited 0), and the resumed run, which takes no step, reports it (it reported nothing)."""
    run = tmp_path / "run"
    stopped = signal_at("train", 19, "SIGUSR1", [*VAL, f"hydra.run.dir={run}"])
    assert stopped.returncode == 138, stopped.stderr[-3000:]
    assert "SIGUSR1 at step 20: checkpoint written to" in stop_line(stopped.stderr)
    logged = [r["val/bpd_bound"] for r in csv_rows(run) if r["step"] == "19" and r.get("val/bpd_bound")]
    assert len(logged) == 1
    # the same command again takes no step; its metrics.json and table report that validation (they had none)
    again = subprocess.run([sys.executable, "train.py", *VAL, f"hydra.run.dir={run}"], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/bpd_bound"] == pytest.approx(float(logged[0]), rel=1e-6)
    assert "last validation (step 20; test=false)" in again.stdout


@pytest.mark.slow
def test_a_run_started_from_ckpt_path_resumes_from_its_folder_when_rerun(tmp_path):
    """``ckpt_path=`` of another run, SIGTERM, the same command again (as a requeued SLURM job runs it): the run
    continues from its own folder's checkpoint, and ends with the weights of an uninterrupted run from the same
    ``ckpt_path`` (it started over from ``ckpt_path``, throwing the steps since away)."""
    src = tmp_path / "src"
    first = [*VAL, "trainer.max_steps=10"]
    done = subprocess.run([sys.executable, "train.py", *first, f"hydra.run.dir={src}"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    more = [*VAL, f"ckpt_path={src / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=20"]
    run, ref = tmp_path / "run", tmp_path / "uninterrupted"
    stopped = signal_at("train", 14, "SIGTERM", [*more, f"hydra.run.dir={run}"])
    assert stopped.returncode == 143 and "SIGTERM at step 15" in stop_line(stopped.stderr), stopped.stderr[-3000:]
    for out in (run, ref):
        done = subprocess.run([sys.executable, "train.py", *more, f"hydra.run.dir={out}"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert f"auto_resume: resuming from {run / 'checkpoints' / 'last.ckpt'}, where the run" in (
        run / "train.log").read_text()
    assert csv_rows(run) == csv_rows(ref)
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (run, ref))
    assert a["global_step"] == b["global_step"] == 20
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)


def test_a_kill_during_the_validation_of_a_periodic_checkpoints_step_loses_nothing(tmp_path):
    """SIGKILL (no handler: out of memory, a lost node) during the validation at step 20, a step of the periodic
    checkpoint too: that checkpoint waits for the validation, so the rerun resumes from step 10 and validates at 20
    again, and its CSV log and weights equal an uninterrupted run's (Lightning's ModelCheckpoint wrote it before the
    validation: the rerun resumed at 20 and the validation of step 20 was never run)."""
    args = [*VAL, "checkpoint_every=10", "trainer.max_steps=30"]
    run, ref = tmp_path / "run", tmp_path / "uninterrupted"
    killed = signal_at("val", 20, "SIGKILL", [*args, f"hydra.run.dir={run}"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 10
    for out in (run, ref):
        done = subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={out}"], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert csv_rows(run) == csv_rows(ref)
    assert sum(1 for r in csv_rows(run) if r.get("val/bpd_bound")) == 3  # steps 10, 20 and 30
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (run, ref))
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0, msg=k)


@pytest.mark.slow  # 2 processes, about a minute on 2 busy cores
def test_a_signal_to_rank_zero_in_the_ddp_test_phase_stops_every_rank(tmp_path):
    """``strategy=ddp`` run as a script (Lightning starts rank 1 from rank 0): SIGTERM to rank 0 alone during the
    test evaluation reaches rank 1 too, so both stop at once; the command exits 143 with its one line and no
    process is left. Before, rank 0 exited alone and rank 1 went on into a collective whose peer was gone."""
    run = tmp_path / "run"
    args = ["debug=fast", "trainer=ddp_cpu", "trainer.strategy=ddp", "callbacks=minimal", "trainer.max_steps=4",
            "val_every=4", "module.evaluation.nll_every=0", "datamodule.test_subset=64", "datamodule.eval_batch_size=4",
            "extras.print_config=false", f"hydra.run.dir={run}"]
    stopped = signal_at("test", 0, "SIGTERM", args)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    lines = [ln for ln in stopped.stderr.splitlines() if ln.startswith("scoreflow: ")]
    assert len(lines) == 1 and "SIGTERM during the test evaluation: stopped" in lines[0], stopped.stderr[-3000:]
    deadline = time.time() + 30
    while time.time() < deadline:
        left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run}"], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"rank 1 still running: {left}"
    assert not (run / "metrics.json").exists()


def _agree_on_rank(rank: int, init: str, out: str) -> None:
    """One of 2 gloo processes posing as an NCCL training: a signal on rank 1 only stops both, and the agreement
    is a reduction of CPU tensors in a gloo group of its own (no read of a GPU value, which waited for the step)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    seen = []
    real_all_reduce = dist.all_reduce

    def spy(t, *args, **kwargs):
        seen.append((t.device.type, kwargs.get("group")))
        return real_all_reduce(t, *args, **kwargs)

    dist.get_backend = lambda group=None: "nccl"  # the branch a GPU training takes: a gloo group of its own
    dist.all_reduce = spy
    try:
        strategy = SimpleNamespace(reduce=lambda *a, **k: pytest.fail("the strategy's (device) reduction was used"))
        trainer = SimpleNamespace(world_size=2, global_step=5, is_global_zero=rank == 0, received_sigterm=False,
                                  strategy=strategy, callbacks=[])
        cb = preemption.PreemptionCheckpoint(Path(out) / "last.ckpt")
        cb.on_train_start(trainer, None)
        cb._stop_if_signalled(trainer, None, write=False)  # no signal anywhere: both go on
        if rank == 1:
            cb.signum = signal.SIGUSR1
        try:
            cb._stop_if_signalled(trainer, None, write=False)
            result = "continued"
        except Preempted as e:
            result = f"stopped {e.code} requeue={e.requeue}"
        cb._restore()
        groups = {g for _, g in seen}
        Path(out, f"rank{rank}.txt").write_text(json.dumps({
            "result": result, "devices": sorted({d for d, _ in seen}), "calls": len(seen),
            "own_group": len(groups) == 1 and None not in groups}))
    finally:
        dist.all_reduce = real_all_reduce
        dist.destroy_process_group()


def test_ranks_agree_on_a_stop_between_their_cpus_in_a_group_of_their_own(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_agree_on_rank, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.txt").read_text())
        assert got == {"result": "stopped 138 requeue=True", "devices": ["cpu"], "calls": 2, "own_group": True}, rank


def test_without_a_gloo_group_the_ranks_agree_through_the_strategy(monkeypatch, caplog):
    """A cluster whose hosts cannot open a gloo group (no GLOO_SOCKET_IFNAME, say) trains on, agreeing through the
    training's own backend, and says so, instead of failing at the start of training."""
    from types import SimpleNamespace

    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")

    def no_gloo(*args, **kwargs):
        raise RuntimeError("Gloo connectFullMesh failed")

    monkeypatch.setattr(dist, "new_group", no_gloo)
    seen = []
    strategy = SimpleNamespace(root_device=torch.device("cpu"),
                               reduce=lambda t, reduce_op: seen.append(reduce_op) or t * 2)
    with caplog.at_level("WARNING", logger="scoreflow.lit.preemption"):
        agree = preemption.host_max_reduction(SimpleNamespace(strategy=strategy))
    assert agree(1) == 2 and seen == ["max"] and "no gloo group between the processes" in caplog.text
