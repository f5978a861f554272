"""Compose the real configs (conf/) the way `python train.py ...` would, inside a temporary run dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import scoreflow.tasks  # noqa: F401 - registers the typed schemas that conf/*.yaml name in their defaults

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_cfg(overrides: list[str], run_dir: Path, config_name: str = "train") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
        cfg.hydra.job.override_dirname = "test"
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        if "compile_cache_dir" in cfg and not any(o.startswith("compile_cache_dir=") for o in overrides):
            cfg.compile_cache_dir = str(run_dir.parent / "compile_cache")  # not under the repository's outputs/
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def _make(overrides: list[str], sub: str = "run", config_name: str = "train") -> DictConfig:
        return compose_cfg(overrides, tmp_path / sub, config_name)

    return _make
