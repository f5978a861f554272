"""The Throughput callback in real training runs: weights unchanged by it, its summary in metrics.json, its windows
in the CSV log, and the "train speed" row of train.py's table (CPU: no MFU)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from scoreflow.tasks.train import train
from tests.integration.resume_check import assert_same_weights

ROOT = Path(__file__).resolve().parents[2]
FAST = ["debug=fast", "trainer.accelerator=cpu"]
SHORT = ["trainer.max_steps=6", "trainer.log_every_n_steps=2", "val_every=100", "checkpoint_every=100", "test=false"]
WITH = ["+callbacks.throughput._target_=scoreflow.lit.throughput.Throughput", "+callbacks.throughput.warmup_steps=2"]


def test_the_callback_changes_no_weight_and_reports_its_summary(make_cfg, tmp_path, capsys):
    """The real pipeline with dropout on. ScoreLitModule reseeds the global RNG every step and clears gradients
    before each backward, so this run would not notice a stray draw or gradient at fit start; the unit tests
    (tests/unit/test_throughput.py) show the callback leaves none."""
    base = [*FAST, *SHORT, "callbacks=minimal", "model.net.dropout=0.1"]
    plain = train(make_cfg(base, sub="plain"))
    assert "train speed" not in capsys.readouterr().out and "train/img_per_s" not in plain  # no callback, no row
    timed = train(make_cfg([*base, *WITH], sub="timed"))
    assert "train speed" in capsys.readouterr().out
    assert_same_weights(tmp_path / "plain" / "checkpoints" / "last.ckpt",
                        tmp_path / "timed" / "checkpoints" / "last.ckpt", steps=6)

    saved = json.loads((tmp_path / "timed" / "metrics.json").read_text())
    assert saved["train/throughput_steps"] == 4 and saved["train/throughput_steady"] == 1  # steps 3-6
    for key in ("train/img_per_s", "train/tflops"):
        assert isinstance(saved[key], float) and math.isfinite(saved[key]) and saved[key] > 0
        assert timed[key] == saved[key]
    assert "train/mfu" not in saved  # no dense peak for a CPU
    with open(tmp_path / "timed" / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/img_per_s")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5] and all(float(r["train/tflops"]) > 0 for r in rows)


def test_train_py_prints_the_train_speed_row(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    run = tmp_path / "run"
    args = ["debug=fast", *SHORT, "sample_every=0", "callbacks.throughput.warmup_steps=2", f"hydra.run.dir={run}"]
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    row = next(ln for ln in out.splitlines() if ln.strip().startswith("train speed"))
    saved = json.loads((run / "metrics.json").read_text())
    assert f"{saved['train/img_per_s']:.0f} img/s (steady state, 4 steps), " in row and "TFLOP/s" in row, row
    assert "MFU" not in row  # CPU


def test_ddp_spawn_sends_the_summary_back(make_cfg, tmp_path):
    """Under ddp_spawn the main process's callback never trains: the summary comes back in callback_metrics."""
    metrics = train(make_cfg([*FAST, *SHORT, "trainer=ddp_cpu", "callbacks=minimal", *WITH]))
    assert metrics["train/img_per_s"] > 0 and metrics["train/throughput_steps"] == 4
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["train/img_per_s"] == metrics["train/img_per_s"]
