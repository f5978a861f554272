"""The sample-grid callback draws through the one sampler dispatch: its samples are those of the configured
sampler with per-sample seeds 0..n-1, whatever the kind."""

from types import SimpleNamespace

import pytest
import torch

import scoreflow.lit.callbacks as callbacks
from scoreflow.oracles import GaussianMixture
from scoreflow.sampling import ode_sample, pc_sample
from scoreflow.sde import VPSDE

MIX = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.2, 0.3]))


@pytest.mark.parametrize("kind", ["ode", "pc"])
def test_grid_samples_are_the_configured_samplers(tmp_path, monkeypatch, kind):
    sde = VPSDE()
    module = SimpleNamespace(data_shape=(2,), _score_fn=lambda: MIX.score_fn(sde), sde=sde, device="cpu",
                             shift=0.0, scale=1.0, output_dir=str(tmp_path), num_levels=None)
    trainer = SimpleNamespace(global_rank=0, default_root_dir=str(tmp_path), loggers=[])
    seen = {}
    monkeypatch.setattr(callbacks, "save_scatter", lambda x, path, title: seen.setdefault("x", x))
    opts = {"ode": {"method": "rk4", "steps": 10}, "pc": {"corrector": "none", "steps": 10}}[kind]
    path = callbacks.SampleGrid(num_samples=4, sampler={"kind": kind, **opts}).draw(trainer, module, 7)
    assert path == tmp_path / "samples" / "step_0000007.png"
    ref = {"ode": ode_sample, "pc": pc_sample}[kind](MIX.score_fn(sde), sde, (4, 2), seeds=[0, 1, 2, 3], **opts)
    torch.testing.assert_close(seen["x"], ref.samples, rtol=0, atol=0)
