"""Noise-conditional classifiers: shapes, the published WRN-28-10 size, time conditioning, input gradients."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from scoreflow.nets.classifier import NoiseConditionalClassifier, WideResNet
from scoreflow.sampling import classifier_guided_score
from scoreflow.sde import VESDE, VPSDE, SubVPSDE

CONF = Path(__file__).resolve().parents[2] / "conf" / "classifier"
WRN28_10_PUBLISHED = 36_479_194  # Zagoruyko & Komodakis 2016, CIFAR-10 (10 classes)
WRN28_10_CONDITIONED = 39_171_674  # + Fourier-feature MLP (393,728) + one Dense per block (2,298,752)



def preset(name: str, shape: tuple[int, ...], sde=None, num_classes: int = 10) -> NoiseConditionalClassifier:
    """``conf/classifier/<name>.yaml`` built the way ``hydra.utils.instantiate`` does (without Hydra)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    kwargs = cfg["net"]
    module, _, cls = kwargs.pop("_target_").rpartition(".")
    net = getattr(importlib.import_module(module), cls)(shape=shape, num_classes=num_classes, **kwargs)
    return NoiseConditionalClassifier(net, sde or VPSDE(), cfg["time_label"], cfg["normalize_input"])


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28)])
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_small_preset_shapes(shape, sde):
    torch.manual_seed(0)
    clf = preset("small", shape, sde)
    x, t = torch.randn(3, *shape), torch.tensor([1e-3, 0.5, 1.0])
    logits = clf(x, t)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert clf.num_classes == 10


def test_wrn28_10_parameter_count():
    with torch.device("meta"):  # shapes only
        plain = WideResNet((3, 32, 32), num_classes=10, depth=28, widen_factor=10, conditional=False)
        conditioned = preset("wrn28_10", (3, 32, 32), VESDE())
    assert sum(p.numel() for p in plain.parameters()) == WRN28_10_PUBLISHED
    assert sum(p.numel() for p in conditioned.parameters()) == WRN28_10_CONDITIONED


def test_wrn28_10_runs_at_32x32():
    torch.manual_seed(0)
    clf = preset("wrn28_10", (3, 32, 32), VESDE())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = clf(x, torch.tensor([1e-5, 1.0]))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name,sde", [("small", VPSDE()), ("wrn28_10", VESDE())])
def test_logits_depend_on_time(name, sde):
    torch.manual_seed(0)
    clf = preset(name, (1, 8, 8), sde)
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    # the same input at two noise levels: only the label (and the input scaling) differs
    with torch.no_grad():
        logits = clf(x, torch.tensor([0.1, 0.6]))
    assert not torch.allclose(logits[0], logits[1])


def test_time_labels_follow_score_model():
    sde = VESDE()
    t = torch.tensor([0.0, 0.5, 1.0])
    mk = lambda emb, label: NoiseConditionalClassifier(  # noqa: E731
        WideResNet((1, 8, 8), depth=10, widen_factor=1, embedding_type=emb), sde, label)
    torch.testing.assert_close(mk("fourier", "log_sigma").label(t), sde.sigma(t).log())
    torch.testing.assert_close(mk("positional", "t999").label(t), 999 * t)
    torch.testing.assert_close(mk("fourier", "t").label(t), t)
    for emb, label in [("fourier", "t999"), ("positional", "log_sigma")]:
        with pytest.raises(ValueError, match=f"embedding_type='{emb}'.*time_label='{label}'"):
            mk(emb, label)


def test_input_normalization():
    """``x / sqrt(alpha^2 + sigma^2)``: the identity under VP, a rescaling under VE."""
    torch.manual_seed(0)
    net = WideResNet((1, 8, 8), depth=10, widen_factor=1, embedding_type="positional")
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.3, 0.7, 1.0])
    vp_on, vp_off = (NoiseConditionalClassifier(net, VPSDE(), "t999", norm) for norm in (True, False))
    torch.testing.assert_close(vp_on(x, t), vp_off(x, t), rtol=1e-5, atol=1e-5)
    ve_on, ve_off = (NoiseConditionalClassifier(net, VESDE(), "t999", norm) for norm in (True, False))
    c_in = (1 + VESDE().sigma(t) ** 2).rsqrt()
    torch.testing.assert_close(ve_on(x, t), ve_off(c_in[:, None, None, None] * x, t))


@pytest.mark.parametrize("name,shape,sde", [("small", (1, 8, 8), VPSDE()), ("small", (3, 32, 32), VESDE())])
def test_input_gradient_of_log_prob_is_per_example(name, shape, sde):
    """``grad_x log p_t(y | x)`` exists, is finite and non-zero, and each example's depends on that example only
    (guidance takes the gradient of a batch sum: BatchNorm's batch statistics would break this)."""
    torch.manual_seed(0)
    clf = preset(name, shape, sde).train()
    x = torch.randn(3, *shape, requires_grad=True)
    t, y = torch.tensor([0.05, 0.4, 0.9]), torch.tensor([3, 0, 7])
    (g_batch,) = torch.autograd.grad(clf.log_prob(x, t, y).sum(), x)
    assert torch.isfinite(g_batch).all() and (g_batch.flatten(1).norm(dim=1) > 0).all()
    for b in range(3):
        xb = x[b : b + 1].detach().requires_grad_(True)
        (g_one,) = torch.autograd.grad(clf.log_prob(xb, t[b : b + 1], y[b : b + 1]).sum(), xb)
        torch.testing.assert_close(g_one[0], g_batch[b], rtol=1e-4, atol=1e-6)


def test_guided_score_adds_classifier_gradient():
    """``classifier_guided_score`` = score + scale * grad log p_t(y | x), also inside ``torch.no_grad``."""
    torch.manual_seed(0)
    sde = VPSDE()
    clf = preset("small", (1, 8, 8), sde).eval().requires_grad_(False)
    score_fn = lambda x, t: -x  # noqa: E731 - the N(0, I) score
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.3)
    with torch.no_grad():
        guided = classifier_guided_score(score_fn, clf, 2, scale=3.0)(x, t)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(clf.log_prob(xg, t, torch.full((4,), 2)).sum(), xg)
    torch.testing.assert_close(guided, -x + 3.0 * grad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet((3, 32, 32), depth=27)
    with pytest.raises(ValueError, match="divisible by 4"):
        WideResNet((1, 10, 10), depth=10)
    with pytest.raises(ValueError, match="images"):
        WideResNet((2,), depth=10)
    with pytest.raises(ValueError, match="time_label"):
        NoiseConditionalClassifier(WideResNet((1, 8, 8), depth=10, widen_factor=1), VPSDE(), "sigma")


def test_classifier_imports_no_lightning_or_hydra():
    code = "import sys, scoreflow.nets.classifier; "
    code += "print(sorted({'lightning', 'pytorch_lightning', 'hydra'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
