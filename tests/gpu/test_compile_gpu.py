"""``train.py module.compile=true`` on a CUDA device with the real Inductor: one compilation, no recompilation
(``pytest -m gpu tests/gpu``). On the 2026-11-28 H200 the in-place compilation of earlier releases compiled for
the CPU shape check and then recompiled the GPU batch with dynamic shapes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_train_py_compiles_once_on_the_gpu(tmp_path):
    env = {**os.environ, "TORCH_LOGS": "recompiles", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    args = ["debug=fast", "trainer=gpu", "trainer.precision=bf16-mixed", "module.compile=true",
            "module.optim.fused=true", "trainer.max_steps=12", f"hydra.run.dir={tmp_path / 'run'}"]
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "Recompiling function" not in out, out[-4000:]
    assert "the first training step compiles the network" in (tmp_path / "run" / "train.log").read_text()
