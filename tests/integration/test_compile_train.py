"""``module.compile=true`` through the real pipeline (shape check, FLOP count, training, validation with the ODE
likelihood and the bound, EMA, sample grid, checkpoint, test): the network is compiled once, for the training
batch, at its static shape; nothing else compiles (conftest's ``graphs``: a counting backend, no Inductor)."""

from __future__ import annotations

import pytest

from scoreflow.tasks.train import train

FAST = ["debug=fast", "trainer.accelerator=cpu", "module.compile=true", "trainer.max_steps=6", "val_every=3",
        "sample_every=6", "checkpoint_every=3", "module.evaluation.nll_every=3", "datamodule.batch_size=8"]


SMALL = ["model.net.nf=16", "model.net.num_res_blocks=1"]  # the paper's networks, narrow (8x8 digits)


SLOW = pytest.mark.slow  # 10-15 s each on 2 cores: one SDE and one paper network stay in the default suite


@pytest.mark.parametrize("overrides", [["sde=vp"], pytest.param(["sde=subvp"], marks=SLOW),
                                       pytest.param(["sde=ve"], marks=SLOW), ["model=ddpmpp", *SMALL],
                                       pytest.param(["sde=ve", "model=ncsnpp", *SMALL], marks=SLOW)],
                         ids=["vp", "subvp", "ve", "ddpmpp", "ncsnpp-ve"])
def test_train_compiles_the_training_loss_once(make_cfg, graphs, caplog, overrides):
    """One graph also means no graph break, in the score model's wrapper (time label, output scaling) for each SDE
    and in the paper's networks."""
    with caplog.at_level("INFO", logger="scoreflow.lit.module"):
        metrics = train(make_cfg([*FAST, *overrides]))
    assert "module.compile=default: the first training step compiles the network" in caplog.text
    assert metrics["train/steps"] == 6
    assert graphs and all(g["mode"] is None and g["dynamic"] is False for g in graphs)
    (compiled,) = [c for g in graphs for c in g["graphs"]]  # one compilation in all (the test phase's module: none)
    assert (8, 1, 8, 8) in compiled, compiled
