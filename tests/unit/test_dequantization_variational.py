"""Variational dequantization flow q_φ(u|k) (Ho et al. 2019; Song et al. 2021b, Eq. 13): a normalised density,
samples that follow it, exact inverse and log-det, conditioning, gradients, shapes, presets, the uniform limit."""

import numpy as np
import pytest
import torch
from scipy import stats

from scoreflow.dequantization import UniformDequantizer, VariationalDequantizer
from scoreflow.dequantization.flow_layers import ActNorm

K = 8  # levels of the toy flows


def random_flow(shape, seed=0, **overrides):
    """A small float64 flow far from the identity: full-size output layers (init_scale=1) and noisy ActNorms."""
    torch.manual_seed(seed)
    cfg = dict(
        num_levels=K,
        num_couplings=4,
        width=16,
        num_components=4,
        num_blocks=1,
        attn_heads=0,
        context_width=8,
        context_blocks=1,
        init_scale=1.0,
    )
    flow = VariationalDequantizer(shape, **{**cfg, **overrides}).double()
    with torch.no_grad():
        for m in flow.modules():
            if isinstance(m, ActNorm):
                m.log_scale.add_(0.1 * torch.randn_like(m.log_scale))
                m.bias.add_(0.3 * torch.randn_like(m.bias))
    return flow


def logit_grid(lo, hi, n):
    """Midpoints z of a grid on [lo, hi] in logit space, u = σ(z), and log(du/dz · Δz) for quadrature in u."""
    dz = (hi - lo) / n
    z = torch.linspace(lo + dz / 2, hi - dz / 2, n, dtype=torch.float64)
    return z, torch.sigmoid(z), torch.nn.functional.logsigmoid(z) + torch.nn.functional.logsigmoid(-z) + np.log(dz)


@pytest.mark.parametrize("level", [0, 5])
def test_density_integrates_to_one_1d(level):
    flow = random_flow((1,))
    z, u, log_w = logit_grid(-30, 30, 2000)  # midpoint rule in logit space: exponentially accurate here
    with torch.no_grad():
        log_q = flow.log_prob_u(u[:, None], torch.full((len(u), 1), level))
    assert torch.logsumexp(log_q + log_w, 0).exp().item() == pytest.approx(1.0, abs=1e-4)


def test_density_integrates_to_one_2d():
    flow = random_flow((2,))
    z, u, log_w = logit_grid(-15, 15, 100)  # a log-det off by 2 % misses 1 by 7e-3
    uu = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    ww = (log_w[:, None] + log_w[None, :]).reshape(-1)
    with torch.no_grad():
        log_q = flow.log_prob_u(uu, torch.tensor([[2, 6]]).expand(len(uu), 2))
    assert torch.logsumexp(log_q + ww, 0).exp().item() == pytest.approx(1.0, abs=2e-3)


def test_samples_follow_log_prob_u():
    """KS test of 5000 samples against the CDF obtained by integrating exp(log_prob_u); the flow is not uniform."""
    flow = random_flow((1,))
    with torch.no_grad():
        u, _ = flow.sample_u(torch.full((5000, 1), 3), generator=torch.Generator().manual_seed(1))
        z, grid_u, log_w = logit_grid(-30, 30, 4000)
        mass = (flow.log_prob_u(grid_u[:, None], torch.full((len(z), 1), 3)) + log_w).exp()
    cdf_u = torch.cat([torch.zeros(1), torch.sigmoid(z + 30 / 4000)]).numpy()  # right edges of the cells
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), mass.cumsum(0)]).numpy()
    samples = u.squeeze(1).numpy()
    assert stats.kstest(samples, lambda x: np.interp(x, cdf_u, cdf)).pvalue > 1e-3
    assert stats.kstest(samples, "uniform").pvalue < 1e-6


@pytest.mark.parametrize("shape,extra", [((2, 4, 4), dict(attn_heads=2)), ((3,), {}), ((1,), {})])
def test_flow_inverts_and_sample_logq_matches_log_prob_u(shape, extra):
    flow = random_flow(shape, **extra)
    k = torch.randint(0, K, (5, *shape), generator=torch.Generator().manual_seed(0))
    eps = torch.randn(5, *shape, dtype=torch.float64)
    with torch.no_grad():
        u, log_det = flow.transform(eps, k)
        eps_back, log_det_inv = flow.inverse(u, k)
        u_s, log_q = flow.sample_u(k)
        log_p = flow.log_prob_u(u_s, k)
    torch.testing.assert_close(eps_back, eps, atol=1e-6, rtol=0)
    torch.testing.assert_close(log_det_inv, -log_det, atol=1e-7, rtol=0)
    torch.testing.assert_close(log_p, log_q, atol=1e-7, rtol=0)


