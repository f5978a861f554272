"""``bench/compare_runs.py``: per-run means and paired differences against the first run, from the runs' own
per-image files, and a clear message (not a traceback) when a run folder has none."""

import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "compare_runs.py"


def write_run(folder: Path, ode, bound, name="test_per_example.npz", index=None) -> Path:
    folder.mkdir(parents=True)
    ode = np.asarray(ode, dtype=np.float64)
    arrays = {"index": np.arange(len(ode)) if index is None else np.asarray(index), "bpd_ode": ode[:, None]}
    if bound is not None:
        arrays["bpd_bound"] = np.asarray(bound, dtype=np.float64)[:, None]
    np.savez(folder / name, **arrays)
    return folder


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_paired_differences_match_a_hand_computation(tmp_path):
    rng = np.random.default_rng(0)
    base_ode, base_bound = 1.7 + 0.1 * rng.standard_normal(50), 1.8 + 0.1 * rng.standard_normal(50)
    shift = 0.01 + 0.002 * rng.standard_normal(50)
    a = write_run(tmp_path / "a", base_ode, base_bound)
    b = write_run(tmp_path / "b", base_ode + shift, base_bound - shift)
    r = run(a, b)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and str(b) in lines[2]
    d, se = shift.mean(), shift.std(ddof=1) / np.sqrt(50)
    assert f"ODE {d:+.4f} ± {se:.4f}" in lines[2] and f"bound {-d:+.4f} ± {se:.4f}" in lines[2]
    assert f"{base_ode.mean():.4f} ± {base_ode.std(ddof=1) / np.sqrt(50):.4f}" in lines[1]


def test_only_shared_images_are_paired_and_a_missing_quantity_is_skipped(tmp_path):
    a = write_run(tmp_path / "a", [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    b = write_run(tmp_path / "b", [1.5, 2.5, 3.5], None, name="per_example.npz", index=[1, 2, 3])
    b_as_test = write_run(tmp_path / "c", [2.5, 3.5, 4.5], None, index=[1, 2, 3])
    r = run(a, b_as_test)
    assert r.returncode == 0, r.stderr
    assert "ODE +0.5000 ± 0.0000" in r.stdout and "n = 3" in r.stdout and "bound" not in r.stdout.splitlines()[2]
    r = run("--file", "per_example.npz", b, b)
    assert r.returncode == 0 and "ODE +0.0000" in r.stdout


def test_a_run_without_results_is_named_without_a_traceback(tmp_path):
    a = write_run(tmp_path / "a", [1.0, 2.0], [1.0, 1.0])
    r = run(a, tmp_path / "unfinished")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"no per-image results at {tmp_path / 'unfinished' / 'test_per_example.npz'}" in r.stderr
