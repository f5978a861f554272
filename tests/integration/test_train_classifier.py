"""The time-dependent classifier task end to end through the real Hydra configs (CPU, tiny settings)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from scoreflow.dequantization import to_model_space
from scoreflow.lit.module import ScoreLitModule
from scoreflow.nets.classifier import NoiseConditionalClassifier
from scoreflow.oracles import GaussianMixture
from scoreflow.sampling import classifier_guided_score, pc_sample
from scoreflow.sde import VESDE
from scoreflow.tasks.build import ConfigError, build_data, build_datamodule
from scoreflow.tasks.train_classifier import (
    build_classifier_module,
    classifier_module_from_checkpoint,
    load_classifier,
    train_classifier,
)
from tests.integration.resume_check import resumed_and_uninterrupted

CFG = "train_classifier"
DEBUG = [
    "trainer.accelerator=cpu",
    "trainer.max_steps=6",
    "val_every=6",
    "checkpoint_every=3",
    "datamodule.batch_size=32",
    "+trainer.enable_progress_bar=false",
]


def test_debug_run_writes_checkpoint_that_reproduces_validation(make_cfg, tmp_path):
    metrics = train_classifier(make_cfg(DEBUG, config_name=CFG))
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    keys = ["val/loss", "val/acc", "test/loss", "test/acc"] + [
        f"{s}/{m}_t{t}" for s in ("val", "test") for m in ("acc", "loss") for t in ("0.01", "0.1", "0.5", "0.9")
    ]
    for key in keys:
        assert key in saved and saved[key] == pytest.approx(metrics[key])
    assert saved["train/steps"] == 6
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    state = ckpt["scoreflow"]
    assert state["kind"] == "classifier" and state["batches_seen"] == 6 and "ema" in ckpt
    assert state["config"]["sde"]["_target_"] == "scoreflow.sde.SubVPSDE" and state["config"]["num_classes"] == 10
    assert state["config"]["module"]["scale"] == 2.0 and state["config"]["module"]["shift"] == -1.0

    # the checkpoint alone (config + EMA weights) reproduces the last validation, computed in-process with EMA
    module, cfg, _ = classifier_module_from_checkpoint(ckpt_path)
    dm = build_datamodule(cfg, build_data(cfg))
    res = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(module, dm, verbose=False)[0]
    for key in ("val/loss", "val/acc_t0.1", "val/loss_t0.5"):
        assert res[key] == pytest.approx(saved[key], rel=1e-5, abs=1e-6)

    # load_classifier: the same network, frozen, with its SDE; raw weights differ from EMA ones
    clf = load_classifier(ckpt_path)
    assert isinstance(clf, NoiseConditionalClassifier) and not clf.training
    assert clf.sde.beta_min == 0.1 and not any(p.requires_grad for p in clf.parameters())
    x, t = torch.randn(5, 1, 8, 8), torch.linspace(0.01, 1.0, 5)
    with torch.no_grad():
        torch.testing.assert_close(clf(x, t), module.classifier(x, t), rtol=0, atol=0)
        assert not torch.allclose(load_classifier(ckpt_path, use_ema=False)(x, t), clf(x, t))
    for name, value in ckpt["ema"]["shadow"].items():
        torch.testing.assert_close(clf.state_dict()[name.removeprefix("classifier.")], value, rtol=0, atol=0)

    # guarding against guiding a score model of another SDE or data scaling
    load_classifier(ckpt_path, sde=clf.sde.__class__(0.1, 20.0), scale=2.0, shift=-1.0)
    with pytest.raises(ConfigError, match="VPSDE.*VESDE"):
        load_classifier(ckpt_path, sde=VESDE())
    with pytest.raises(ConfigError, match="VPSDE.*beta_max=10"):
        load_classifier(ckpt_path, sde=clf.sde.__class__(0.1, 10.0))
    with pytest.raises(ConfigError, match="scale=2.0.*scale=1.0"):
        load_classifier(ckpt_path, scale=1.0)
    load_classifier(ckpt_path, data_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"trained on data of shape \[1, 8, 8\].*have shape \[1, 28, 28\]"):
        load_classifier(ckpt_path, data_shape=(1, 28, 28))  # MNIST's score model guided by the digits' classifier


def test_score_checkpoint_is_refused(tmp_path):
    path = tmp_path / "score.ckpt"
    torch.save({"state_dict": {}, "scoreflow": {"config": {}, "batches_seen": 0}}, path)
    with pytest.raises(ValueError, match="not a classifier checkpoint"):
        load_classifier(path)


@pytest.mark.parametrize("sde", ["subvp", "ve"])
def test_other_sdes_train(make_cfg, sde):
    cfg = make_cfg(
        [*DEBUG, f"sde={sde}", "trainer.max_steps=2", "val_every=2", "test=false", "callbacks=none"], config_name=CFG
    )
    metrics = train_classifier(cfg)
    assert metrics["train/steps"] == 2 and 0 <= metrics["val/acc_t0.5"] <= 1
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


@pytest.mark.parametrize(("extra", "weights"), [(["use_ema=false"], "test split (raw weights)"),
                                               (["callbacks=none"], "test split (raw weights)"),
                                               (["test=false"], "val split (EMA weights)")])
def test_the_table_names_the_weights_it_evaluated(make_cfg, capsys, extra, weights):
    """The table said "EMA" for the test split and "raw" for validation whatever they were: ``use_ema=false`` tested
    raw weights under an "EMA" title, and validation runs on the EMA callback's weights (they are swapped in)."""
    metrics = train_classifier(make_cfg([*DEBUG, "trainer.max_steps=2", "val_every=2", *extra], config_name=CFG))
    assert metrics["train/steps"] == 2 and weights in capsys.readouterr().out