@pytest.mark.parametrize("shape,extra", [((2, 2, 2), dict(attn_heads=2)), ((3,), {})])
def test_log_det_matches_autograd_jacobian(shape, extra):
    flow = random_flow(shape, **extra)
    k = torch.randint(0, K, (1, *shape), generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, *shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(
        lambda e: flow.transform(e.view(1, *shape), k)[0].reshape(-1), eps.reshape(-1)
    )
    log_det = flow.transform(eps, k)[1]
    assert log_det.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-8)


def test_conditioning_on_levels_matters():
    flow = random_flow((2,))
    u = torch.rand(256, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp0 = flow.log_prob_u(u, torch.zeros(256, 2, dtype=torch.long))
        lp1 = flow.log_prob_u(u, torch.full((256, 2), K - 1))
    assert (lp0 - lp1).abs().mean() > 0.1


@pytest.mark.parametrize("shape", [(1, 8, 8), (3,)])
def test_gradients_reach_every_parameter(shape):
    flow = VariationalDequantizer.from_preset("small", shape, K, attn_heads=2, context_attention=True)
    _, log_q = flow.sample_u(torch.randint(0, K, (4, *shape)))
    (-log_q).mean().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_log_prob_u_gradient_matches_finite_differences():
    """log_prob_u inverts couplings by bisection; its gradient is the implicit-function one."""
    flow = random_flow((2,))
    u, k = torch.tensor([[0.3, 0.8]], dtype=torch.float64), torch.tensor([[1, 4]])
    p = flow.layers[-1].net.proj_out.weight
    flow.log_prob_u(u, k).sum().backward()
    h, idx = 1e-6, (3, 5)
    with torch.no_grad():
        p[idx] += h
        up = flow.log_prob_u(u, k)
        p[idx] -= 2 * h
        down = flow.log_prob_u(u, k)
    assert p.grad[idx].item() == pytest.approx(((up - down) / (2 * h)).item(), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("preset,shape", [("small", (1, 8, 8)), ("small", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_shapes_and_dequantized_range(preset, shape):
    flow = VariationalDequantizer.from_preset(preset, shape, 256)
    k = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    with torch.no_grad():
        x, log_q = flow(k, 256, generator=torch.Generator().manual_seed(0))
    assert x.shape == k.shape and log_q.shape == (2,) and torch.isfinite(log_q).all()
    assert (x > k / 256).all() and (x < (k.double() + 1) / 256).all()


def test_cifar10_preset_has_about_3_5m_parameters():
    flow = VariationalDequantizer.from_preset("cifar10", (3, 32, 32))
    assert sum(p.numel() for p in flow.parameters()) == pytest.approx(3.5e6, rel=0.03)  # docs/reference.md §5


@pytest.mark.slow
def test_imagenet32_preset_has_about_35m_parameters():
    flow = VariationalDequantizer.from_preset("imagenet32", (3, 32, 32))
    assert sum(p.numel() for p in flow.parameters()) == pytest.approx(35e6, rel=0.03)  # docs/reference.md §5


def test_default_init_is_close_to_uniform_dequantization():
    """Near-identity couplings and σ(1.749 ε) ≈ U(0, 1): KL(q || U) = E[log q] starts at ~0.01 nats/dim."""
    flow = VariationalDequantizer.from_preset("small", (1, 8, 8), 17)
    with torch.no_grad():
        _, log_q = flow.sample_u(torch.randint(0, 17, (256, 1, 8, 8)), generator=torch.Generator().manual_seed(0))
    assert 0 < log_q.mean().item() / 64 < 0.03


@pytest.mark.parametrize("shape", [(1, 4, 4), (5,)])
def test_flow_without_couplings_and_logistic_base_is_uniform_dequantization(shape):
    flow = VariationalDequantizer(shape, num_levels=K, num_couplings=0, base="logistic")
    k = torch.randint(0, K, (4000, *shape))
    u, log_q = flow.sample_u(k, generator=torch.Generator().manual_seed(3))
    u_uni, log_q_uni = UniformDequantizer().sample_u(k, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(u, u_uni, atol=1e-6, rtol=0)
    torch.testing.assert_close(log_q, log_q_uni, atol=1e-5, rtol=0)
    assert (log_q_uni == 0).all() and stats.kstest(u_uni.flatten().numpy(), "uniform").pvalue > 1e-3


def test_invalid_configurations_raise():
    with pytest.raises(ValueError, match="even width"):
        VariationalDequantizer((1, 4, 5))
    with pytest.raises(ValueError, match="shape"):
        VariationalDequantizer((4, 4))
    flow = VariationalDequantizer.from_preset("small", (2,), 4)
    with pytest.raises(ValueError, match="num_levels"):
        flow(torch.zeros(1, 2, dtype=torch.long), 256)
    with pytest.raises(ValueError, match="levels of shape"):
        flow.sample_u(torch.zeros(1, 3, dtype=torch.long))
