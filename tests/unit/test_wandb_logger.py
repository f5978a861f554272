"""conf/logger/wandb.yaml's logger: Lightning's WandbLogger minus wandb's "anonymous setting" warning on every run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from scoreflow.lit.wandb_logger import WandbLogger

ROOT = Path(__file__).resolve().parents[2]
RUN = """
import sys
from scoreflow.lit.wandb_logger import WandbLogger
lg = WandbLogger(project="p", save_dir=sys.argv[1], offline=True)
lg.log_metrics({"x": 1.0}, step=0)
lg.experiment.finish()
"""


def test_the_config_selects_it_and_only_an_asked_for_anonymous_reaches_wandb(tmp_path):
    conf = yaml.safe_load((ROOT / "conf" / "logger" / "wandb.yaml").read_text())
    assert conf["wandb"]["_target_"] == "scoreflow.lit.wandb_logger.WandbLogger"
    assert LightningWandbLogger(save_dir=str(tmp_path))._wandb_init["anonymous"] is None  # the warning's cause
    assert "anonymous" not in WandbLogger(save_dir=str(tmp_path))._wandb_init
    assert WandbLogger(save_dir=str(tmp_path), anonymous=True)._wandb_init["anonymous"] == "allow"
    assert isinstance(WandbLogger(save_dir=str(tmp_path)), LightningWandbLogger)


def test_an_offline_run_prints_no_anonymous_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, "-c", RUN, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "offline-run" in p.stdout + p.stderr  # wandb did run and talk
    assert "anonymous" not in p.stdout + p.stderr
