"""The re-implemented reference method of ``bench/likelihood_speed.py`` (score_sde_pytorch's ``likelihood_fn``)
solves the same ODE as ours: with the exact score of Gaussian-mixture data both reach the exact log-density."""

import importlib.util
import sys
from pathlib import Path

import torch

from scoreflow.likelihood import draw_probe, ode_log_likelihood
from scoreflow.oracles import GaussianMixture
from scoreflow.sde import VPSDE

BENCH = Path(__file__).resolve().parents[2] / "bench" / "likelihood_speed.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("likelihood_speed", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_reference_method_matches_ours_and_the_oracle(gen):
    bench = load_bench()
    sde, eps = VPSDE(), 1e-5
    means = torch.tensor([[1.0, -0.5, 0.3, 0.0], [-1.0, 0.5, -0.2, 0.4]])
    variances = torch.tensor([[0.1, 0.2, 0.15, 0.3], [0.3, 0.05, 0.2, 0.1]])
    mix = GaussianMixture(torch.tensor([0.4, 0.6]), means, variances, (1, 2, 2))
    x = mix.sample(6, generator=gen).double()
    probe = draw_probe("rademacher", x, generator=gen)
    score = mix.score_fn(sde)
    ref_nll, nfe = bench.reference_nll(score, sde, x, probe, eps, 1e-6, 1e-6)
    ours = ode_log_likelihood(score, sde, x, eps=eps, probe=probe, rtol=1e-6, atol=1e-6, dtype=torch.float64)
    assert nfe > 20 and ref_nll.shape == (6,)
    # same ODE, same probe, both at 1e-6: within 2e-3 nats per dimension (the oracle tests' tolerance, D = 4);
    # a wrong sign of the divergence or a lost probe moves the NLL by nats
    assert float((ref_nll.double() - ours.nll).abs().max()) < 2e-3 * 4


def test_parse_ours():
    bench = load_bench()
    assert bench.parse_ours("rk4#40") == {"method": "rk4", "steps": 40}
    assert bench.parse_ours("dopri5@1e-5") == {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}
