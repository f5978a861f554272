"""CUDA checks (skipped without a GPU; run with `pytest -m gpu tests/gpu`)."""

import pytest
import torch

from scoreflow.likelihood import likelihood_bound, ode_log_likelihood
from scoreflow.nets import NCSNpp, ScoreModel
from scoreflow.sde import VPSDE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_bf16_training_step_and_float64_likelihood_on_cuda():
    sde = VPSDE()
    net = NCSNpp(shape=(3, 16, 16), nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,)).cuda()
    model = ScoreModel(net, sde).cuda().to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 16, 16, device="cuda") * 2 - 1
    t = torch.rand(4, device="cuda") * 0.9 + 0.05
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = (model(x, t).float() ** 2).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        b = likelihood_bound(model, sde, x, num_t=16, generator=g)
    o = ode_log_likelihood(model, sde, x, rtol=1e-3, atol=1e-3, generator=g, dtype=torch.float64)
    assert torch.isfinite(b.nll).all() and torch.isfinite(o.nll).all()
