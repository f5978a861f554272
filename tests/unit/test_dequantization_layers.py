"""Building blocks of the variational dequantization flow: splits and the logistic-mixture coupling (Flow++)."""

import pytest
import torch

from scoreflow.dequantization.flow_layers import AlternatingSplit, CheckerboardSplit
from scoreflow.dequantization.logistic_mixture import (
    MixLogisticParams,
    mixture_coupling_forward,
    mixture_coupling_inverse,
)


@pytest.mark.parametrize("shape", [(2, 4, 6), (1, 3, 4)])
def test_checkerboard_split_is_a_true_checkerboard_and_merges_back(shape):
    C, H, W = shape
    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    parity = ((i + j) % 2).expand(2, C, H, W).double()
    split = CheckerboardSplit(shape)
    a, b = split.split(parity, 0)
    assert a.shape == b.shape == (2, C, H, W // 2) and (a == 0).all() and (b == 1).all()
    x = torch.randn(2, *shape)
    for p in (0, 1):
        torch.testing.assert_close(split.merge(*split.split(x, p), p), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even width"):
        CheckerboardSplit((1, 4, 3))


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_alternating_split_merges_back(dim):
    split, x = AlternatingSplit(dim), torch.randn(3, dim)
    for p in (0, 1):
        cond, trans = split.split(x, p)
        assert (cond.shape[1], trans.shape[1]) == tuple(s[0] for s in split.shapes(p)) and trans.shape[1] > 0
        torch.testing.assert_close(split.merge(cond, trans, p), x, rtol=0, atol=0)


def _params(n, M=5, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return MixLogisticParams.from_raw(scale * torch.randn(n, 2 + 3 * M, generator=g, dtype=torch.float64))


def test_mixture_coupling_inverts_far_in_the_tails_and_log_det_is_the_derivative():
    x = torch.linspace(-60, 60, 241, dtype=torch.float64).requires_grad_()
    p = _params(len(x))
    y, log_dy = mixture_coupling_forward(x, p)
    (dy,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(log_dy, dy.log(), rtol=0, atol=1e-10)
    x_back, log_dx = mixture_coupling_inverse(y.detach(), p)
    torch.testing.assert_close(x_back, x.detach(), rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(log_dx, -log_dy.detach(), rtol=0, atol=1e-9)


def test_mixture_coupling_inverts_in_float32():
    """Moderate parameters: with log-scales near ±7 the map is too flat or too steep for float32 either way."""
    p = _params(1000, seed=1, scale=1.0)
    p = MixLogisticParams(*(t.float() for t in (p.log_pi, p.means, p.log_scales, p.a, p.b)))
    x = 4 * torch.randn(1000, generator=torch.Generator().manual_seed(0))
    x_back, _ = mixture_coupling_inverse(mixture_coupling_forward(x, p)[0], p)
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)
