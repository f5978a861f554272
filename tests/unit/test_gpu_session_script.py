"""``bench/gpu_session.sh``, the script a rare lent GPU runs, checked without a GPU: its syntax, the commands each
mode runs and in which order (with a stub in place of python that records its arguments), and ``DEADLINE``
shrinking or skipping the time boxes. A broken script would waste a whole lent GPU session."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_session.sh"


def _run(tmp_path: Path, **env: str) -> tuple[str, list[str]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "py"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    full = {**os.environ, "PY": str(stub), "OUT": str(tmp_path / "out"), **env}
    r = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout, calls.read_text().splitlines() if calls.is_file() else []


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_train_py_1_measures_speed_gpu_then_the_cudnn_autotuning_and_batch_levers_on_top(tmp_path):
    out, calls = _run(tmp_path, TRAIN_PY="1")
    train = [c for c in calls if c.startswith("train.py")]
    assert len(train) == 3 and all("experiment=cifar10_table2" in c and "speed=gpu" in c for c in train)
    base, cudnn, b256 = train
    assert "datamodule.batch_size" not in base and "benchmark" not in base
    assert "trainer.benchmark=true" in cudnn and "datamodule.batch_size=256" in b256
    assert not any(c.startswith("bench/compare_runs.py") for c in calls)  # the bf16 check is call 2's last step


def test_train_py_2_runs_its_steps_in_order_of_importance(tmp_path):
    out, calls = _run(tmp_path, TRAIN_PY="2")
    steps = [ln.split()[1] for ln in out.splitlines() if ln.startswith("=== ") and "(limit" in ln]
    assert steps == ["profile_compiled", "train_speed_gpu_dataloader", "train_speed_gpu_channels_last",
                     "train_step_bf16_cudagraphs_fused", "data_loading"]
    prof = next(c for c in calls if c.startswith("bench/profile_step.py"))
    assert all(f in prof.split() for f in ("--compile", "--fused-adam", "--ema", "bf16", "128", "ddpmpp"))
    loader = next(c for c in calls if c.startswith("train.py") and "speed=gpu" in c)
    assert "datamodule.on_device=false" in loader  # after speed=gpu on the command line: that lever alone
    assert loader.index("speed=gpu") < loader.index("datamodule.on_device=false")
    assert any("module.channels_last=true" in c for c in calls if c.startswith("train.py"))
    bare = next(c for c in calls if c.startswith("bench/train_step.py"))
    assert "--compile-mode reduce-overhead" in bare and "--amp bf16" in bare
    bf16 = [c for c in calls if c.startswith("train.py") and "speed=gpu" not in c]
    assert len(bf16) == 4 and {("seed=42" in c, "bf16-mixed" in c) for c in bf16} == {
        (True, True), (True, False), (False, True), (False, False)}
    assert any(c.startswith("bench/compare_runs.py") for c in calls)


def test_deadline_shrinks_then_skips(tmp_path):
    out, _ = _run(tmp_path / "a", TRAIN_PY="2", DEADLINE="100")
    first = next(ln for ln in out.splitlines() if ln.startswith("=== train_speed_gpu_dataloader (limit"))
    assert int(first.split("(limit ")[1].split("s)")[0]) <= 75  # 100 - 25 s of slack
    out, calls = _run(tmp_path / "b", BF16_CHECK="1", DEADLINE="60")
    assert "bf16 check skipped" in out and not [c for c in calls if c.startswith("train.py")]


def test_gpu_tests_mode_runs_pytest_on_tests_gpu(tmp_path):
    out, calls = _run(tmp_path, GPU_TESTS="1")
    assert calls == ["-m pytest -q -p no:cacheprovider -m gpu tests/gpu"]
