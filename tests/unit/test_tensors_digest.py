"""The one tensor digest (scoreflow.utils.tensors_digest) behind the two digests that earlier releases stored:
an evaluation folder's ``weights_digest`` and a flow run's ``dequant_run.score_digest``. Each is pinned to the value
the release that wrote it computed, and checked against a hashlib computation written out here."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from scoreflow.tasks.checkpoint import weights_digest
from scoreflow.tasks.validate import read_checkpoint, score_weights_digest
from scoreflow.utils import tensors_digest

RELEASE = Path(__file__).resolve().parents[1] / "data" / "release-53daf68_digits_tiny.ckpt"


def _written_out(tensors: dict[str, torch.Tensor], h: Any, sep: str) -> str:
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}{sep}{t.dtype}{sep}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(bytes(t.reshape(-1).view(torch.uint8).tolist()))
    return h.hexdigest()


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2).to(torch.bfloat16)
    m.register_buffer("e", torch.zeros(0))
    return m


def test_weights_digest_is_the_one_earlier_releases_stored() -> None:
    m = _module()  # bfloat16 (no numpy dtype) and an empty buffer
    assert weights_digest(m) == "2ff17c086bd527f9df7582e03787388d"  # the value release 70ea1f6 computed
    assert weights_digest(m) == _written_out(m.state_dict(), hashlib.blake2b(digest_size=16), ":")


def test_score_digest_is_the_one_earlier_releases_stored() -> None:
    ckpt = read_checkpoint(RELEASE)
    assert score_weights_digest(ckpt) == "848c58846b59c1aaed1f05b3f586ea628f7e8ec9d028083e455d60ae797a0d95"
    weights = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("score_model.")}
    weights.update({k: v for k, v in ckpt["ema"]["shadow"].items() if k.startswith("score_model.")})
    assert score_weights_digest(ckpt) == _written_out(weights, hashlib.sha256(), "|")


@pytest.mark.parametrize("change", ["value", "name", "dtype", "shape"])
def test_any_change_changes_the_digest(change: str) -> None:
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    b = {
        "value": {"w": a["w"].clone().index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(1e-7))},
        "name": {"v": a["w"]},
        "dtype": {"w": a["w"].view(torch.int32)},  # the same bytes, another dtype
        "shape": {"w": a["w"].reshape(3, 2)},  # the same bytes, another shape
    }[change]
    assert tensors_digest(a) != tensors_digest(b)
    assert tensors_digest(a, "sha256", "|") != tensors_digest(b, "sha256", "|")
