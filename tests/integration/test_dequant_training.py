"""Variational dequantization in training and evaluation (Song et al. 2021b, Sec. 5.2, Eq. 13), through the real
Hydra configs: joint training, training after a frozen score model, checkpoints that carry the flow, and a flow that
*is* uniform dequantization reproducing the uniform numbers through the same evaluation path."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from scoreflow.dequantization import UniformDequantizer, VariationalDequantizer, importance_weighted_nll
from scoreflow.lit.dequant_module import DequantLitModule, importance_weighted_bpd
from scoreflow.lit.module import ScoreLitModule
from scoreflow.tasks.build import ConfigError, build_module
from scoreflow.tasks.common import module_from_checkpoint
from scoreflow.tasks.evaluate import evaluate
from scoreflow.tasks.train import test_checkpoint as evaluate_checkpoint
from scoreflow.tasks.train import train
from scoreflow.tasks.train_dequant import train_dequant

FAST = ["debug=fast", "trainer.accelerator=cpu"]
QUIET = ["callbacks=minimal", "logger=none"]
EVAL = ["evaluation.method=rk4", "evaluation.steps=1", "evaluation.test_num_t=8", "num_images=16", "progress=false",
        "device=cpu"]


@pytest.fixture(scope="module")
def score_ckpt(tmp_path_factory):
    """A tiny digits score model (uniform dequantization), 2 steps: enough to have EMA weights to freeze.

    Its evaluation uses a fixed-step ODE solver (one RK4 step): an adaptive solver at the debug tolerance turns
    input differences of 1e-7 into NLL differences of nats (its step choices change), which would hide whether
    two dequantizers feed the likelihood the same ``y``."""
    spec = importlib.util.spec_from_file_location("_integration_conftest", Path(__file__).with_name("conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)  # its compose_cfg, for a module-scoped fixture (make_cfg is per test)
    run = tmp_path_factory.mktemp("score")
    compose_cfg = conftest.compose_cfg
    train(compose_cfg([*FAST, *QUIET, "trainer.max_steps=2", "test=false", "val_every=100",
                       "module.evaluation.method=rk4", "module.evaluation.steps=1"], run))
    return run / "checkpoints" / "last.ckpt"


def grads(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("choice,width", [("variational", 32), ("variational_cifar10", 96),
                                          ("variational_imagenet32", 128)])
def test_variational_configs_compose_into_a_dequant_module(make_cfg, choice, width):
    cfg = make_cfg([*FAST, f"dequantization={choice}", "dequantization.attn_heads=0"])
    assert cfg.dequantization.width == width and cfg.module.dequant.truncation_correction
    module = build_module(cfg)
    assert isinstance(module, DequantLitModule) and isinstance(module.dequantizer, VariationalDequantizer)
    assert module.dequantizer.shape == (1, 8, 8) and module.dequantizer.num_levels == 17


def test_dequant_settings_without_a_learnable_dequantizer_raise(make_cfg):
    cfg = make_cfg([*FAST, "dequantization=uniform", "+module.dequant.weight=1.0"])
    with pytest.raises(ConfigError, match="nothing to train"):
        build_module(cfg)


def test_joint_debug_run_trains_score_and_flow(make_cfg, tmp_path):
    cfg = make_cfg([*FAST, *QUIET, "dequantization=variational", "trainer.max_steps=3", "val_every=3", "test=false"])
    metrics = train(cfg)
    assert metrics["train/steps"] == 3 and math.isfinite(metrics["val/bpd_bound"])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    shadow = ckpt["ema"]["shadow"]
    for prefix in ("score_model.", "dequantizer."):  # both trained: EMA != raw weights after 3 steps
        keys = [k for k in shadow if k.startswith(prefix)]
        assert keys and any(not torch.equal(shadow[k], ckpt["state_dict"][k]) for k in keys), prefix
    module, _, _ = module_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(module.dequantizer, VariationalDequantizer)


def test_joint_gradients_theta_from_dsm_only_phi_from_the_objective(make_cfg):
    """θ's gradient is that of the DSM loss alone (whatever the weight of J_φ); φ's comes from J_φ alone."""
    cfg = make_cfg([*FAST, "dequantization=variational"])
    module = build_module(cfg)
    k = torch.randint(0, 17, (6, 1, 8, 8))
    theta, phi = list(module.score_model.parameters()), list(module.dequantizer.parameters())
    out = {}
    for weight in (1.0, 0.0):
        module.dequant_cfg = dataclasses.replace(module.dequant_cfg, weight=weight)
        module.zero_grad(set_to_none=True)
        loss, _ = module.training_loss(k, torch.Generator().manual_seed(3))
        loss.backward()
        out[weight] = grads(theta), grads(phi)
    for a, b in zip(out[1.0][0], out[0.0][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(g is None or not g.any() for g in out[0.0][1])  # the DSM loss saw a detached y
    assert sum(float(g.abs().sum()) for g in out[1.0][1] if g is not None) > 0


def test_after_mode_gradient_reaches_flow_not_frozen_score(make_cfg, score_ckpt):
    cfg = make_cfg([*FAST, f"score_ckpt={score_ckpt}"], config_name="train_dequant")
    from scoreflow.tasks.train_dequant import flow_run_config

    _, score_cfg, _ = module_from_checkpoint(score_ckpt)
    module = build_module(flow_run_config(cfg, score_cfg))
    assert isinstance(module, DequantLitModule) and module.freeze_score
    module.train()
    assert not module.score_model.training and module.dequantizer.training
    loss, extra = module.training_loss(torch.randint(0, 17, (4, 1, 8, 8)), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in module.score_model.parameters())
    flow_grads = [p.grad for p in module.dequantizer.parameters()]
    assert all(g is not None for g in flow_grads) and sum(float(g.abs().sum()) for g in flow_grads) > 0
    assert {id(p) for g in module.configure_optimizers()["optimizer"].param_groups for p in g["params"]} == {
        id(p) for p in module.dequantizer.parameters()
    }
    assert 0 < float(extra["train/dequant_bpd"]) < 20


def test_after_mode_run_writes_a_checkpoint_with_score_and_flow(make_cfg, score_ckpt, tmp_path):
    cfg = make_cfg([*FAST, *["logger=none"], f"score_ckpt={score_ckpt}", "trainer.max_steps=3", "val_every=3",
                    "datamodule.test_subset=8"], config_name="train_dequant")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train_dequant(cfg)
    # the frozen score network is in eval mode on purpose: Lightning's warning about it is not shown
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]
    assert metrics["train/steps"] == 3 and "Variational" in metrics["dequantization"]
    assert all(math.isfinite(metrics[k]) for k in ("test/bpd_bound", "test/bpd_ode", "test/bpd_bound_se"))
    path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    score = torch.load(score_ckpt, weights_only=True)
    shadow = ckpt["ema"]["shadow"]
    assert shadow and all(k.startswith("dequantizer.") for k in shadow)  # the EMA tracks φ only
    assert any(not torch.equal(v, ckpt["state_dict"][k]) for k, v in shadow.items())  # φ moved
    for k, v in score["ema"]["shadow"].items():  # θ is the score run's EMA, untouched
        torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=0, atol=0)
    cfg_saved = ckpt["scoreflow"]["config"]
    assert cfg_saved["dequant_run"]["mode"] == "after" and cfg_saved["data"]["num_levels"] == 17
    module, _, _ = module_from_checkpoint(path)
    assert isinstance(module.dequantizer, VariationalDequantizer)
    for name, p in module.dequantizer.named_parameters():
        torch.testing.assert_close(p.detach(), shadow["dequantizer." + name], rtol=0, atol=0)
    ev = evaluate(make_cfg([f"ckpt_path={path}", *EVAL], sub="eval", config_name="evaluate"))  # evaluate.py
    assert ev["protocol"]["dequantization"] == "VariationalDequantizer"
    assert math.isfinite(ev["test/bpd_bound"]) and math.isfinite(ev["test/bpd_ode"])


def test_uniform_flow_reproduces_uniform_dequantization_through_the_same_evaluation(make_cfg, score_ckpt, tmp_path):
    """σ(logistic ε) is U(0, 1) with log q = 0: a 0-coupling logistic flow, 'trained' with lr=0, must give the
    uniform-dequantization test numbers (same seed, same noise) through module_from_checkpoint and trainer.test."""
    cfg = make_cfg([*FAST, "logger=none", f"score_ckpt={score_ckpt}", "dequantization.num_couplings=0",
                    "dequantization.base=logistic", "module.optim.lr=0", "trainer.max_steps=1", "val_every=100",
                    "seed=42", "test=false", "module.evaluation.truncation_correction=false",  # the score run's
                    "module.evaluation.method=rk4", "module.evaluation.steps=1"],  # (debug=fast would say dopri5)
                   config_name="train_dequant")
    train_dequant(cfg)
    flow_ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    uni_cfg = make_cfg([*FAST, "logger=none", "datamodule.test_subset=16"], sub="uniform")
    res = {}
    for name, path in [("uniform", score_ckpt), ("flow", flow_ckpt)]:
        out = tmp_path / name
        out.mkdir()
        module, _, _ = module_from_checkpoint(path)
        expected = UniformDequantizer if name == "uniform" else VariationalDequantizer
        assert type(module.dequantizer) is expected
        res[name] = evaluate_checkpoint(uni_cfg, path, out), dict(np.load(out / "test_per_example.npz"))
    (m_u, per_u), (m_f, per_f) = res["uniform"], res["flow"]
    np.testing.assert_allclose(per_f["bpd_bound"], per_u["bpd_bound"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(per_f["bpd_ode"], per_u["bpd_ode"], rtol=0, atol=1e-4)
    assert m_f["test/bpd_bound"] == pytest.approx(m_u["test/bpd_bound"], abs=1e-5)
    ev = {name: evaluate(make_cfg([f"ckpt_path={path}", *EVAL], sub=f"eval_{name}", config_name="evaluate"))
          for name, path in [("uniform", score_ckpt), ("flow", flow_ckpt)]}  # and through evaluate.py
    assert ev["flow"]["protocol"]["dequantization"] == "VariationalDequantizer"
    for key in ("test/bpd_bound", "test/bpd_ode"):
        assert ev["flow"][key] == pytest.approx(ev["uniform"][key], abs=1e-4), key


def test_importance_weighted_nll():
    nll = torch.tensor([[1.0, 2.0], [3.0, 2.0]])
    log_q = torch.tensor([[0.5, 0.0], [-0.5, 0.0]])
    # one sample: the plain estimate; identical samples: unchanged; otherwise below the mean (Jensen)
    torch.testing.assert_close(importance_weighted_nll(nll[:1], log_q[:1]), (nll + log_q)[0])
    iw = importance_weighted_nll(nll, log_q)
    assert iw[1] == pytest.approx(2.0)
    assert iw[0] == pytest.approx(-math.log((math.exp(-1.5) + math.exp(-2.5)) / 2)) and iw[0] < 2.0
    with pytest.raises(ValueError):
        importance_weighted_nll(nll[0], log_q[0])


def test_uniform_module_is_not_a_dequant_module(make_cfg):
    module = build_module(make_cfg([*FAST, "dequantization=uniform"]))
    assert type(module) is ScoreLitModule


def test_importance_weighted_bpd_through_a_module(make_cfg):
    module = build_module(make_cfg([*FAST, "dequantization=variational", "module.evaluation.test_num_t=4"]))
    module.eval()
    k = torch.randint(0, 17, (3, 1, 8, 8))
    one = importance_weighted_bpd(module, k, 1, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        y, log_q = module.to_model_space(k, g)
        plain = module.to_bpd(module.bound_nll(y, 4, g), log_q, 64)
    torch.testing.assert_close(one.float(), plain.float())
    many = importance_weighted_bpd(module, k, 4, generator=torch.Generator().manual_seed(5))
    assert many.shape == (3,) and torch.isfinite(many).all()


def test_a_flow_trained_without_ema_tests_its_raw_weights_and_the_best_flow_skips_non_finite_bounds(make_cfg,
                                                                                                   score_ckpt, capsys):
    """train_dequant.py's callbacks are the callbacks group's ``flow`` (minimal + the best checkpoint + progress):
    its copy had drifted to Lightning's plain ModelCheckpoint (a NaN bound could become "best"), and a run with
    ``~callbacks.ema`` trained to the end, then failed asking for EMA weights it did not hold."""
    cfg = make_cfg([*FAST, "logger=none", f"score_ckpt={score_ckpt}", "trainer.max_steps=2", "val_every=2",
                    "datamodule.test_subset=4"], config_name="train_dequant")
    assert cfg.callbacks.checkpoint._target_ == "scoreflow.lit.best_checkpoint.BestCheckpoint"
    assert cfg.callbacks.ema.decay == 0.99 and cfg.callbacks.periodic.filename == "last"
    raw = make_cfg([*FAST, "logger=none", f"score_ckpt={score_ckpt}", "trainer.max_steps=2", "val_every=2",
                    "datamodule.test_subset=4", "~callbacks.ema"], sub="raw", config_name="train_dequant")
    metrics = train_dequant(raw)
    assert metrics["train/steps"] == 2 and math.isfinite(metrics["test/bpd_bound"])
    assert "frozen score model + raw flow (" in capsys.readouterr().out  # the table says which weights
