"""lightning-hydra-template conventions (tags, optimized_metric, hparams_search, logger=many, paths, extras)
and the results tooling (sweep_table, plots/bpd_vs_step.png)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scoreflow.tasks import sweep_table
from scoreflow.tasks.plots import bpd_plot
from tests.integration.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[2]


def logger_targets(cfg) -> list[str]:
    return sorted(c._target_.rsplit(".", 1)[-1] for c in cfg.logger.values())


def test_logger_groups_keep_the_csv_log(tmp_path):
    assert logger_targets(compose_cfg(["logger=tensorboard"], tmp_path)) == ["CSVLogger", "TensorBoardLogger"]
    assert logger_targets(compose_cfg(["logger=wandb"], tmp_path)) == ["CSVLogger", "WandbLogger"]
    many = compose_cfg(["logger=many", "tags=[a,b]"], tmp_path)
    assert logger_targets(many) == ["CSVLogger", "TensorBoardLogger", "WandbLogger"]
    assert list(many.logger.wandb.tags) == ["a", "b"]  # the run's tags reach W&B


def test_a_single_run_has_no_wandb_group(tmp_path):
    """The group is the sweep folder in a multirun (test_slurm_launcher's sweep); a single run's
    ``hydra.sweep.dir`` names a folder that does not exist, so it gets none; an explicit ``sweep_group`` stays."""
    single = compose_cfg(["logger=wandb"], tmp_path / "a")
    assert single.logger.wandb.group is None and single.sweep_group is None  # no folder that does not exist
    assert compose_cfg(["logger=wandb", "sweep_group=ablation"], tmp_path / "b").logger.wandb.group == "ablation"


def test_the_wandb_run_name_tells_runs_apart(tmp_path):
    """The W&B name is the command's overrides without ``logger=``/``hydra.*``, ``trainer.max_steps`` and
    ``ckpt_path`` included (the folder names leave them out, and a sweep over ``trainer.max_steps`` had one name for
    every job), else the run folder's name (every plain run was named ``logger=wandb``)."""
    cfg = compose_cfg(["logger=wandb", "trainer.max_steps=10", "sde=vp", "hydra.run.dir=/x"], tmp_path / "a")
    assert cfg.logger.wandb.name == "trainer.max_steps=10,sde=vp"
    plain = compose_cfg(["logger=wandb"], tmp_path / "2026-11-29_12-00-00")
    assert plain.logger.wandb.name == "2026-11-29_12-00-00"


def test_template_keys(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.optimized_metric == "test/bpd_ode" and list(cfg.tags) == ["dev"]
    assert cfg.extras.print_config is True and cfg.paths.output_dir == str(tmp_path)
    assert cfg.resume_allow_changes is False


def test_optuna_search_config_composes(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna_lr_ema"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == {"module.optim.lr", "callbacks.ema.decay"}
    assert cfg.optimized_metric == "val/bpd_bound" and cfg.test is False
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper  # noqa: F401 - installed


def fake_run(root: Path, name: str, overrides: list[str], metrics: dict | None, log: str = "") -> None:
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if log:
        (run / "train.log").write_text(log)


def test_sweep_table_groups_seeds_sorts_falls_back_and_lists_failures(tmp_path):
    t = {"train/steps": 10.0, "wall_time_s": 3.0}
    fake_run(tmp_path, "0", ["sde=vp", "seed=1"], {"test/bpd_ode": 2.0, "test/bpd_bound": 2.1, "test/nfe": 90, **t})
    fake_run(tmp_path, "1", ["sde=vp", "seed=2"], {"test/bpd_ode": 2.2, "test/bpd_bound": 2.3, "test/nfe": 110, **t})
    fake_run(tmp_path, "2", ["sde=ve", "seed=1"], {"test/bpd_ode": 1.5, "test/bpd_bound": 1.6, "test/nfe": 80, **t})
    fake_run(tmp_path, "3", ["sde=subvp", "test=false"], {"val/bpd_bound": 3.0, **t})
    fake_run(tmp_path, "4", ["module.optim.lr=1e6"], None,
             "[x][INFO] - start\n[scoreflow] train.py: run failed: 3 non-finite steps in a row\n  config key: x\n")
    assert sweep_table.main([str(tmp_path)]) == 0
    md = (tmp_path / "sweep_table.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| `")]
    assert [r.split("|")[1].strip() for r in rows] == ["`sde=ve`", "`sde=vp`", "`sde=subvp test=false`"]  # sorted
    assert "| 2 | 2.1000 ± 0.1414 | 2.2000 ± 0.1414 | 100 ± 14 |" in rows[1]  # two seeds: mean ± sd
    assert "| val | 1 | - | 3.0000 |" in rows[2]  # validation fallback, marked
    assert "1 failed or unfinished run(s)" in md and "`4`: 3 non-finite steps in a row" in md
    csv_rows = (tmp_path / "sweep_table.csv").read_text().splitlines()
    assert csv_rows[0].startswith("overrides,split,n,status,bpd_ode,bpd_ode_sd") and len(csv_rows) == 5
    assert csv_rows[-1].startswith("module.optim.lr=1e6,,1,failed")


def test_sweep_table_counts_a_non_finite_seed_and_takes_evaluate_pys_split(tmp_path):
    """A seed whose bits/dim is not finite (metrics.json writes null) was dropped from the mean while n counted it:
    "3 | 2.1000 ± 0.1414" over two seeds (results audit). An evaluate.py split=val folder was labelled as a
    training run without test metrics, and split=train showed nothing."""
    fake_run(tmp_path, "0", ["sde=vp", "seed=1"], {"test/bpd_ode": 2.0, "test/bpd_bound": 2.1})
    fake_run(tmp_path, "1", ["sde=vp", "seed=2"], {"test/bpd_ode": 2.2, "test/bpd_bound": 2.3})
    fake_run(tmp_path, "2", ["sde=vp", "seed=3"], {"test/bpd_ode": None, "test/bpd_bound": 2.2})
    fake_run(tmp_path, "3", ["split=train"], {"train/bpd_ode": 1.9, "train/bpd_bound": 2.0,
                                              "protocol": {"split": "train"}})
    assert sweep_table.main([str(tmp_path)]) == 0
    md = (tmp_path / "sweep_table.md").read_text()
    rows = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| `")}
    assert "| 3 | 2.1000 ± 0.1414 (1 of 3 non-finite) | 2.2000 ± 0.1000 |" in rows["`sde=vp`"]
    assert "| train | 1 | 1.9000 | 2.0000 |" in rows["`split=train`"]
    assert "of a training run" not in md and "not a standard error" in md


def test_sweep_table_exits_non_zero_on_a_missing_or_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "missing", tmp_path / "empty"):
        p = subprocess.run([sys.executable, "-m", "scoreflow.tasks.sweep_table", str(folder)], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 2 and str(folder) in p.stderr and not (folder / "sweep_table.md").exists()
    fake_run(tmp_path / "allfailed", "0", ["sde=vp"], None)
    assert sweep_table.main([str(tmp_path / "allfailed")]) == 1


def test_bpd_plot_from_the_csv_log(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "epoch,step,train/loss,val/bpd_bound,val/bpd_ode\n0,4,0.9,,\n0,9,0.8,3.0,3.2\n0,14,nan,,\n0,19,0.6,2.5,2.6\n"
    )
    path = bpd_plot(tmp_path, {"test/bpd_ode": 2.4, "test/bpd_bound": 2.45})
    assert Path(path) == tmp_path / "plots" / "bpd_vs_step.png" and Path(path).stat().st_size > 5000
    from scoreflow.tasks.plots import read_metrics_csv

    series = read_metrics_csv(tmp_path / "csv" / "metrics.csv")
    assert series["val/bpd_bound"] == [(9, 3.0), (19, 2.5)] and len(series["train/loss"]) == 4


@pytest.mark.parametrize("groups", [["model"], ["sde", "data"]])
def test_config_differences_name_the_keys(groups, tmp_path):
    from scoreflow.tasks.validate import config_differences

    a = OmegaConf.to_container(compose_cfg([], tmp_path / "a"), resolve=False)
    b = OmegaConf.to_container(compose_cfg(["model=mlp", "sde=ve", "data=toy2d"], tmp_path / "b"), resolve=False)
    diff = config_differences(a, b, groups=groups)
    assert len(diff) == len(groups) and all(d.split(".")[0] in groups and "_target_" in d for d in diff)


def test_settings_that_do_not_change_the_results_name_no_folder_in_either_command():
    """``evaluate.py`` and ``sample.py`` name their run folder after the overrides minus those that do not change
    what is computed. ``data_root=`` (where the data are now) was left out by sample.py only: an evaluation whose
    data had moved started over in a new folder, though its fingerprint deliberately ignores the data's root."""
    def excluded(name):
        cfg = OmegaConf.load(ROOT / "conf" / f"{name}.yaml")
        return cfg, set(cfg.hydra.job.config.override_dirname.exclude_keys)

    ev_cfg, ev = excluded("evaluate")
    _, sa = excluded("sample")
    shared = {k for k in sa if OmegaConf.select(ev_cfg, k, default="<absent>", throw_on_resolution_failure=False)
              != "<absent>"}
    assert "data_root" in shared and shared <= ev, sorted(shared - ev)
