"""Likelihood speed and estimator variance on CPU: ``python bench/likelihood.py`` (under a minute).

Prints three tables:
1. probability-flow ODE NLL (dopri5, rtol = atol = 1e-5): NFE and seconds per example, float32 vs float64,
   exact divergence vs one Rademacher probe per solve, on the exact score of a Gaussian mixture (D=8, with
   the oracle's ``-log p_eps`` for reference) and on a tiny random MLP (D=16);
2. the Theorem 3 bound (1000 IS times per example): seconds per example and the Monte-Carlo standard error;
3. the variance of one time sample of the bound estimator: closed forms vs Monte-Carlo constant terms,
   importance vs uniform time, i.i.d. vs stratified times.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from scoreflow.likelihood import likelihood_bound, ode_log_likelihood
from scoreflow.nets.score_model import ScoreModel
from scoreflow.oracles import GaussianMixture
from scoreflow.sde import VESDE, VPSDE, SubVPSDE


class TinyMLP(nn.Module):
    """``net(x [B, D], label [B]) -> [B, D]``: sinusoidal label features concatenated to ``x``, two hidden layers."""

    def __init__(self, dim: int, width: int = 64, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), n_freq)) / 1000.0)
        self.body = nn.Sequential(
            nn.Linear(dim + 2 * n_freq, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim)
        )

    def forward(self, x, label):
        ang = label[:, None] * self.freqs[None]
        return self.body(torch.cat([x, ang.sin(), ang.cos()], dim=1))


def oracle(dim: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, dim, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.2, 0.3, 0.5]), means, 0.05 + 0.2 * torch.rand(3, dim, generator=g))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main(batch: int = 32, num_t: int = 1000) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sde, eps = VPSDE(), 1e-5
    mix = oracle(8)
    x_mix = mix.sample(batch, generator=torch.Generator().manual_seed(2))
    net = TinyMLP(16)
    x_mlp = torch.randn(batch, 16, generator=torch.Generator().manual_seed(3)).clamp(-2, 2)
    models = {
        "oracle D=8": (x_mix, lambda dt: mix.score_fn(sde)),
        "MLP D=16": (x_mlp, lambda dt: ScoreModel(net.to(dt), sde).eval()),
    }
    ref = -mix.log_prob(x_mix, sde, torch.full((batch,), eps, dtype=torch.float64)).mean().item() / 8

    print(
        f"ODE NLL, VP eps={eps}, dopri5 rtol=atol=1e-5, batch {batch} as one system (oracle -log p_eps: "
        f"{ref:.4f} nats/dim)"
    )
    print(f"{'model':<12}{'dtype':<9}{'divergence':<12}{'NFE':>6}{'s/example':>11}{'nats/dim':>10}")
    for name, (x, make) in models.items():
        for dt in (torch.float32, torch.float64):
            for div in ("exact", "rademacher"):
                gen = torch.Generator().manual_seed(4)
                res, sec = timed(ode_log_likelihood, make(dt), sde, x, eps=eps, divergence=div, dtype=dt, generator=gen)
                nll = res.nll.double().mean().item() / x.shape[1]
                print(f"{name:<12}{str(dt)[6:]:<9}{div:<12}{res.nfe:>6}{sec / batch:>11.4f}{nll:>10.4f}")

    print(f"\nBound L^DSM (Theorem 3), VP eps={eps}, {num_t} IS times per example, closed-form constants")
    print(f"{'model':<12}{'dtype':<9}{'s/example':>11}{'nats/dim':>10}{'se/dim':>9}")
    for name, (x, make) in models.items():
        for dt in (torch.float32, torch.float64):
            gen = torch.Generator().manual_seed(5)
            with torch.no_grad():
                res, sec = timed(likelihood_bound, make(dt), sde, x.to(dt), eps=eps, num_t=num_t, generator=gen)
            D = x.shape[1]
            nll, se = res.nll.double().mean().item() / D, res.nll_se.double().mean().item() / D
            print(f"{name:<12}{str(dt)[6:]:<9}{sec / batch:>11.4f}{nll:>10.4f}{se:>9.4f}")

    print("\nVariance of one time sample of the bound estimator (mean over examples, float64, 400 times each)")
    print(f"{'model':<16}{'time':<9}{'times':<7}{'closed_form':>12}{'paired':>10}{'monte_carlo':>12}")
    mix2 = GaussianMixture(
        torch.tensor([0.4, 0.6]), torch.tensor([[1.0, -0.5], [-1.0, 0.5]]), torch.tensor([[0.1, 0.2], [0.3, 0.05]])
    )
    x2 = mix2.sample(50, generator=torch.Generator().manual_seed(6))
    cases = [(f"oracle2 {type(s).__name__[:-3]}", s, mix2.score_fn(s), x2) for s in (VPSDE(), SubVPSDE(), VESDE())]
    cases.append(("MLP16 VP", sde, ScoreModel(net.double(), sde).eval(), x_mlp.double()[:16]))
    for name, s, score, x in cases:
        for is_ in (True, False):
            for strat in (False, True):
                row = []
                for est in ("closed_form", "paired", "monte_carlo"):
                    with torch.no_grad():
                        res = likelihood_bound(
                            score, s, x, num_t=400, importance_sampling=is_, estimator=est, stratified=strat,
                            generator=torch.Generator().manual_seed(7), chunk_size=8192,
                        )  # fmt: skip
                    row.append(res.sample_var.mean().item())
                label = f"{'IS' if is_ else 'uniform':<9}{'strat' if strat else 'iid':<7}"
                print(f"{name:<16}{label}{row[0]:>12.4g}{row[1]:>10.4g}{row[2]:>12.4g}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-t", type=int, default=1000)
    a = p.parse_args()
    main(a.batch, a.num_t)
