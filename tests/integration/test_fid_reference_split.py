"""FID's reference statistics are those of the whole training split: a run's validation hold-out (data.val_size,
1000 CIFAR-10 images by default) is not left out of them (before 2026-11-28 they came from the 49000 images the run
trained on; every published CIFAR-10 FID uses all 50000). Where the test split is carved from the same pool
(digits' test_size), the run's split is kept, so no test image enters the reference."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import torch
from omegaconf import OmegaConf

from scoreflow.tasks.build import build_data
from scoreflow.tasks.fid import reference_stats


class CountingFeatures(torch.nn.Module):
    identity = "test-count"

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        return images.float().flatten(1)[:, :4] / 255


def _lm(data: dict):
    cfg = OmegaConf.create({"data": data})
    return SimpleNamespace(cfg=cfg, source=build_data(cfg), module=SimpleNamespace(num_levels=256))


def test_cifar10_reference_uses_every_training_image_whatever_the_runs_holdout(tmp_path):
    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as fh:
            pickle.dump({b"labels": [0, 1, 2, 3, 4, 5], b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8)}, fh)
    data = {"_target_": "scoreflow.data.CIFAR10", "root": str(tmp_path / "cifar10"), "val_size": 5, "hflip": True}
    lm = _lm(data)
    assert len(lm.source.load()["train"]) == 25  # the run trained on 30 - 5
    fid = OmegaConf.create({"cache_dir": str(tmp_path / "cache"), "feature_batch_size": 7})
    features = CountingFeatures()
    stats = reference_stats(lm, fid, features)
    assert stats.n == 30 and sum(len(x) for x in features.seen) == 30
    full = build_data(OmegaConf.create({"data": {**data, "val_size": 0}})).load()["train"]
    want = torch.stack([torch.as_tensor(full[i][0]) for i in range(30)]).to(torch.uint8)
    assert torch.equal(torch.cat(features.seen), want)  # the 50000-image split in order, not the run's


def test_a_carved_test_split_keeps_the_runs_split(tmp_path):
    data = {"_target_": "scoreflow.data.Digits", "val_size": 100, "test_size": 300}
    lm = _lm(data)
    train = lm.source.load()["train"]
    features = CountingFeatures()
    stats = reference_stats(lm, OmegaConf.create({"cache_dir": str(tmp_path), "feature_batch_size": 64}), features)
    assert stats.n == len(train) == 1797 - 400
