import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
# One thread: on the 2-core CI machine, tiny-tensor tests run ~10x faster than with 2 contending threads.
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def graphs(monkeypatch):
    """``torch.compile`` with a backend that records each graph it is given (and runs it as is), whatever mode:
    one entry per ``torch.compile`` call, ``{"mode", "dynamic", "graphs": [input shapes of each compilation]}``."""
    seen: list[dict] = []
    real = torch.compile

    def counting(fn, *, mode=None, dynamic=None, **kw):
        seen.append({"mode": mode, "dynamic": dynamic, "graphs": []})
        record = seen[-1]["graphs"]

        def backend(gm, example_inputs):
            record.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
            return gm.forward

        return real(fn, backend=backend, dynamic=dynamic, **kw)

    monkeypatch.setattr(torch, "compile", counting)
    torch._dynamo.reset()
    yield seen
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _inductor_cache_dir_restored():
    """A run with ``module.compile`` points ``TORCHINDUCTOR_CACHE_DIR`` at its ``compile_cache_dir``: put it back."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    yield
    if before is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