def test_a_classifier_for_a_levels_score_model_trains_on_levels_and_says_so(make_cfg, tmp_path):
    """``module.train_input=levels``: the classifier sees k / (K - 1) + noise, as a score model trained on levels
    does (ScoreFlow's input, the Table-2 presets); its checkpoint says so and load_classifier refuses the other."""
    cfg = make_cfg([*DEBUG, "trainer.max_steps=2", "val_every=2", "test=false", "module.train_input=levels"],
                   config_name=CFG)
    metrics = train_classifier(cfg)
    assert metrics["train/steps"] == 2
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module, _, _ = classifier_module_from_checkpoint(path)
    k = torch.randint(0, module.num_levels, (4, 1, 8, 8))
    t = torch.full((4,), 0.5)
    x_t, _ = module.noised(k, t, torch.Generator().manual_seed(0))
    z = torch.randn(k.shape, generator=torch.Generator().manual_seed(0))  # the generator's first draw is the noise
    alpha, sigma = module.sde.marginal(t)
    x0 = 2.0 * k.float() / (module.num_levels - 1) - 1.0
    torch.testing.assert_close(x_t, alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * z)
    load_classifier(path, train_input="levels")
    with pytest.raises(ConfigError, match="module.train_input=levels inputs, but the score model on dequantized"):
        load_classifier(path, train_input="dequantized")


def test_resume_is_exact(make_cfg, tmp_path):
    """Interrupted at step 4 and resumed to 8 equals an uninterrupted run (data order, noise, dropout, EMA)."""
    base = [*DEBUG, "test=false", "checkpoint_every=4", "val_every=100", "classifier.net.dropout=0.1"]
    resumed_and_uninterrupted(make_cfg, tmp_path, base, task=train_classifier, config_name=CFG)


