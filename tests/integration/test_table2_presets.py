"""Every Table-2 preset (conf/experiment/table2/) composes with the paper's settings and trains one step.

The data are tiny fakes written in the real on-disk formats the loaders read (CIFAR-10 python pickles, the
van den Oord ImageNet 32x32 PNG folders); the network is shrunk for speed (``model.net.nf=16`` ...) while one
test builds the presets' real DDPM++ networks and counts their parameters (README "Networks"). The variational-
dequantization step (train_dequant.py +experiment=table2/dequant_<dataset>) runs one step on a checkpoint of
the one-step run.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from scoreflow.tasks.train import train
from scoreflow.tasks.train_dequant import train_dequant

TABLE2 = Path(__file__).resolve().parents[2] / "conf" / "experiment" / "table2"
PRESETS = sorted(p.stem for p in TABLE2.glob("*.yaml") if not p.stem.startswith("dequant_"))
ROWS = [p for p in PRESETS if not p.endswith("_scoreflow")]
# the paper's numbers (Song et al. 2021b, Table 2): NLL/bound uniform, NLL/bound variational, FID
SPOT_CHECKS = {
    "cifar10_vp_original": (3.16, 3.28, 3.04, 3.14, 3.98),
    "cifar10_vp_lw_is": (2.95, 3.08, 2.83, 2.94, 6.03),
    "cifar10_deep_subvp_lw_is": (2.90, 3.02, 2.81, 2.90, 5.40),
    "imagenet32_deep_vp_lw": (3.91, 3.96, 3.86, 3.92, 17.73),
    "imagenet32_deep_subvp_lw_is": (3.82, 3.90, 3.76, 3.86, 10.18),
}
TINY_NET = ["model.net.nf=16", "model.net.ch_mult=[1,2]", "model.net.num_res_blocks=1"]  # attention still at 16x16
ONE_STEP = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_steps=1",
    "datamodule.batch_size=2",
    "datamodule.eval_batch_size=2",
    "datamodule.val_subset=2",
    "datamodule.num_workers=0",
    "data.val_size=2",
    "val_every=1",
    "sample_every=0",  # the final sample grid would solve the ODE for 64 images
    "module.evaluation.val_num_t=2",
    "logger=none",
    "test=false",
    "callbacks.snapshots.every_n_train_steps=1",
]


def test_there_are_24_rows_and_two_headline_runs():
    assert len(ROWS) == 24 and {"cifar10_scoreflow", "imagenet32_scoreflow"} <= set(PRESETS)
    names = {f"{d}_{m}{s}_{w}" for d in ("cifar10", "imagenet32") for m in ("", "deep_") for s in ("vp", "subvp")
             for w in ("original", "lw", "lw_is")}
    assert set(ROWS) == names


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> dict[str, Path]:
    """CIFAR-10 pickles (5 x 4 train, 4 test) and van den Oord ImageNet32 PNGs (8 train, 4 valid), seeded."""
    root = tmp_path_factory.mktemp("table2_data")
    rng = np.random.default_rng(0)
    d = root / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)  # rows: 1024 R, 1024 G, 1024 B
        with open(d / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": [1, 2, 3, 4], b"data": x}, fh, protocol=2)
    for folder, n in (("train_32x32", 8), ("valid_32x32", 4)):
        (root / "imagenet32" / folder).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / "imagenet32" / folder / f"{i:07d}.png")
    return {"cifar10": root / "cifar10", "imagenet32": root / "imagenet32"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_has_the_papers_settings(make_cfg, name):
    cfg = make_cfg([f"experiment=table2/{name}"], sub=name)
    headline = name.endswith("_scoreflow")  # deep subVP + LW + IS
    deep, cifar, subvp = "deep" in name or headline, name.startswith("cifar10"), "subvp" in name or headline
    assert cfg.table2.name == name
    # Song et al. 2021b, App. C: steps, batch, optimizer, warm-up, clipping, EMA
    assert cfg.trainer.max_steps == (950_000 if deep else 1_300_000)
    assert cfg.datamodule.batch_size == 128
    o = cfg.module.optim
    assert (o.lr, list(o.betas), o.eps, o.warmup_steps, o.grad_clip) == (2e-4, [0.9, 0.999], 1e-8, 5000, 1.0)
    assert cfg.callbacks.ema.decay == 0.9999 and cfg.callbacks.ema.warmup is False
    snap = cfg.callbacks.snapshots  # SPEC 7: snapshots every 50k steps, all kept; pre-emption checkpoints every 10k
    assert (snap.every_n_train_steps, snap.save_top_k, cfg.checkpoint_every) == (50_000, -1, 10_000)
    assert cfg.module.loss == "dsm" and cfg.module.loss_reduce == "mean"
    # SDE and its smallest time eps (VP 1e-5, subVP 1e-2)
    assert cfg.sde._target_.endswith("SubVPSDE" if subvp else ".VPSDE")
    assert cfg.eps == (1e-2 if subvp else 1e-5)
    # network: DDPM++ (deep), dropout per dataset
    assert cfg.model.net._target_ == "scoreflow.nets.ncsnpp.NCSNpp"
    assert cfg.model.net.num_res_blocks == (8 if deep else 4) and cfg.model.net.nf == 128
    assert cfg.model.net.dropout == (0.1 if cifar else 0.0)
    # weighting
    w = {"original": "OriginalWeighting", "lw": "LikelihoodWeighting", "lw_is": "ImportanceSampledLikelihood"}
    key = "lw_is" if name.endswith(("lw_is", "scoreflow")) else "lw" if name.endswith("_lw") else "original"
    assert cfg.weighting._target_.endswith(w[key])
    # data: flips on CIFAR-10 only (the headline CIFAR-10 run has none), the original ImageNet32 release
    if cifar:
        assert cfg.data._target_.endswith("CIFAR10") and cfg.data.hflip == (name != "cifar10_scoreflow")
    else:
        assert cfg.data._target_.endswith("DownsampledImageNet") and cfg.data.hflip is False
        assert cfg.data.layout == "van_den_oord"
    # evaluation protocol: the whole test split, repeats as ScoreFlow (5 CIFAR-10, 1 ImageNet32), bound as Table 2
    e = cfg.module.evaluation
    assert cfg.datamodule.test_subset is None and cfg.test is True
    assert e.test_repeats == (5 if cifar else 1)
    assert (e.test_num_t, e.importance_sampling, e.truncation_correction) == (1000, True, True)
    assert (e.method, e.rtol, e.atol, e.divergence, e.ode_dtype) == ("dopri5", 1e-5, 1e-5, "rademacher", "float64")
    assert cfg.dequantization._target_.endswith("UniformDequantizer")
    assert cfg.table2.dequantization == ("variational_cifar10" if cifar else "variational_imagenet32")
    if name in SPOT_CHECKS:
        p = cfg.table2.paper
        assert (p.nll_uniform, p.bound_uniform, p.nll_variational, p.bound_variational, p.fid) == SPOT_CHECKS[name]
    if name in ROWS:  # the paper's first observation holds for every row's numbers
        assert cfg.table2.paper.bound_uniform >= cfg.table2.paper.nll_uniform


@pytest.mark.parametrize("sde,eps", [("vp", 1e-5), ("subvp", 1e-2)])
def test_cifar10_table2_has_the_rows_protocol_and_each_sdes_own_eps(make_cfg, sde, eps):
    """experiment=cifar10_table2: Table 2's training and evaluation protocol with the SDE from the command line (it
    kept the small default run's rk4 grid, 50-time bound and one repeat before 2026-11-28; audit)."""
    row = make_cfg([f"experiment=table2/cifar10_{sde}_lw_is"], sub=f"row_{sde}")
    cfg = make_cfg(["experiment=cifar10_table2", f"sde={sde}"], sub=f"generic_{sde}")
    for key in ("module", "datamodule", "callbacks.ema", "callbacks.samples.sampler.method", "trainer.max_steps",
                "data", "weighting", "model", "sde", "test"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(row, key), key
    assert cfg.eps is None and cfg.module.evaluation.test_repeats == 5  # None: the SDE's own (tested in test_sde)
    assert (cfg.module.evaluation.method, cfg.module.evaluation.test_num_t) == ("dopri5", 1000)
    assert row.eps == eps


@pytest.fixture(scope="module")
def one_step_runs() -> dict[str, Path]:
    return {}


def train_one_step(make_cfg, fake_data, name):
    ds = "cifar10" if name.startswith("cifar10") else "imagenet32"
    cfg = make_cfg([f"experiment=table2/{name}", f"data.root={fake_data[ds]}", *ONE_STEP, *TINY_NET], sub=name)
    return cfg, train(cfg)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_one_step_on_fake_data(make_cfg, fake_data, one_step_runs, tmp_path, name, caplog):
    ds = "cifar10" if name.startswith("cifar10") else "imagenet32"
    with caplog.at_level(logging.INFO, logger="scoreflow.data.imagenet"):
        cfg, metrics = train_one_step(make_cfg, fake_data, name)
    assert metrics["train/steps"] == 1 and np.isfinite(metrics["val/bpd_bound"])
    ckpt = tmp_path / name / "checkpoints" / "last.ckpt"
    snapshot = tmp_path / name / "checkpoints" / "snapshots" / "step_1.ckpt"  # every_n_train_steps=1 here
    assert snapshot.is_file() and torch.load(snapshot, map_location="cpu", weights_only=True)["global_step"] == 1
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["scoreflow"]["config"]
    assert stored["table2"]["name"] == name and stored["sde"] == OmegaConf.to_container(cfg.sde)
    if ds == "imagenet32":  # the loader names the release it read
        assert "van den Oord et al. 2016" in caplog.text
    one_step_runs[name] = ckpt


@pytest.mark.parametrize("ds", ["cifar10", pytest.param("imagenet32", marks=pytest.mark.slow)])  # 35.5 M flow: ~25 s
def test_dequantization_step_runs_on_a_row_checkpoint(make_cfg, fake_data, one_step_runs, tmp_path, ds):
    row = f"{ds}_vp_lw_is"
    if row not in one_step_runs:  # run alone: train the row's step here
        train_one_step(make_cfg, fake_data, row)
        one_step_runs[row] = tmp_path / row / "checkpoints" / "last.ckpt"
    flow_step = ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=1", "datamodule.batch_size=2",
                 "datamodule.eval_batch_size=2", "datamodule.val_subset=2", "datamodule.num_workers=0", "val_every=1",
                 "+module.evaluation.val_num_t=2", "logger=none", "test=false"]
    cfg = make_cfg([f"+experiment=table2/dequant_{ds}", f"score_ckpt={one_step_runs[row]}", *flow_step],
                   sub=f"deq_{ds}", config_name="train_dequant")
    assert cfg.trainer.max_steps == 1 and cfg.callbacks.ema.decay == 0.99 and cfg.module.optim.lr == 2e-4
    assert cfg.dequantization.width == (96 if ds == "cifar10" else 128)
    metrics = train_dequant(cfg)
    assert metrics["train/steps"] == 1 and np.isfinite(metrics["val/bpd_bound"])
    assert "VariationalDequantizer" in metrics["dequantization"]


@pytest.mark.parametrize("name, params", [("cifar10_vp_original", 61_804_419),
                                          ("imagenet32_deep_subvp_lw", 106_632_579)])
def test_real_networks_have_the_papers_sizes(make_cfg, name, params):
    from hydra.utils import instantiate

    cfg = make_cfg([f"experiment=table2/{name}"], sub=name)
    net = instantiate(cfg.model.net, shape=tuple(cfg.data.shape), _convert_="all")
    assert sum(p.numel() for p in net.parameters()) == params  # 61.80 M / 106.63 M (README "Networks")
