"""The fused training step reads nothing on the host, through the real configs: every SDE × weighting, flips, and
the paper's networks (narrow). On a GPU a host read is a device sync per step, which stalls the queue of kernels;
``tests/gpu/test_fused_step.py`` checks the same under CUDA's sync debug mode on a GPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

from scoreflow.lit.module import ScoreLitModule
from scoreflow.tasks.train import train

READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def no_host_reads():
    """Inside: every way of reading a tensor on the host raises ``AssertionError("host read: ...")``."""
    saved = {n: getattr(torch.Tensor, n) for n in READS}

    def refuse(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name} in the training step")
        return f

    try:
        for n in READS:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


class NoHostReadModule(ScoreLitModule):
    """A training step (after the first, which may set things up) in which every host read of a tensor raises."""

    def training_step(self, batch, batch_idx):
        if self.batches_seen == 0:
            return super().training_step(batch, batch_idx)
        with no_host_reads():
            return super().training_step(batch, batch_idx)


BASE = ["debug=fast", "trainer.accelerator=cpu", "test=false", "callbacks=minimal", "trainer.max_steps=4",
        "val_every=1000", "checkpoint_every=1000", "trainer.log_every_n_steps=1000", "module.optim.fused=true",
        "datamodule.batch_size=8", "module._target_=tests.integration.test_no_host_sync.NoHostReadModule"]
SMALL = ["model.net.nf=16", "model.net.num_res_blocks=1", "model.net.dropout=0.1"]


@pytest.mark.parametrize("overrides", [
    ["sde=vp", "weighting=original"], ["sde=vp", "weighting=likelihood"], ["sde=vp", "weighting=lw_is"],
    ["sde=subvp", "weighting=original"], ["sde=subvp", "weighting=lw_is", "data.hflip=true"],
    ["sde=ve", "weighting=original"], ["sde=ve", "weighting=lw_is"],
    ["sde=vp", "model=ddpmpp", *SMALL, "data.hflip=true"], ["sde=ve", "model=ncsnpp", *SMALL],
], ids=lambda o: "-".join(x.split("=")[1] for x in o if x.startswith(("sde=", "weighting=", "model="))))
def test_fused_training_step_reads_nothing_on_the_host(make_cfg, overrides):
    metrics = train(make_cfg([*BASE, *overrides]))
    assert metrics["train/steps"] == 4


def test_the_check_can_fail(make_cfg):
    """The default guard reads its flag on the host every step: refused."""
    with pytest.raises(AssertionError, match="host read: Tensor"):
        train(make_cfg([*BASE, "module.optim.fused=false"]))
