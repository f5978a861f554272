"""``seed_global_rngs`` (the per-step dropout seed) seeds the CPU generator exactly as ``torch.manual_seed`` does,
so dropout draws, hence trained weights, are those of earlier releases."""

import torch

from scoreflow.lit.module import seed_global_rngs


def test_cpu_draws_equal_torch_manual_seed():
    drop = torch.nn.Dropout(0.3)
    x = torch.ones(1000)
    for seed in (0, 7, 2**62 + 11):
        torch.manual_seed(seed)
        ref = (torch.rand(5), drop(x))
        torch.manual_seed(seed + 1)  # a different state in between
        seed_global_rngs(seed, torch.device("cpu"))
        got = (torch.rand(5), drop(x))
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
