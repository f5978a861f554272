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


def _draw_on_rank(rank: int, world: int, init: str, out: str) -> None:
    """One of ``world`` gloo processes: the grid callback as under DDP (rank 0 saves what it gathered)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        def all_gather(t):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous())
            return torch.stack(parts)

        sde = VPSDE()
        trainer = SimpleNamespace(global_rank=rank, world_size=world, default_root_dir=out, loggers=[])
        module = SimpleNamespace(data_shape=(2,), _score_fn=lambda: MIX.score_fn(sde), sde=sde, device="cpu",
                                 shift=0.0, scale=1.0, output_dir=out, num_levels=None, trainer=trainer,
                                 all_gather=all_gather)
        callbacks.save_scatter = lambda x, path, title: torch.save(x, f"{out}/grid.pt")
        grid = callbacks.SampleGrid(num_samples=5, sampler={"kind": "ode", "method": "rk4", "steps": 10})
        path = grid.draw(trainer, module, 3)
        assert (path is None) == (rank != 0)
    finally:
        dist.destroy_process_group()


def test_ranks_draw_a_share_of_the_grid_and_rank_zero_gathers_the_same_grid(tmp_path):
    """Under DDP each rank drew the whole grid; now rank r draws seeds r, r + world, ... and rank 0 gathers them.
    With 3 processes and 5 samples (2, 2, 1 per rank: a padded collective) the grid equals one process's draw,
    bit for bit (a fixed-step sampler with per-sample seeds does not depend on the batch)."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_draw_on_rank, args=(3, init, str(tmp_path)), nprocs=3, start_method="spawn")
    sde = VPSDE()
    ref = ode_sample(MIX.score_fn(sde), sde, (5, 2), seeds=[0, 1, 2, 3, 4], method="rk4", steps=10)
    torch.testing.assert_close(torch.load(tmp_path / "grid.pt"), ref.samples.float(), rtol=0, atol=0)
