"""CIFAR-10 from the official python pickle batches (``cifar-10-batches-py/``).

Each batch is a pickled dict with ``b"data"`` (``[N, 3072]`` uint8, rows are R then G then B planes of
32x32) and ``b"labels"`` (``N`` ints). Train is ``data_batch_1..5`` (50000), test is ``test_batch`` (10000).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from scoreflow.data.base import (
    DatasetFormatError,
    DatasetNotFoundError,
    DataSource,
    check_shape,
    corrupt,
    image_splits,
    not_found,
)

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (extract it into root)"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One pickle batch as ``uint8 [N, 3, 32, 32]`` images and ``int64 [N]`` labels."""
    with open(path, "rb") as fh:
        try:
            d = pickle.load(fh, encoding="bytes")
        except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed batch
            raise corrupt(path, e, "re-extract it from cifar-10-python.tar.gz (or re-download that: an interrupted "
                                   "download or copy leaves a truncated file)") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = list(d) if isinstance(d, dict) else type(d).__name__
        raise DatasetFormatError(f"{path}: expected a dict with keys b'data' and b'labels', got {keys}")
    data = np.asarray(d[b"data"])
    labels = np.asarray(d[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DatasetFormatError(
            f"{path}: expected b'data' uint8 [N, 3072] and N labels, got {data.dtype} {list(data.shape)}, {len(labels)}"
        )
    if len(labels) and not 0 <= labels.min() <= labels.max() <= 9:  # another data set in CIFAR-10's layout
        raise DatasetFormatError(f"{path}: CIFAR-10 labels are 0..9, these run {labels.min()}..{labels.max()}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


class CIFAR10(DataSource):
    """CIFAR-10: images ``[3, 32, 32]`` of levels ``0..255`` (``uint8``), labels 0-9.

    Test is the official test batch. ``val_size`` examples are held out of the 50000 training images
    (stratified, seeded; default 1000, leaving 49000). Set ``val_size: 0`` to train on all 50000 as the
    likelihood papers do; ``val`` is then empty.

    Args:
        root: folder holding ``cifar-10-batches-py/`` (or that folder itself).
        shape: must be ``[3, 32, 32]``.
        num_levels: must be 256.
        val_size: examples held out of train for validation.
        seed: seed of the hold-out.
        hflip: random horizontal flip of train images (Song et al. 2021b train CIFAR-10 with flips).
    """

    name = "cifar10"
    class_names = CIFAR10_CLASSES
    num_classes = 10

    def __init__(
        self,
        root: str,
        shape: Sequence[int] = (3, 32, 32),
        num_levels: int | None = 256,
        val_size: int = 1000,
        seed: int = 0,
        hflip: bool = True,
    ):
        super().__init__()
        self._configure(shape, num_levels, 256, root=root, val_size=val_size, seed=seed, hflip=hflip)

    def _check_shape(self) -> None:
        check_shape(self.name, self.shape, (3, 32, 32))  # the files' only shape: refused before anything is read

    def _batch_dir(self) -> Path:
        dirs = [self.root / CIFAR10_DIR, self.root]
        for d in dirs:
            if all((d / f).is_file() for f in (*CIFAR10_TRAIN, CIFAR10_TEST)):
                return d
        layout = f"<root>/{CIFAR10_DIR}/{{{', '.join(CIFAR10_TRAIN)}, {CIFAR10_TEST}}} (python pickle batches)"
        err = not_found("CIFAR-10", dirs, layout, CIFAR10_URL)
        partial = [d for d in dirs if any((d / f).is_file() for f in (*CIFAR10_TRAIN, CIFAR10_TEST))]
        if partial:  # some batches are there: say which are not (an interrupted download or copy)
            missing = [f for f in (*CIFAR10_TRAIN, CIFAR10_TEST) if not (partial[0] / f).is_file()]
            err = DatasetNotFoundError(f"CIFAR-10 incomplete in {partial[0]}: missing {', '.join(missing)}.\n"
                                       f"{err}")
        raise err

    def _load(self) -> dict[str, Dataset]:
        d = self._batch_dir()
        parts = [read_cifar_batch(d / f) for f in CIFAR10_TRAIN]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        test = read_cifar_batch(d / CIFAR10_TEST)
        check_shape(self.name, self.shape, x.shape[1:])
        return image_splits(x, y, self.hflip, holdout=(self.val_size, 0), seed=self.seed, test=test)
