"""The bench scripts refuse arguments they cannot use with a one-line argparse error (exit 2), before any heavy work:
``sample_kid.py`` too few samples for KID's blocks, ``table2_throughput.py`` fewer than 2 timed steps,
``likelihood_speed.py`` a malformed ``--ours`` setting or ``--ref-tols``."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, f"bench/{script}", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def assert_refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.splitlines()) <= 10, r.stderr  # argparse's usage and one error line
    error = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert len(error) == 1, r.stderr
    for needle in needles:
        assert needle in error[0], error[0]


def test_sample_kid_refuses_fewer_samples_than_its_blocks_need(tmp_path):
    # a run folder without a checkpoint: the argument check comes first, before any run folder is read
    r = run_bench("sample_kid.py", tmp_path / "run", "--num-samples", 16)
    assert_refused(r, "--num-samples must be at least 20 (got 16)", "10 disjoint blocks", "2 samples per block")
    assert "no checkpoints/last.ckpt" not in r.stderr


def test_table2_throughput_refuses_fewer_than_two_timed_steps():
    # before: CIFAR pickles written, a CPU training run, then ZeroDivisionError in StepTimer
    r = run_bench("table2_throughput.py", "--steps", 1, "--warmup", 0)
    assert_refused(r, "--steps must be at least 2 (got 1)", "between the ends of the first and the last timed step")


@pytest.mark.parametrize("args, needle", [
    (["--ours", "rk4:10"], "--ours: malformed setting 'rk4:10': expected METHOD@TOL"),
    (["--ours", "dopri5@1e-5,rk4#"], "--ours: malformed setting 'rk4#'"),
    (["--ref-tols", "1e-5;1e-4"], "--ref-tols: malformed tolerances '1e-5;1e-4'"),
])
def test_likelihood_speed_refuses_a_malformed_setting_first(tmp_path, args, needle):
    # a checkpoint that does not exist: loading it (a traceback) would come before the settings were read
    r = run_bench("likelihood_speed.py", "--ckpt", tmp_path / "missing.ckpt", *args)
    assert_refused(r, needle, "e.g.")


def load_likelihood_speed():
    spec = importlib.util.spec_from_file_location("likelihood_speed", ROOT / "bench" / "likelihood_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_parse_ours_accepts_every_syntax_and_names_it_when_refusing():
    bench = load_likelihood_speed()
    assert bench.parse_ours("rk4#40^2.5") == {"method": "rk4", "steps": 40, "grid_rho": 2.5}
    assert bench.parse_ours("rk4#50>0.1:19") == {"method": "rk4", "two_piece": (50, 0.1, 19)}
    assert bench.parse_tols("1e-5,1e-4") == [1e-5, 1e-4]
    for bad, needle in [("rk4:10", "expected METHOD@TOL"), ("rk4#40#2", "expected METHOD@TOL"),
                        ("dopri5@", "expected METHOD@TOL"), ("rk5#40", "unknown method 'rk5'"),
                        ("dopri5#40", "'dopri5' is adaptive"), ("rk4@1e-5", "'rk4' is a fixed-grid method"),
                        ("rk4#0", "at least 1"), ("dopri5@-1e-5", "positive")]:
        with pytest.raises(ValueError) as e:
            bench.parse_ours(bad)
        assert needle in str(e.value), (bad, str(e.value))
    with pytest.raises(ValueError, match="positive"):
        bench.parse_tols("1e-5,0")
