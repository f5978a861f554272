"""``datamodule.on_device`` on a CUDA device: the batches gathered on the GPU equal the DataLoader's, and drawing
one within an epoch issues no host synchronisation (``pytest -m gpu tests/gpu``)."""

import pytest
import torch
from torch.utils.data import DataLoader

from scoreflow.data.base import ArrayDataset
from scoreflow.lit.datamodule import DeviceBatches, ResumableSampler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_device_batches_on_cuda_equal_the_dataloader_and_do_not_sync():
    n, b = 1000, 64
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n)
    ds = ArrayDataset(x, y, torch.randperm(n, generator=g))
    loader = iter(DataLoader(ds, batch_size=b, sampler=ResumableSampler(n, 5, 0, 1, 300), drop_last=True))
    batches = iter(DeviceBatches(x[ds.index].cuda(), y[ds.index].cuda(), ResumableSampler(n, 5, 0, 1, 300), b))
    got = [next(batches)]  # the first one copies the epoch's indices to the device
    torch.cuda.set_sync_debug_mode("error")
    try:
        got += [next(batches) for _ in range(8)]  # (1000 - 300) // 64 = 10 full batches left in this epoch
    finally:
        torch.cuda.set_sync_debug_mode(0)
    got += [next(batches) for _ in range(20)]  # across the epoch boundary
    for i, (xb, yb) in enumerate(got):
        ref = next(loader)
        assert xb.is_cuda and yb.is_cuda
        assert torch.equal(xb.cpu(), ref[0]) and torch.equal(yb.cpu(), ref[1]), i
