import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
# One thread: on the 2-core CI machine, tiny-tensor tests run ~10x faster than with 2 contending threads.
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
