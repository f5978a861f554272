"""``module.compile`` compiles the training loss's calls of the score model once, at the training batch's static
shape, and nothing else: on a 2026-11-28 H200 the in-place ``net.compile()`` of earlier releases compiled DDPM++
first for the CPU shape check (batch 2), then again for the GPU training batch with automatic dynamic shapes,
and that second compilation had not finished after 230 s. Compilation here goes to a counting backend (no
Inductor), so the test is fast and counts exactly what ``torch.compile`` would compile."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from scoreflow.dequantization import UniformDequantizer
from scoreflow.lit.module import COMPILE_MODES, ScoreLitModule
from scoreflow.lit.throughput import training_flops_per_image
from scoreflow.nets import ScoreModel
from scoreflow.sde import VPSDE
from scoreflow.tasks.build import check_shapes
from scoreflow.weighting import ImportanceSampledLikelihood

SHAPE = (1, 4, 4)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.emb = nn.Linear(1, 8)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, label):
        h = self.conv(x) + self.emb(label[:, None].to(x.dtype))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


def _module(compile, seed=0):
    torch.manual_seed(seed)
    sde = VPSDE()
    return ScoreLitModule(ScoreModel(TinyNet(), sde), ImportanceSampledLikelihood(sde), UniformDequantizer(),
                          num_levels=256, data_shape=SHAPE, compile=compile)


def _batch(n):
    return torch.randint(0, 256, (n, *SHAPE), generator=torch.Generator().manual_seed(n))


def test_only_the_training_loss_is_compiled_once_at_static_shape(graphs):
    module = _module(True)
    check_shapes(module, SHAPE)  # batch 2, no grad: eager
    assert training_flops_per_image(module.score_model, SHAPE, torch.device("cpu")) > 0  # batch 1: eager
    assert graphs == []  # compiled at the first training call, not before

    for _ in range(3):  # the training loss, batch 8: one graph, compiled once
        loss, _ = module.training_loss(_batch(8), torch.Generator().manual_seed(1))
        loss.backward()
    assert len(graphs) == 1 and graphs[0]["dynamic"] is False and len(graphs[0]["graphs"]) == 1

    g = torch.Generator().manual_seed(2)  # likelihood evaluation, other batch sizes, float64, grad w.r.t. x: eager
    y, _ = module.to_model_space(_batch(3), g)
    assert torch.isfinite(module.bound_nll(y, 4, g)).all()
    nll, _ = module.ode_nll(y.double(), g)
    assert torch.isfinite(nll).all()
    copy.deepcopy(module.score_model)(y, torch.rand(3))  # the EMA's copy
    assert len(graphs[0]["graphs"]) == 1

    # a new training batch size is a static recompilation, not a dynamic one
    module.training_loss(_batch(5), torch.Generator().manual_seed(1))[0].backward()
    first, second = graphs[0]["graphs"]
    assert (8, *SHAPE) in first and (5, *SHAPE) in second and (8, *SHAPE) not in second


def test_compiled_loss_equals_eager_and_the_state_dict_is_the_plain_networks(graphs):
    eager, compiled = _module(False), _module(True)
    a, _ = eager.training_loss(_batch(8), torch.Generator().manual_seed(3))
    b, _ = compiled.training_loss(_batch(8), torch.Generator().manual_seed(3))
    assert list(eager.state_dict()) == list(compiled.state_dict())  # also after compiling
    assert not any(k.startswith("_") for k in compiled.state_dict())
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
    assert len(graphs[0]["graphs"]) == 1  # the compiled module's loss went through torch.compile


def test_compile_modes(graphs):
    for mode in (True, *COMPILE_MODES):
        assert callable(_module(mode).train_score_fn)
    plain = _module(False)
    assert plain.train_score_fn is plain.score_model
    assert [s["mode"] for s in graphs] == [None, *COMPILE_MODES]
    with pytest.raises(ValueError, match=r"module.compile='fast'.*reduce-overhead"):
        _module("fast")


def test_a_copy_or_pickle_compiles_for_its_own_weights(graphs):
    """deepcopy and pickling (``ddp_spawn``) leave the compiled function behind: it is bound to the original's
    score model (a copy that kept it would train with the original's weights) and cannot be pickled."""
    module = _module(True)
    loss = module.training_loss(_batch(8), torch.Generator().manual_seed(4))[0]
    copied = copy.deepcopy(module)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
    halved = copied.training_loss(_batch(8), torch.Generator().manual_seed(4))[0]
    assert not torch.equal(loss, halved)
    eager = _module(False)
    eager.load_state_dict(copied.state_dict())
    torch.testing.assert_close(eager.training_loss(_batch(8), torch.Generator().manual_seed(4))[0], halved,
                               rtol=0, atol=0)
    restored = pickle.loads(pickle.dumps(module))
    torch.testing.assert_close(restored.training_loss(_batch(8), torch.Generator().manual_seed(4))[0], loss,
                               rtol=0, atol=0)
    assert len(graphs) == 3  # each of the three modules compiled its own
