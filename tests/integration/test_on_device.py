"""``datamodule.on_device=true``: the training split kept on the training device and batches gathered there train
exactly the weights of the DataLoader path (the same batches in the same order, across epoch boundaries), resume
exactly, and refuse datasets they cannot serve with a message that says what to set."""

from __future__ import annotations

import pytest
import torch

from scoreflow.data.base import ArrayDataset
from scoreflow.lit.datamodule import DeviceBatches, ResumableSampler, ScoreDataModule
from scoreflow.tasks.train import train
from tests.integration.resume_check import assert_same_weights, resumed_and_uninterrupted

# the digits' training split holds 1297 images: 8 steps of 256 cross an epoch boundary (inside step 6)
BASE = ["debug=fast", "trainer.accelerator=cpu", "test=false", "callbacks=minimal", "val_every=100",
        "checkpoint_every=100", "datamodule.batch_size=256", "model.net.dropout=0.1"]


def test_on_device_trains_the_same_weights_as_the_dataloader(make_cfg, tmp_path, caplog):
    with caplog.at_level("INFO", logger="scoreflow.lit.datamodule"):
        train(make_cfg([*BASE, "trainer.max_steps=8", "datamodule.on_device=true"], sub="device"))
    assert "datamodule.on_device: 1297 training examples (0.1 MB) on cpu" in caplog.text
    train(make_cfg([*BASE, "trainer.max_steps=8"], sub="loader"))
    assert_same_weights(tmp_path / "device" / "checkpoints" / "last.ckpt",
                        tmp_path / "loader" / "checkpoints" / "last.ckpt", 8)


def test_on_device_resume_is_exact(make_cfg, tmp_path):
    """Interrupted at step 6 (after the epoch boundary), resumed to 8: the uninterrupted run's weights."""
    resumed_and_uninterrupted(make_cfg, tmp_path, [*BASE, "datamodule.on_device=true"], steps=8, at=6)


@pytest.mark.parametrize("rank,world", [(0, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("start", [0, 5, 130, 400])
def test_device_batches_equal_the_dataloader_batches(rank, world, start):
    n = 103
    x, y = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8), torch.arange(n) * 7
    ds = ArrayDataset(x, y, torch.randperm(n, generator=torch.Generator().manual_seed(0)))
    loader = torch.utils.data.DataLoader(ds, batch_size=16, sampler=ResumableSampler(n, 3, rank, world, start),
                                         drop_last=True)
    device = DeviceBatches(x[ds.index], y[ds.index], ResumableSampler(n, 3, rank, world, start), 16)
    for i, (a, b) in enumerate(zip(loader, device)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), i
        if i == 40:  # several epochs of this rank (<= 103 // world examples each)
            break


class _Source:
    def __init__(self, train):
        self.train = train

    def load(self):
        return {"train": self.train, "val": self.train, "test": self.train}


@pytest.mark.parametrize("train_split,what", [
    (ArrayDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4), hflip=True), "ArrayDataset with hflip"),
    (torch.utils.data.TensorDataset(torch.zeros(4, 1, 2, 2)), "TensorDataset"),
])
def test_on_device_refuses_what_it_cannot_gather(train_split, what):
    dm = ScoreDataModule(_Source(train_split), batch_size=2, on_device=True)
    dm.setup()
    with pytest.raises(ValueError, match=f"got {what}\\. Set datamodule.on_device=false"):
        dm.train_dataloader()


def test_a_run_resumes_exactly_when_on_device_is_switched_on(make_cfg, tmp_path):
    """Interrupted with the DataLoader at step 6, resumed with on_device=true: the uninterrupted DataLoader run's
    weights (so switching the lever on for a running experiment changes nothing computed)."""
    train(make_cfg([*BASE, "trainer.max_steps=8"], sub="full"))
    train(make_cfg([*BASE, "trainer.max_steps=6"], sub="half"))
    ckpt = tmp_path / "half" / "checkpoints" / "last.ckpt"
    train(make_cfg([*BASE, "trainer.max_steps=8", "datamodule.on_device=true", f"ckpt_path={ckpt}"], sub="resumed"))
    assert_same_weights(tmp_path / "full" / "checkpoints" / "last.ckpt",
                        tmp_path / "resumed" / "checkpoints" / "last.ckpt", 8)
