"""The console of a normal run: each line once, no known noise, the config and run folder at the start,
the results table at the end and in the run's log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOISE = ("litlogger", "LeafSpec", "ModelCheckpoint with manual optimization", "TPU available", "Testing ━",
         "weights_only", "Traceback")
# debug=fast with every phase (train, validation with the ODE, periodic checkpoint, sample grid, test) kept
# but shortened, so the default suite can afford it; the slow test below runs `debug=fast` itself.
SHORT = ["trainer.max_steps=4", "val_every=2", "checkpoint_every=2", "sample_every=4",
         "module.evaluation.nll_every=2", "datamodule.test_subset=4", "datamodule.val_subset=8"]


def run_train(tmp_path: Path, args: list[str]) -> tuple[str, Path]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=fast", *args, f"hydra.run.dir={run}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    return out, run


def body_lines(out: str) -> list[str]:
    """Console lines outside the config tree (whose YAML legitimately repeats keys such as `save_top_k: 1`),
    without their logging prefix: a message printed as "INFO: msg" and as "[date][logger][INFO] - msg" is the
    same line twice."""
    lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith(("config", "│", "├", "└", "    "))]
    return [re.sub(r"^(\[[^\]]*\]){3} - |^(INFO|WARNING|ERROR): ", "", ln) for ln in lines]


def check_console(out: str, run: Path) -> None:
    lines = body_lines(out)
    dups = {ln: n for ln, n in Counter(lines).items() if n > 1}
    assert not dups, f"duplicated lines: {dups}\n{out[-3000:]}"
    for noise in NOISE:
        assert noise not in out, f"{noise!r} on the console:\n{out[-3000:]}"
    assert out.startswith("config\n"), out[:500]  # the resolved config tree, printed first ...
    assert out.count("\nconfig\n") == 0 and out.count("├── trainer") == 1  # ... and once
    assert f"run folder: {run}" in out
    assert "== test split, EMA weights" in out and "bits/dim (ODE)" in out
    log = (run / "train.log").read_text()
    assert "== test split, EMA weights" in log and "bits/dim (bound)" in log and "├── trainer" in log
    assert (run / "plots" / "bpd_vs_step.png").stat().st_size > 1000


def test_console_of_a_short_debug_run_has_no_duplicated_line(tmp_path):
    out, run = run_train(tmp_path, SHORT)
    check_console(out, run)
    assert {p.name for p in tmp_path.iterdir()} == {"run"}


def test_a_log_file_gets_progress_lines_instead_of_bars(tmp_path):
    """Off a terminal (SLURM, ``> log``) the tqdm bars are off and a ``progress:`` line every ``log_every_s``
    seconds says how far each stage is: training (step of max_steps, rate, time left, loss) and the test phase
    (a start line, then batches), on the console and in the run's log."""
    out, run = run_train(tmp_path, [*SHORT, "callbacks.progress.log_every_s=0.001", "trainer.log_every_n_steps=1"])
    lines = re.findall(r"progress: train step (\d+)/4 \(\d+ %\), [\d.]+ steps/s, ~\S+ left(, train/loss [\d.]+)?",
                       out)
    steps = [int(step) for step, _ in lines]
    assert steps == [1, 2, 3, 4], out[-3000:]
    assert [bool(loss) for _, loss in lines] == [False, True, True, True]  # the last logged loss, once there is one
    assert re.search(r"progress: test started, 1 batch\n", out) and "progress: test batch 1/1 (100 %)" in out
    assert "it/s]" not in out and "━" not in out  # no bar redraws
    assert "progress: train step" in (run / "train.log").read_text()


@pytest.mark.slow
def test_console_of_debug_fast_has_no_duplicated_line(tmp_path):
    out, run = run_train(tmp_path, [])
    check_console(out, run)


def test_without_test_phase_the_last_validation_is_reported_and_returned(make_cfg, capsys):
    """test=false: the table is titled as validation (not an empty "test split") and train()'s value for a
    sweeper falls back to the validation metric."""
    from scoreflow.tasks.common import optimized_metric
    from scoreflow.tasks.train import train

    cfg = make_cfg(["debug=fast", "trainer.max_steps=3", "val_every=2", "test=false", "callbacks=minimal",
                    "datamodule.val_subset=8"])  # the last validation after step 2 of 3: the title says 2
    metrics = train(cfg)
    out = capsys.readouterr().out
    assert "== validation subset, last validation (step 2; test=false)" in out and "test split" not in out
    assert "bits/dim (bound)  -" not in out
    assert cfg.optimized_metric == "test/bpd_ode" and "test/bpd_ode" not in metrics
    assert optimized_metric(cfg, metrics) == metrics["val/bpd_bound"]  # no val ODE in 2 steps: the bound
    assert optimized_metric(cfg, {**metrics, "val/bpd_ode": 1.5}) == 1.5
    assert optimized_metric(cfg, {**metrics, "test/bpd_ode": 1.25, "val/bpd_ode": 1.5}) == 1.25


def test_ddp_spawn_processes_inherit_the_filter_of_lightnings_sync_dist_advice(monkeypatch):
    """strategy=ddp_spawn (trainer=ddp_cpu) runs rank 0 in a fresh interpreter, which takes warning filters from
    PYTHONWARNINGS only: Lightning's advice to sync_dist the val/test values (already gathered from every rank)
    printed 9 lines there."""
    from scoreflow.tasks.console import quiet_console

    monkeypatch.setenv("PYTHONWARNINGS", "default::DeprecationWarning")
    quiet_console()
    quiet_console()  # idempotent
    env = os.environ["PYTHONWARNINGS"].split(",")
    assert env[0] == "default::DeprecationWarning" and len(env) == 3 and len(set(env)) == 3
    code = ("import warnings; warnings.warn(\"It is recommended to use `self.log('test/nfe', ..., sync_dist=True)` "
            "when logging\"); warnings.warn(\"It is recommended to use `self.log('train/x', ..., sync_dist=True)`\")")
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True)
    assert "test/nfe" not in p.stderr and "train/x" in p.stderr, p.stderr
