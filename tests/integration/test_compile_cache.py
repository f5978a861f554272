"""``compile_cache_dir``: with ``module.compile`` Inductor's cache moves to the configured folder (unless the user
exported ``TORCHINDUCTOR_CACHE_DIR``); without compilation, or with ``compile_cache_dir: null``, nothing changes.
The slow test compiles for real (Inductor on CPU) and shows the second run loading the first one's graph."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from scoreflow.tasks.common import use_compile_cache


def _cfg(compile_, cache):
    return OmegaConf.create({"module": {"compile": compile_}, "compile_cache_dir": cache})


@pytest.fixture
def default_env(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing Lightning leaves


def test_compile_moves_the_cache(tmp_path, default_env):
    import os

    assert use_compile_cache(_cfg(True, str(tmp_path / "cc"))) == tmp_path / "cc"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc") and (tmp_path / "cc").is_dir()


@pytest.mark.parametrize("compile_,cache", [(False, "x"), (True, None), ("reduce-overhead", "")])
def test_nothing_changes_without_compile_or_folder(tmp_path, default_env, compile_, cache):
    import os

    assert use_compile_cache(_cfg(compile_, cache)) is None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir()


def test_an_exported_cache_folder_wins(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache(_cfg("max-autotune", str(tmp_path / "cc"))) == tmp_path / "mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine") and not (tmp_path / "cc").exists()


@pytest.mark.slow
def test_a_second_run_loads_the_compiled_graph(make_cfg, tmp_path, default_env):
    """Two `debug=fast module.compile=true` runs (real Inductor, CPU) with the same compile_cache_dir: the first
    fills it, the second (after a reset of Dynamo's in-memory state) loads its graph from it."""
    from torch._dynamo.utils import counters

    from scoreflow.tasks.train import train

    args = ["debug=fast", "trainer.accelerator=cpu", "module.compile=true", "test=false", "trainer.max_steps=3",
            "val_every=100", "sample_every=100", f"compile_cache_dir={tmp_path / 'cc'}"]
    train(make_cfg(args, sub="first"))
    assert any((tmp_path / "cc").rglob("*")), "nothing written to the cache"
    torch._dynamo.reset()
    counters.clear()
    train(make_cfg(args, sub="second"))
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1, dict(counters["inductor"])
