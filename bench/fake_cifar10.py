"""Write a stand-in CIFAR-10 (random pixels) in the official python-pickle layout, for throughput runs of the real
``train.py`` on machines without the dataset (a lent GPU has no internet). Not for bits/dim: the pixels are noise.

    python bench/fake_cifar10.py DIR [--per-batch 10000]   # then: train.py data=cifar10 data.root=DIR
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from scoreflow.data.cifar import CIFAR10_DIR, CIFAR10_TEST, CIFAR10_TRAIN


def write(root: Path, per_batch: int = 10000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    out = Path(root) / CIFAR10_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name in (*CIFAR10_TRAIN, CIFAR10_TEST):
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, per_batch).tolist()}
        with open(out / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root")
    p.add_argument("--per-batch", type=int, default=10000, help="images per batch file (CIFAR-10: 10000)")
    a = p.parse_args()
    print(f"wrote {write(Path(a.root), a.per_batch)}: 5 train batches + test_batch of {a.per_batch} random images")


if __name__ == "__main__":
    main()
