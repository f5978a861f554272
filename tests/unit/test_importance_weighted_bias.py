"""``importance_weighted_nll`` is a bound on ``-log P(k)`` only with an exact ``-log p(y)``: with the Theorem-3
bound's Monte-Carlo estimate in its place, the log-mean-exp over draws is pulled down by about half the estimate's
variance and lands below ``-log P(k)`` (the docstring and README say so). Oracle: VP SDE with N(0, 1) data in the
model's space, so every marginal is N(0, 1), the score is ``-x``, the prior is exact, and
``P(k) = Phi(y_hi) - Phi(y_lo)`` on the bin of ``k`` under uniform dequantization (``log q = 0``)."""

from __future__ import annotations

import math

import torch

from scoreflow.dequantization import importance_weighted_nll
from scoreflow.likelihood import likelihood_bound
from scoreflow.sde import VPSDE

K, k, S, R = 256, 128, 32, 60


def _phi(v: float) -> float:
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


def test_importance_weighting_is_a_bound_with_an_exact_density_and_biased_low_with_a_noisy_bound():
    truth = -math.log(_phi(2 * (k + 1) / K - 1) - _phi(2 * k / K - 1))  # nats, -log P(k)
    g = torch.Generator().manual_seed(0)
    to_levels = math.log(K) - math.log(2)  # -log p_x(x) = -log p_y(y) - log 2 (y = 2x - 1); + log K: the bin's width
    exact1, exact_iw, noisy1, noisy_iw = [], [], [], []
    for _ in range(R):
        y = 2 * (k + torch.rand(S, 1, generator=g, dtype=torch.float64)) / K - 1
        exact = (0.5 * y**2 + 0.5 * math.log(2 * math.pi)).squeeze(1) + to_levels  # [S]
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        noisy = likelihood_bound(lambda x, t: -x, VPSDE(), y, eps=1e-5, num_t=50, importance_sampling=True,
                                 truncation_correction=True).nll + to_levels
        for v, one, iw in ((exact, exact1, exact_iw), (noisy, noisy1, noisy_iw)):
            one.append(float(v.mean()))
            iw.append(float(importance_weighted_nll(v.view(S, 1), torch.zeros(S, 1, dtype=torch.float64))))
    mean = lambda a: sum(a) / len(a)  # noqa: E731
    se = lambda a: float(torch.tensor(a).std()) / math.sqrt(len(a))  # noqa: E731
    # exact density: the S-draw estimate lies between -log P(k) and the one-draw bound (Burda et al. 2016)
    assert truth - 3 * se(exact_iw) <= mean(exact_iw) <= mean(exact1) + 1e-12
    assert mean(exact_iw) - truth < 1e-3
    # the Theorem-3 bound: each draw bounds -log P(k) in expectation, their importance-weighted mean does not
    assert mean(noisy1) > truth - 3 * se(noisy1)
    assert mean(noisy_iw) < truth - 10 * se(noisy_iw), (mean(noisy_iw), truth)
