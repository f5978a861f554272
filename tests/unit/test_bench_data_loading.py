"""``bench/data_loading.py`` runs and prints one row per data shape and path (a smoke test: it prints timings,
which tests do not judge)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_data_loading_bench_prints_its_table():
    r = subprocess.run([sys.executable, "bench/data_loading.py", "--batches", "3", "--warmup", "1", "--workers", "0"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| digits") or ln.startswith("| cifar10")]
    assert len(rows) == 6, r.stdout
    assert sum("on_device (DeviceBatches)" in ln for ln in rows) == 2