def test_data_space_equals_score_module(make_cfg):
    """The classifier sees exactly the score model's x_0: same dequantization draw, same scaling."""
    cfg = make_cfg(DEBUG, config_name=CFG)
    module = build_classifier_module(cfg, build_data(cfg))
    k = torch.randint(0, 17, (4, 1, 8, 8), dtype=torch.uint8)
    ours = to_model_space(k, module.dequantizer, 17, module.scale, module.shift, torch.Generator().manual_seed(3))[0]
    ref = ScoreLitModule.to_model_space(module, k, torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_wrn28_10_preset_composes_for_cifar10(make_cfg):
    cfg = make_cfg(["classifier=wrn28_10", "sde=ve", "data=cifar10", "num_classes=10"], config_name=CFG)
    with torch.device("meta"):
        module = build_classifier_module(cfg)  # no data needed once num_classes is given
    assert sum(p.numel() for p in module.classifier.parameters()) == 39_171_674
    assert module.classifier.time_label == "log_sigma" and isinstance(module.sde, VESDE)


def test_fewer_classes_than_the_data_have_are_refused(make_cfg):
    """Was: IndexError 'Target 5 is out of bounds' inside the cross-entropy, at the first batch with label 5."""
    cfg = make_cfg([*DEBUG, "num_classes=5"], config_name=CFG)
    with pytest.raises(ConfigError, match=r"num_classes=5, but data=Digits has 10 classes \(labels 0 \.\. 9\)"):
        build_classifier_module(cfg, build_data(cfg))


def test_unlabelled_or_learned_dequantization_is_refused(make_cfg):
    toy = ["data=toy2d", "dequantization=none", "data.name=checkerboard", "data.n=100"]
    cfg = make_cfg([*DEBUG, *toy], config_name=CFG)
    with pytest.raises(ConfigError, match="no class labels"):
        build_classifier_module(cfg, build_data(cfg))
    cfg = make_cfg([*DEBUG, "dequantization=none"], config_name=CFG)
    with pytest.raises(ConfigError, match="dequantization=none cannot"):
        build_classifier_module(cfg, build_data(cfg))


# ----------------------------------------------------------------------------- a trained digits classifier
def _compose_cfg(overrides, run_dir, config_name):
    """conftest.compose_cfg, loaded by path: ``tests`` is not a package, so it cannot be imported by name."""
    spec = importlib.util.spec_from_file_location("_integration_conftest", Path(__file__).with_name("conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    return conftest.compose_cfg(overrides, run_dir, config_name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("clf") / "run"
    cfg = _compose_cfg(
        [
            "trainer.accelerator=cpu",
            "trainer.max_steps=150",
            "val_every=150",
            "checkpoint_every=1000",
            "+trainer.enable_progress_bar=false",
            "logger=none",
        ],
        run,
        CFG,
    )
    metrics = train_classifier(cfg)
    return metrics, run / "checkpoints" / "last.ckpt", cfg


def test_short_run_is_far_above_chance_at_small_t(trained):
    metrics, _, _ = trained
    # 150 steps (~10 s): 0.965 / 0.942 at t = 0.01 / 0.1 on the 400 test digits in a reference run; chance is 0.1.
    assert metrics["test/acc_t0.01"] > 0.75 and metrics["test/acc_t0.1"] > 0.7
    # at t = 0.9 (alpha_t = 0.017) the data are gone: accuracy near chance, cross-entropy near log 10
    assert metrics["test/acc_t0.9"] < 0.25 and metrics["test/loss_t0.9"] > 2.0
    assert metrics["test/acc_t0.01"] > metrics["test/acc_t0.5"] > metrics["test/acc_t0.9"] - 0.05


def test_a_float64_sampler_can_be_guided_and_labels_must_fit_the_batch(trained):
    """The classifier runs in its own dtype (a float64 sampler's x is cast; was: 'expected scalar type Double'), the
    gradient equals float32 guidance's to float32 precision, and [B] labels of another length are named."""
    _, ckpt, _ = trained
    clf = load_classifier(ckpt)
    assert clf.train_eps == pytest.approx(clf.sde.default_eps)  # the training's smallest time, for sample.py's check
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 0.3)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731 - the guidance term alone
    g64 = classifier_guided_score(zero, clf, 3)(x.double(), t.double())
    g32 = classifier_guided_score(zero, clf, 3)(x, t)
    assert g64.dtype == torch.float64 and clf(x.double(), t.double()).dtype == torch.float64
    torch.testing.assert_close(g64.float(), g32, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="2 labels for a batch of 3"):
        classifier_guided_score(zero, clf, torch.tensor([1, 2]))(x, t)


def test_guided_pc_sampling_with_trained_classifier(trained):
    """PC sampling of a class-wise Gaussian fit of the digits with classifier guidance lands in the asked class."""
    _, ckpt, cfg = trained
    clf = load_classifier(ckpt)
    sde = clf.sde
    splits = build_data(cfg).load()
    k = torch.stack([splits["train"][i][0] for i in range(len(splits["train"]))])
    y = torch.tensor([splits["train"][i][1] for i in range(len(splits["train"]))])
    x0 = 2.0 * (k.double() + 0.5) / 17 - 1.0  # the model space, mid-bin
    means = torch.stack([x0[y == c].flatten(1).mean(0) for c in range(10)])
    var = torch.stack([x0[y == c].flatten(1).var(0) for c in range(10)]) + 0.01
    data = GaussianMixture(torch.bincount(y).double(), means, var, event_shape=(1, 8, 8))  # exact score at every t
    target = 3

    def sample(guidance: float):
        score = data.score_fn(sde)
        if guidance:
            score = classifier_guided_score(score, clf, target, scale=guidance)
        res = pc_sample(score, sde, (32, 1, 8, 8), steps=40, snr=0.16, seeds=list(range(32)), dtype=torch.float32)
        assert res.samples.shape == (32, 1, 8, 8) and torch.isfinite(res.samples).all()
        x = res.samples.double().flatten(1)[:, None]  # the most likely class-wise Gaussian of each sample
        nearest = (-0.5 * ((x - means) ** 2 / var + var.log()).sum(-1)).argmax(dim=1)
        return (nearest == target).float().mean().item()

    unguided, guided = sample(0.0), sample(2.0)  # reference run: 0.19 and 0.91
    assert unguided < 0.3 and guided > 0.6, (unguided, guided)
