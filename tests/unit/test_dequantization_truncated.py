"""Truncated-normal dequantization (Zheng et al. 2023, i-DODE): exact log q against scipy, normalisation, sampling."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from scoreflow.dequantization import TruncatedNormalDequantizer
from scoreflow.sde import VPSDE


@pytest.mark.parametrize("bin_std", [0.05, 0.3, 3.0])
def test_density_is_normalised_and_matches_scipy(bin_std):
    deq = TruncatedNormalDequantizer(num_levels=256, bin_std=bin_std)

    def q(u):
        return math.exp(deq.log_prob_u(torch.tensor([[u]], dtype=torch.float64), torch.zeros(1, 1)).item())

    assert integrate.quad(q, 0, 1, points=[0.5], limit=200)[0] == pytest.approx(1.0, abs=1e-8)
    tau = 0.5 / bin_std
    u = torch.rand(64, 3, dtype=torch.float64)
    ref = stats.truncnorm(-tau, tau, loc=0.5, scale=bin_std).logpdf(u.numpy()).sum(1)
    np.testing.assert_allclose(deq.log_prob_u(u, torch.zeros(64, 3)).numpy(), ref, rtol=1e-10)


def test_samples_follow_the_truncated_normal_and_log_q_is_exact():
    deq = TruncatedNormalDequantizer((2, 2), num_levels=256, bin_std=0.2, dtype=torch.float64)
    k = torch.randint(0, 256, (2000, 2, 2))
    u, log_q = deq.sample_u(k, generator=torch.Generator().manual_seed(0))
    assert u.shape == k.shape and log_q.shape == (2000,) and ((u > 0) & (u < 1)).all()
    torch.testing.assert_close(log_q, deq.log_prob_u(u, k), atol=1e-9, rtol=0)
    assert stats.kstest(u.flatten().numpy(), stats.truncnorm(-2.5, 2.5, loc=0.5, scale=0.2).cdf).pvalue > 1e-3
    x, _ = deq(k, 256)
    assert (x > k / 256).all() and (x < (k + 1) / 256).all()


def test_wide_noise_tends_to_uniform_dequantization():
    deq = TruncatedNormalDequantizer(num_levels=256, bin_std=1e3)
    _, log_q = deq.sample_u(torch.zeros(10, 5))
    torch.testing.assert_close(log_q, torch.zeros(10), atol=1e-5, rtol=0)


def test_from_sde_matches_the_diffusion_noise_at_eps():
    sde, eps = VPSDE(), 1e-5
    deq = TruncatedNormalDequantizer.from_sde(sde, eps, num_levels=256, data_scale=2.0)
    t = torch.tensor([eps], dtype=torch.float64)
    assert deq.bin_std == pytest.approx(128 * float(sde.sigma(t) / sde.alpha(t)), rel=1e-12)
    assert deq.bin_std == pytest.approx(0.128, rel=0.01)  # σ_ε ≈ 1.0e-3 (docs/reference.md §1)


def test_outside_the_bin_has_zero_density_and_shape_is_checked():
    deq = TruncatedNormalDequantizer((2,), bin_std=0.2)
    lp = deq.log_prob_u(torch.tensor([[0.5, 1.2], [0.5, 0.5]]), torch.zeros(2, 2))
    assert lp[0] == -math.inf and torch.isfinite(lp[1])
    with pytest.raises(ValueError, match="levels of shape"):
        deq.sample_u(torch.zeros(1, 3))
