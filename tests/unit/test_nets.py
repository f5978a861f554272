"""Networks: published parameter counts, shapes, gradients, zero init, FIR resampling, AD modes."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from scoreflow.nets import ScoreModel
from scoreflow.nets.fir import FIRConv2d, downsample_2d, make_fir_kernel, upsample_2d
from scoreflow.nets.mlp import MLP
from scoreflow.nets.ncsnpp import NCSNpp
from scoreflow.nets.unet import UNet
from scoreflow.sde import VESDE, VPSDE

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"



def from_yaml(name: str, shape: tuple[int, ...]) -> torch.nn.Module:
    """Build ``conf/model/<name>.yaml``'s net the way ``hydra.utils.instantiate`` does (without Hydra)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    kwargs = cfg["net"]
    module, _, cls = kwargs.pop("_target_").rpartition(".")
    return getattr(importlib.import_module(module), cls)(shape=shape, **kwargs)


# Song et al. 2021b / ScoreFlow Table 2 sizes at 32x32x3 (docs/reference.md §6); the exact integers equal
# score_sde_pytorch's count minus the 128 entries of NCSN++'s frozen Fourier W (a buffer here).
PUBLISHED = {
    "ddpmpp": (61.80, 61_804_419),
    "ddpmpp_deep": (106.63, 106_632_579),
    "ncsnpp": (62.76, 62_758_787),
    "ncsnpp_deep": (107.59, 107_586_947),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    with torch.device("meta"):  # shapes only: counts 100M-parameter nets in milliseconds
        net = from_yaml(name, (3, 32, 32))
    n = sum(p.numel() for p in net.parameters())
    assert round(n / 1e6, 2) == PUBLISHED[name][0]
    assert n == PUBLISHED[name][1]


SMALL = dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.1)
FAMILIES = {
    "ddpmpp": dict(SMALL),
    "ncsnpp": dict(SMALL, fir=True, progressive_input="residual", embedding_type="fourier"),
    "skips": dict(
        SMALL, fir=True, progressive="output_skip", progressive_input="input_skip", progressive_combine="cat"
    ),
    "residual": dict(SMALL, progressive="residual", progressive_input="residual", skip_rescale=False),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_backward_small(family):
    torch.manual_seed(0)
    net = NCSNpp((3, 16, 16), **FAMILIES[family])
    x, label = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 700.0])
    out = net(x, label)
    assert out.shape == x.shape
    # zero init (variance scale 1e-10, weights ~1e-5 / sqrt(fan)) of the output conv: outputs ~1e-5, not O(1)
    assert out.abs().max() < 1e-3
    out.sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_zero_init_of_published_blocks():
    net = NCSNpp((3, 16, 16), **SMALL)
    blocks = [m for m in net.modules() if hasattr(m, "Conv_1")]
    assert blocks and all(b.Conv_1.weight.abs().max() < 1e-5 for b in blocks)
    assert net.mid_attn.NIN_3.W.abs().max() < 1e-5 and net.conv_out.weight.abs().max() < 1e-5
    assert net.conv_in.weight.abs().max() > 1e-2


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="divisible"):
        NCSNpp((3, 10, 10), **SMALL)
    with pytest.raises(ValueError, match="needs images"):
        NCSNpp((2,), **SMALL)
    with pytest.raises(ValueError, match="progressive"):
        NCSNpp((3, 16, 16), progressive="bogus", **SMALL)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_unet_small_shapes(shape):
    net = from_yaml("unet_small", shape)
    assert isinstance(net, UNet)
    x = torch.randn(3, *shape)
    out = net(x, torch.rand(3) * 999)
    assert out.shape == x.shape
    out.square().sum().backward()


def test_mlp_shapes_and_zero_init():
    net = from_yaml("mlp", (2,))
    assert isinstance(net, MLP)
    x = torch.randn(5, 2)
    out = net(x, torch.rand(5) * 999)
    assert out.shape == x.shape and out.abs().max() < 1e-3  # zero-initialised output layer
    fourier = MLP((3, 4), hidden=32, num_blocks=1, embedding_type="fourier")
    assert fourier(torch.randn(2, 3, 4), torch.randn(2)).shape == (2, 3, 4)


def test_score_model_wraps_both_parametrizations():
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.1, 0.9])
    vp = ScoreModel(UNet((1, 8, 8)), VPSDE(), "eps", "t999")
    ve = ScoreModel(UNet((1, 8, 8), embedding_type="fourier"), VESDE(), "score_over_sigma", "log_sigma")
    assert vp(x, t).shape == x.shape and ve(x, t).shape == x.shape


def zero_insert(x, up):
    u = torch.zeros(*x.shape[:2], x.shape[2] * up, x.shape[3] * up, dtype=x.dtype)
    u[:, :, ::up, ::up] = x
    return u


