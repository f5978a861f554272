"""``bench/sample_kid.py``: samples a run's checkpoint once through ``sample.py``, scores it with the reproduction's
KID against the test split, reuses the samples on a second call, and names a run without a checkpoint."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "sample_kid.py"
OLD_CKPT = ROOT / "tests" / "data" / "release-53daf68_digits_tiny.ckpt"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.slow  # 10-110 s on 2 cores: `make test-all` runs it
def test_kid_of_a_checkpoint_then_reused(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(OLD_CKPT, ckpt)
    r = run(tmp_path / "run", "--num-samples", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sampling 20 from" in r.stdout and "KID x 1e3" in r.stdout
    z = np.load(tmp_path / "run" / "samples_kid_20" / "samples.npz")
    assert z["samples_levels"].shape[0] == 20 and z["samples_levels"].max() <= 16
    line = [ln for ln in r.stdout.splitlines() if ln.startswith(str(tmp_path / "run"))][0]
    assert float(line.split()[1]) > 0  # the tiny old-release model is far from the data
    again = run(tmp_path / "run", "--num-samples", "20")
    assert again.returncode == 0 and "sampling" not in again.stdout and line in again.stdout


def test_a_run_without_a_checkpoint_is_named(tmp_path):
    r = run(tmp_path / "nothing")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"no checkpoints/last.ckpt in {tmp_path / 'nothing'}" in r.stderr
