"""``hydra/launcher=slurm``: the sbatch script the README command submits (a fake ``sbatch`` records it), and a
real 2-job sweep through ``hydra/launcher=submitit_local`` that trains and writes each job's metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    return env


@pytest.mark.parametrize("config_name", ["train", "evaluate"])
def test_launcher_allocation_follows_the_trainer(config_name):
    keys = ["trainer=ddp", "trainer.num_nodes=4", "trainer.devices=8"] if config_name == "train" else [
        "num_nodes=4", "devices=8"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=["hydra/launcher=slurm", *keys], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (4, 8, 8)
    assert launcher.additional_parameters.signal == "USR1@90"
    assert launcher._target_.endswith("SlurmLauncher")


def test_readme_command_submits_the_expected_sbatch_script(tmp_path):
    """``train.py -m hydra/launcher=slurm ...`` with ``sbatch`` and ``srun`` replaced by scripts: the job array's
    sbatch file carries the cluster keys, one task per GPU and SIGUSR1 90 s before the time limit."""
    fake_bin, script = tmp_path / "bin", tmp_path / "submitted.sh"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "Submitted batch job 4242"\n')
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in fake_bin.iterdir():
        f.chmod(0o755)
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=4",
           "trainer.devices=8", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj",
           "hydra.launcher.qos=high", "hydra.launcher.constraint=h100", "sde=vp,subvp",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # after submitting, the launcher waits for the (fake) job: stop it once the script is there
        deadline = time.time() + 120
        while not script.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
    finally:
        proc.kill()
        out = proc.communicate()[0]
    assert script.is_file(), out[-3000:]
    lines = set(script.read_text().splitlines())
    for flag in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=proj",
                 "--qos=high", "--constraint=h100", "--time=1440", "--signal=USR1@90", "--array=0-1%2"]:
        assert f"#SBATCH {flag}" in lines, flag
    assert not any("USR2" in ln for ln in lines)  # submitit's own signal line is replaced, not doubled
    assert any(ln.startswith("srun ") and "submitit.core._submit" in ln for ln in lines)


def test_submitit_local_sweep_trains_two_jobs_with_metrics_and_one_wandb_group(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=local", "debug=fast", "trainer.accelerator=cpu",
           "trainer.max_steps=2", "val_every=2", "test=false", "callbacks=minimal", "logger=wandb", "sde=vp,ve",
           f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"], jobs
    runs = []
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["train/steps"] == 2 and metrics["val/bpd_bound"] > 0
        assert (job / "checkpoints" / "last.ckpt").is_file()
        runs.append(json.loads((job / "wandb_run.json").read_text()))
    assert runs[0]["id"] != runs[1]["id"] and runs[0]["group"] == runs[1]["group"] == str(sweep)
    assert list((sweep / ".submitit").iterdir())  # the jobs went through submitit (logs, pickles)