def upfirdn_oracle(x, k1d, up, down, pad, gain=1.0):
    """Literal StyleGAN2 upfirdn2d: zero-insert, pad, true convolution with outer(k, k), keep every down-th."""
    k = make_fir_kernel(k1d).to(x.dtype) * gain
    u = F.pad(zero_insert(x, up), (pad[0], pad[1], pad[0], pad[1]))
    w = k.flip(0, 1)[None, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(u, w, groups=x.shape[1])[:, :, ::down, ::down]


@pytest.mark.parametrize("k1d", [(1, 3, 3, 1), (1, 2, 5, 3, 0.5, 1)])
def test_fir_resampling_matches_upfirdn(k1d):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    K = len(k1d)
    k = make_fir_kernel(k1d).double()
    torch.testing.assert_close(upsample_2d(x, k), upfirdn_oracle(x, k1d, 2, 1, (K // 2, K // 2 - 1), gain=4.0))
    torch.testing.assert_close(downsample_2d(x, k), upfirdn_oracle(x, k1d, 1, 2, (K // 2 - 1, K // 2 - 1)))
    down = FIRConv2d(3, 4, 3, down=True, fir_kernel=k1d).double()
    up = FIRConv2d(3, 4, 3, up=True, fir_kernel=k1d).double()
    for conv in (down, up):
        torch.nn.init.normal_(conv.weight)
        torch.nn.init.normal_(conv.bias)
    # StyleGAN2 conv_downsample_2d: blur padded by (K + 3 - 3) / 2, then the 3x3 conv with stride 2
    expect = F.conv2d(upfirdn_oracle(x, k1d, 1, 1, (K // 2, K // 2)), down.weight, down.bias, stride=2)
    torch.testing.assert_close(down(x), expect)
    # upsample_conv_2d (a stride-2 transposed conv): zero insertion, a "full" 3x3 correlation, the 4k blur
    full = F.conv2d(F.pad(zero_insert(x, 2)[:, :, :-1, :-1], (2, 2, 2, 2)), up.weight)
    expect = upfirdn_oracle(full, k1d, 1, 1, (K // 2 - 1, K // 2 - 1), gain=4.0) + up.bias[None, :, None, None]
    torch.testing.assert_close(up(x), expect)


def test_fir_keeps_constants():
    k = make_fir_kernel((1, 3, 3, 1))
    x = torch.ones(1, 2, 8, 8)
    assert torch.allclose(upsample_2d(x, k)[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
    assert torch.allclose(downsample_2d(x, k)[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # raised by importing torch.func
def test_channels_last_bf16_and_higher_order_derivatives():
    torch.manual_seed(0)
    net = NCSNpp((3, 16, 16), **FAMILIES["ncsnpp"]).eval()
    for p in net.parameters():  # leave the zero init so every path contributes
        torch.nn.init.normal_(p, std=0.05)
    x, label = torch.randn(2, 3, 16, 16), torch.tensor([-2.0, 3.0])
    ref = net(x, label)
    cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), label)
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, label)
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    # ISM / divergence code differentiates an input gradient again; forward mode (jvp) also works
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(net(xr, label).square().sum(), xr, create_graph=True)
    g.sum().backward()
    v = torch.randn_like(x)
    _, tangent = torch.func.jvp(lambda z: net(z, label), (x,), (v,))
    fd = (net(x + 1e-3 * v, label) - net(x - 1e-3 * v, label)) / 2e-3
    torch.testing.assert_close(tangent, fd, atol=2e-3, rtol=0.05)


def test_summary_cli_composes_model_and_data(capsys):
    from scoreflow.nets.summary import main

    result = main(["model=unet_small", "data=digits"])
    out = capsys.readouterr().out
    assert "params: 715201" in out and "shape: [1, 8, 8]" in out
    assert 0 < result["gflops"] < 0.1


@pytest.mark.parametrize("args, code, expected", [
    (["--help"], 0, "model=NAME"),
    (["ddpmpp"], 1, "not key=value: ['ddpmpp']"),
    (["model=unet_small", "foo=1"], 1, "unknown keys: ['foo']"),
    (["model=ddpmp"], 1, "model=ddpmp is not in"),
    (["model=unet_small", "data=cifar"], 1, "data=cifar is not in"),
])
def test_summary_cli_usage_is_one_screen(args, code, expected):
    """What the terminal shows: the usage line and the reason (the options for a misspelt name), no traceback."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "scoreflow.nets.summary", *args], capture_output=True, text=True,
                       timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == code and "usage: python -m scoreflow.nets.summary" in out and expected in out, out
    assert "Traceback" not in out
    if "is not in" in expected:
        assert "ddpmpp, ddpmpp_deep" in out or "cifar10, digits" in out
