"""``strategy=ddp`` runs the whole task in every process: after training and the (distributed) test phase only
global rank 0 writes ``metrics.json``, draws the plot and prints the results table (every rank used to, with
one fixed temporary file name: a rank could fail renaming a file another rank had already renamed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scoreflow.tasks.common import write_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about 20 s (2 processes): `make test-all` runs it
def test_ddp_train_reports_once_from_rank_zero(tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_SERVICE", "_WANDB"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "train.py", "debug=fast", "trainer=ddp_cpu", "trainer.strategy=ddp", "trainer.max_steps=4",
           "val_every=4", "sample_every=1000", "module.evaluation.nll_every=0", "callbacks=minimal",
           "extras.print_config=false", f"hydra.run.dir={run}"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert out.count("== test split") == 1, out[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/steps"] == 4 and "test/bpd_ode" in metrics
    assert not list(run.glob(".*.tmp")) and "Traceback" not in out


def test_write_metrics_uses_a_temporary_file_of_its_own(tmp_path, monkeypatch):
    seen = []
    real = Path.replace

    def spy(self, target):
        seen.append(self.name)
        return real(self, target)

    monkeypatch.setattr(Path, "replace", spy)
    write_metrics(tmp_path / "metrics.json", {"a": 1.0})
    assert seen == [f".metrics.json.{os.getpid()}.tmp"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"a": 1.0}
