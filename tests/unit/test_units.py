"""Nats -> bits/dim: the dequantization offset, checked on densities whose answer is known exactly."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from scoreflow.likelihood import bpd_offset, bpd_to_nats, mean_and_se, nats_per_dim, nats_to_bpd


@pytest.mark.parametrize("K", [2, 17, 256])
@pytest.mark.parametrize("scale,shift", [(2.0, -1.0), (1.0, 0.0), (255.0 / 256.0, 0.5)])
def test_uniform_density_gives_log2_levels(K, scale, shift):
    """Discrete uniform data on K levels: a model uniform on the scaled cube ``[shift, shift + scale]^D`` is
    optimal and must score exactly ``log2 K`` bits/dim (the entropy of the data), whatever the scaling."""
    D, gen = 12, torch.Generator().manual_seed(0)
    k = torch.randint(0, K, (64, D), generator=gen)
    x = (k + torch.rand(k.shape, generator=gen, dtype=torch.float64)) / K  # uniform dequantization
    y = scale * x + shift
    assert bool(((y >= shift) & (y <= shift + scale)).all())
    nll_y = torch.full((64,), D * math.log(scale), dtype=torch.float64)  # -log of the density scale^-D
    bpd = nats_to_bpd(nll_y, D, num_levels=K, scale=scale)
    torch.testing.assert_close(bpd, torch.full_like(bpd, math.log2(K)), rtol=0, atol=1e-12)


def test_8bit_centred_offset_is_7_and_digits_offset():
    assert bpd_offset(256, 2.0) == 7.0
    assert nats_to_bpd(0.0, 3072) == 7.0
    assert bpd_offset(17, 2.0) == pytest.approx(math.log2(17) - 1)
    assert bpd_offset(256, 1.0) == 8.0
    # 3.0 bpd on CIFAR-10 is NLL_y = (3 - 7) * 3072 ln 2 nats on the centred scale
    assert nats_to_bpd(-4 * 3072 * math.log(2), 3072) == pytest.approx(3.0)


def test_continuous_data_has_no_offset_and_roundtrip():
    nll = torch.tensor([1.0, -2.5, 40.0], dtype=torch.float64)
    torch.testing.assert_close(nats_to_bpd(nll, 4, num_levels=None), nll / (4 * math.log(2)))
    torch.testing.assert_close(nats_per_dim(nll, 4), nll / 4)
    for levels, scale in [(256, 2.0), (17, 2.0), (None, 2.0), (256, 1.0)]:
        bpd = nats_to_bpd(nll, 4, num_levels=levels, scale=scale)
        torch.testing.assert_close(bpd_to_nats(bpd, 4, num_levels=levels, scale=scale), nll)
    with pytest.raises(ValueError):
        bpd_offset(0, 2.0)


def test_mean_and_se_matches_scipy():
    v = np.random.default_rng(0).normal(3.0, 0.7, size=97)
    m, se = mean_and_se(torch.tensor(v))
    assert m == pytest.approx(v.mean()) and se == pytest.approx(stats.sem(v))
    assert mean_and_se([1.0, 2.0, 3.0]) == (pytest.approx(2.0), pytest.approx(1 / math.sqrt(3)))
    m1, se1 = mean_and_se([5.0])
    assert m1 == 5.0 and math.isnan(se1)


def test_mean_and_se_convention_for_one_and_no_value():
    """The one convention: a single value has a NaN standard error (not 0), no values give (nan, nan);
    tensors, arrays and lists agree."""
    for one in ([5.0], np.array([5.0]), torch.tensor([5.0], dtype=torch.float32)):
        m, se = mean_and_se(one)
        assert m == 5.0 and math.isnan(se)
    assert all(math.isnan(a) for a in mean_and_se([]))
    v = [0.5, 1.5, 4.0]
    assert mean_and_se(np.asarray(v)) == mean_and_se(torch.tensor(v, dtype=torch.float64)) == mean_and_se(v)
    assert mean_and_se(v)[1] == pytest.approx(stats.sem(v))


def test_ieee_float32_switches_tf32_off_and_restores():
    from scoreflow.utils import ieee_float32

    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None:
        pytest.skip("torch < 2.9")
    matmul = torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = "tf32"
    try:
        with ieee_float32():
            assert conv.fp32_precision == matmul.fp32_precision == "ieee"
        assert conv.fp32_precision == "tf32"
        with pytest.raises(RuntimeError), ieee_float32():
            raise RuntimeError("restored on errors too")
        assert conv.fp32_precision == "tf32"
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


def test_lr_schedule_warmup_then_cosine():
    from scoreflow.lit.optim import lr_factor

    assert lr_factor(0, 100) == 0.01 and lr_factor(99, 100) == 1.0 and lr_factor(5000, 100) == 1.0  # no decay
    assert lr_factor(49, 100, decay_steps=1100) == 0.5  # still warming up
    assert lr_factor(100, 100, decay_steps=1100) == 1.0
    assert abs(lr_factor(600, 100, decay_steps=1100) - 0.5) < 1e-12  # half-way: cos(pi/2)
    assert abs(lr_factor(1100, 100, decay_steps=1100, min_lr_ratio=0.1) - 0.1) < 1e-12
    assert lr_factor(5000, 100, decay_steps=1100) == 0.0  # held at the floor after decay_steps


def test_builtin_adam_is_foreach_on_cpu_and_steps_like_the_per_tensor_loop():
    """The built-in Adam asks for the foreach implementation (torch's default on GPUs only): on CPU its weights equal
    the per-tensor loop's bit for bit, with the warm-up schedule."""
    from scoreflow.lit.optim import adam_with_warmup

    g = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (16,), (3, 3, 4, 4), (1,)]
    out = {}
    for foreach in (True, False):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate(shapes)]
        cfg = adam_with_warmup(params, {"lr": 1e-2, "warmup_steps": 5})
        opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
        assert opt.defaults["foreach"] is True
        opt.param_groups[0]["foreach"] = foreach  # False: torch's CPU default, the per-tensor loop
        g.manual_seed(1)
        for _ in range(30):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
            sched.step()
        out[foreach] = [p.detach() for p in params]
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False]))
