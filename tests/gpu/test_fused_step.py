"""The fused guard's training step issues no host sync on a CUDA device (``pytest -m gpu tests/gpu``)."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.integration.test_fused_guard import _module

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (sync debug mode is CUDA's)"),
]


def test_fused_training_step_has_no_host_sync(tmp_path):
    module = _module(True, nan_calls=(3,))
    step = module.training_step

    def strict(batch, batch_idx):
        batch = [b.cuda(non_blocking=True) for b in batch]  # the transfer itself is not the step's
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    module.training_step = strict
    data = TensorDataset(torch.randint(0, 4, (64, 1, 2, 2)), torch.zeros(64))
    trainer = pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, accelerator="gpu", devices=1, log_every_n_steps=1000)
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert trainer.global_step == 6 and module.bad_steps_total == 1
