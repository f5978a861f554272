"""``sample.py`` end to end on a tiny digits checkpoint: every sampler kind, per-sample seeds through the task,
PNG folders, latent round trips, inpainting, colorization, class guidance, a CIFAR-shaped model, errors."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scoreflow.tasks.build import ConfigError
from scoreflow.tasks.evaluate import evaluate
from scoreflow.tasks.sample import sample
from scoreflow.tasks.train import train
from tests.integration.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
BASE = ["progress=false", "device=cpu"]
PC = ["sampler=pc", "sampler.steps=5"]




TRAIN_FAST = ["debug=fast", "sde=vp", "trainer.accelerator=cpu", "test=false", "trainer.max_steps=4", "val_every=4",
              "callbacks=minimal", "+trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("digits_run")
    train(compose_cfg(TRAIN_FAST, run))
    return run / "checkpoints" / "last.ckpt"


def run(make_cfg, ckpt, overrides, sub="s"):
    return sample(make_cfg([f"ckpt_path={ckpt}", *BASE, *overrides], sub=sub, config_name="sample"))


@pytest.mark.parametrize(
    "sampler, nfe",
    [
        ([*PC], 5 * 2 + 1),  # reverse diffusion + Langevin, then Tweedie denoising
        ([*PC, "sampler.predictor=euler_maruyama", "sampler.corrector=none"], 5 + 1),
        ([*PC, "sampler.predictor=ancestral", "sampler.corrector=ald"], 5 * 2 + 1),
        ([*PC, "sampler.predictor=probability_flow", "sampler.corrector=none"], 5 + 1),
        ([*PC, "sampler.predictor=none", "sampler.corrector=langevin", "sampler.n_steps=2"], 5 * 2 + 1),
        (["sampler=ode", "sampler.method=euler", "sampler.steps=5"], 5 + 1),
        (["sampler=ode", "sampler.method=heun", "sampler.steps=5"], 10 + 1),
        (["sampler=ode", "sampler.method=rk4", "sampler.steps=5"], 20 + 1),
        (["sampler=ode", "sampler.rtol=1e-2", "sampler.atol=1e-2"], None),  # dopri5
    ],
    ids=["rd+langevin", "em", "ancestral+ald", "pflow", "corrector-only", "euler", "heun", "rk4", "dopri5"],
)
def test_every_sampler_writes_grid_and_arrays(digits_ckpt, make_cfg, tmp_path, sampler, nfe):
    m = run(make_cfg, digits_ckpt, [*sampler, "num_samples=6", "batch_size=4"])
    out = tmp_path / "s"
    z = np.load(out / "samples.npz")
    assert z["samples"].shape == (6, 1, 8, 8) and z["samples"].dtype == np.float32
    assert z["samples_levels"].shape == (6, 1, 8, 8) and z["samples_levels"].dtype == np.uint8
    assert z["samples_levels"].max() <= 16 and np.isfinite(z["samples"]).all()
    np.testing.assert_array_equal(z["seeds"], np.arange(6))
    assert Image.open(out / "samples.png").size[0] > 8
    if nfe is not None:
        assert m["sample/nfe"] == nfe
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["sample/num_samples"] == 6 and Path(saved["outputs"]["grid"]).is_file()


@pytest.mark.parametrize("sampler", [PC, ["sampler=ode", "sampler.method=rk4", "sampler.steps=4"]], ids=["pc", "rk4"])
def test_an_image_depends_on_its_seed_only(digits_ckpt, make_cfg, tmp_path, sampler):
    run(make_cfg, digits_ckpt, [*sampler, "num_samples=6", "batch_size=6", "seed=0"], sub="a")
    run(make_cfg, digits_ckpt, [*sampler, "num_samples=4", "batch_size=3", "seed=2"], sub="b")
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    np.testing.assert_array_equal(b["seeds"], a["seeds"][2:])
    np.testing.assert_allclose(b["samples"], a["samples"][2:], rtol=1e-5, atol=1e-5)  # other batch sizes
    assert not np.allclose(a["samples"][0], a["samples"][1])


def test_save_pngs_for_external_fid_tools(digits_ckpt, make_cfg, tmp_path, capsys):
    run(make_cfg, digits_ckpt, [*PC, "num_samples=5", "save_pngs=true"])
    out = tmp_path / "s"
    files = sorted((out / "pngs").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    levels = np.load(out / "samples.npz")["samples_levels"]
    img = np.asarray(Image.open(files[3]))
    assert img.shape == (8, 8) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, np.round(levels[3, 0].astype(np.float64) * 255 / 16).astype(np.uint8))
    table = capsys.readouterr().out
    assert "nfe" in table and "output (pngs)" in table and "time" in table


def test_latent_round_trip_and_interpolation(digits_ckpt, make_cfg, tmp_path):
    m = run(make_cfg, digits_ckpt, ["mode=latent", "num_images=3", "latent.method=rk4", "latent.steps=20",
                                    "latent.interp_steps=5"])
    out = tmp_path / "s"
    z = np.load(out / "latent.npz")
    assert z["z"].shape == z["x"].shape == z["x_rec"].shape == (3, 1, 8, 8)
    assert z["interpolation"].shape == (5, 1, 8, 8)
    err = np.abs(z["x_rec"] - z["x"]).reshape(3, -1).max(1)
    np.testing.assert_allclose(err, z["max_abs_error"], rtol=1e-4, atol=1e-6)
    assert m["latent/roundtrip_max_abs_error"] == pytest.approx(err.max(), rel=1e-4) and err.max() < 1e-2
    assert m["latent/nfe_encode"] == m["latent/nfe_decode"] == 80
    np.testing.assert_allclose(z["interpolation"][0], z["x_rec"][0], atol=1e-5)  # the ends decode to the images
    assert (out / "latent_roundtrip.png").is_file() and (out / "interpolation.png").is_file()


@pytest.mark.parametrize("mask", ["center", "half", "random", "png"])
def test_inpainting_keeps_known_pixels(digits_ckpt, make_cfg, tmp_path, mask):
    if mask == "png":
        pix = np.zeros((8, 8), np.uint8)
        pix[:, :3] = 255
        Image.fromarray(pix).save(tmp_path / "mask.png")
        mask = str(tmp_path / "mask.png")
    m = run(make_cfg, digits_ckpt, [*PC, "mode=inpaint", f"mask={mask}", "num_images=4"])
    out = tmp_path / "s"
    z, known = np.load(out / "inpaint.npz"), np.load(out / "inpaint_mask.npy").astype(bool)[0, 0]
    assert z["result"].shape == z["input"].shape == (4, 1, 8, 8) and 0 < known.mean() < 1
    np.testing.assert_allclose(z["result"][..., known], z["input"][..., known], atol=1e-6)
    np.testing.assert_array_equal(z["result_levels"][..., known], z["input_levels"][..., known])
    assert not np.allclose(z["result"][..., ~known], z["input"][..., ~known])
    assert m["inpaint/known_pixel_max_error"] < 1e-6 and (out / "inpaint.png").is_file()
    assert 0 < m["inpaint/known_pixel_sampler_error"] < 0.1  # the sampler's own last state, before the put-back


def test_image_indices_pick_the_images(digits_ckpt, make_cfg, tmp_path):
    from scoreflow.data import Digits

    run(make_cfg, digits_ckpt, [*PC, "mode=inpaint", "image_indices=[5,0,17]"])
    z = np.load(tmp_path / "s" / "inpaint.npz")
    test = Digits().load()["test"]
    want = np.stack([test[i][0].numpy() for i in (5, 0, 17)])
    np.testing.assert_array_equal(z["input_levels"], want)
    with pytest.raises(ConfigError, match=r"image_indices \[400\] out of range: the test split has 400 images"):
        run(make_cfg, digits_ckpt, [*PC, "mode=inpaint", "image_indices=[1,400]"], sub="bad")


def test_modes_refuse_what_they_cannot_do(digits_ckpt, make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="needs RGB data"):
        run(make_cfg, digits_ckpt, [*PC, "mode=colorize"])
    with pytest.raises(ConfigError, match="use sampler=pc"):
        run(make_cfg, digits_ckpt, ["sampler=ode", "mode=inpaint"])
    with pytest.raises(ConfigError, match="mask must be"):
        run(make_cfg, digits_ckpt, [*PC, "mode=inpaint", "mask=diagonal"])
    with pytest.raises(ConfigError, match="classifier_ckpt"):
        run(make_cfg, digits_ckpt, [*PC, "mode=conditional"])
    with pytest.raises(ConfigError, match="mode must be one of"):
        run(make_cfg, digits_ckpt, ["mode=dream"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        run(make_cfg, tmp_path / "nope.ckpt", PC)
    with pytest.raises(FileNotFoundError, match="classifier checkpoint not found"):
        run(make_cfg, digits_ckpt, [*PC, "mode=conditional", f"classifier_ckpt={tmp_path / 'nope.ckpt'}"])


class Brightness(torch.nn.Module):
    """An analytic two-class 'classifier': class 0 = bright images, class 1 = dark ones, at every time."""

    num_classes = 2

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = x.reshape(x.shape[0], -1).mean(1)
        return torch.stack([20 * m, -20 * m], dim=1)


def test_class_guidance_with_an_analytic_classifier(digits_ckpt, make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr("scoreflow.tasks.checkpoint.load_classifier", lambda path, **checks: Brightness())
    (tmp_path / "clf.ckpt").write_bytes(b"")
    m = run(make_cfg, digits_ckpt, [*PC, "mode=conditional", f"classifier_ckpt={tmp_path / 'clf.ckpt'}",
                                    "guidance_scale=20", "num_samples=8", "batch_size=3"])
    z = np.load(tmp_path / "s" / "conditional.npz")
    np.testing.assert_array_equal(z["labels"], [0, 1] * 4)
    bright, dark = z["samples"][z["labels"] == 0].mean(), z["samples"][z["labels"] == 1].mean()
    assert bright > dark + 0.1 and m["conditional/guidance_scale"] == 20


def test_class_guidance_with_a_trained_classifier(digits_ckpt, make_cfg, tmp_path, caplog):
    from scoreflow.tasks.train_classifier import train_classifier

    train_classifier(make_cfg(["sde=vp", "trainer.accelerator=cpu", "trainer.max_steps=2", "val_every=2", "test=false",
                               "datamodule.batch_size=16", "+trainer.enable_progress_bar=false"],
                              sub="clf", config_name="train_classifier"))
    clf = tmp_path / "clf" / "checkpoints" / "last.ckpt"
    m = run(make_cfg, digits_ckpt, [*PC, "mode=conditional", f"classifier_ckpt={clf}", "num_samples=4", "labels=7"])
    z = np.load(tmp_path / "s" / "conditional.npz")
    assert z["samples"].shape == (4, 1, 8, 8) and (z["labels"] == 7).all() and np.isfinite(z["samples"]).all()
    assert m["conditional/nfe"] == 11
    assert "the classifier was trained on t >=" not in caplog.text

    # a classifier trained on t >= 0.5 only: its gradients below that are extrapolated, which the log says
    train_classifier(make_cfg(["sde=vp", "trainer.accelerator=cpu", "trainer.max_steps=1", "val_every=1", "test=false",
                               "datamodule.batch_size=16", "+trainer.enable_progress_bar=false", "eps=0.5",
                               "module.eval_times=[0.5]"], sub="clf_late", config_name="train_classifier"))
    late = tmp_path / "clf_late" / "checkpoints" / "last.ckpt"
    with caplog.at_level(logging.WARNING, logger="scoreflow.tasks.sample"):
        run(make_cfg, digits_ckpt, [*PC, "mode=conditional", f"classifier_ckpt={late}", "num_samples=2"])
    assert "the classifier was trained on t >= 0.5; the sampler goes down to t = 0.001" in caplog.text


def write_fake_cifar(root: Path, per_batch: int = 8) -> Path:
    """A tiny CIFAR-10 in the real python-pickle layout (random images, cycling labels)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [i % 10 for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def test_cifar_shaped_model_evaluates_and_samples(make_cfg, tmp_path):
    root = write_fake_cifar(tmp_path / "cifar")
    train(make_cfg([*TRAIN_FAST, "trainer.max_steps=2", "val_every=2", "data=cifar10", f"data.root={root}",
                    "data.val_size=4", "model=unet_small", "model.net.ch=16", "datamodule.batch_size=8",
                    "datamodule.val_subset=4"], sub="cifar_run"))
    ckpt = tmp_path / "cifar_run" / "checkpoints" / "last.ckpt"
    m = evaluate(make_cfg([f"ckpt_path={ckpt}", *BASE, "evaluation.method=rk4", "evaluation.steps=1",
                           "evaluation.test_num_t=4", "num_images=3"], sub="cifar_eval", config_name="evaluate"))
    assert np.isfinite(m["test/bpd_ode"]) and np.isfinite(m["test/bpd_bound"])
    run(make_cfg, ckpt, ["sampler=pc", "sampler.steps=3", "num_samples=3", "save_pngs=true"], sub="cifar_s")
    z = np.load(tmp_path / "cifar_s" / "samples.npz")
    assert z["samples"].shape == (3, 3, 32, 32) and z["samples_levels"].dtype == np.uint8
    assert np.asarray(Image.open(tmp_path / "cifar_s" / "pngs" / "000002.png")).shape == (32, 32, 3)
    m = run(make_cfg, ckpt, ["sampler=pc", "sampler.steps=3", "mode=colorize", "num_images=2"], sub="cifar_c")
    c = np.load(tmp_path / "cifar_c" / "colorize.npz")
    assert c["result"].shape == (2, 3, 32, 32)
    # the result keeps the grey level of the input (up to float round-off)
    np.testing.assert_allclose(c["result"].mean(1), c["input"].mean(1), atol=1e-5)
    assert m["colorize/gray_max_error"] < 1e-5
    assert 0 < m["colorize/gray_sampler_error"] < 0.1


@pytest.mark.slow
def test_command_line(digits_ckpt, tmp_path):
    """The real ``python sample.py``: Hydra composes conf/sample.yaml and names the run folder after the checkpoint."""
    cmd = [sys.executable, str(ROOT / "sample.py"), f"ckpt_path={digits_ckpt}", "sampler.steps=4", "num_samples=4",
           "progress=false"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (npz,) = (tmp_path / "outputs" / "sample").rglob("samples.npz")
    assert npz.parent.name == "num_samples=4,sampler.steps=4" and "nfe" in res.stdout
    assert np.load(npz)["samples"].shape == (4, 1, 8, 8)
    log = (npz.parent / "sample.log").read_text()  # the results table is in the run's log too (it was printed only)
    assert "== sample ==" in log and "outputs in" in log


def test_a_checkpoint_is_read_once_to_rebuild_its_model(digits_ckpt, make_cfg, monkeypatch):
    """load_model read the whole file, dropped it, and module_from_checkpoint read it again (review)."""
    from scoreflow.tasks.checkpoint import load_model

    reads, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append((str(f), k.get("mmap"))) or real(f, *a, **k))
    lm = load_model(make_cfg([f"ckpt_path={digits_ckpt}"], config_name="sample"), device=torch.device("cpu"))
    assert lm.module is not None
    assert [r for r in reads if r[0] == str(digits_ckpt) and not r[1]] == [(str(digits_ckpt), None)]
