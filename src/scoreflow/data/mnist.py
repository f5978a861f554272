"""MNIST from the official IDX files (``train-images-idx3-ubyte[.gz]`` and friends).

IDX (LeCun et al.): a big-endian header ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` uint32 sizes,
then the array in C order. Images are ``idx3`` (magic ``0x00000803``), labels ``idx1`` (``0x00000801``).
Fashion-MNIST ships the same file names and format, so its root loads too (with digit class names).
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from scoreflow.data.base import (
    DatasetFormatError,
    DataSource,
    check_shape,
    corrupt,
    image_splits,
    incomplete,
    not_found,
)

# IDX type codes -> big-endian numpy dtypes
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
MNIST_URL = "https://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped, detected by its magic bytes) into a native-endian array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:  # truncated (EOFError), BadGzipFile (OSError), bad deflate data
            raise corrupt(path, e, "re-download it (an interrupted download leaves a truncated .gz)") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}); re-download it "
                                 "(the four MNIST files are IDX files, optionally gzipped)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:  # cut inside the header: the dimensions themselves are missing
        raise DatasetFormatError(f"{path} is truncated or corrupt: {len(raw)} bytes, shorter than its {header}-byte "
                                 "header; re-download it (an interrupted download leaves a truncated file)")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetFormatError(f"{path} is truncated or corrupt: its header says dims {list(dims)} ({expected} "
                                 f"bytes); the file has {len(raw)}; re-download it (an interrupted download leaves a "
                                 "truncated file)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx_files(root: Path, names: dict[str, str], title: str, url: str) -> dict[str, Path]:
    """Locate ``names`` (with or without ``.gz``) in ``root``, ``root/MNIST/raw`` or ``root/raw``.

    A folder holding some of the files but not all is reported as incomplete, naming the missing ones."""
    dirs = [root, root / "MNIST" / "raw", root / "raw"]
    partial: list[tuple[Path, list[str]]] = []
    for d in dirs:
        found = {k: next((d / (n + s) for s in ("", ".gz") if (d / (n + s)).is_file()), None) for k, n in names.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        if any(found.values()):
            partial.append((d, [f"{names[k]}[.gz]" for k, f in found.items() if f is None]))
    layout = "<root>/{" + ", ".join(names.values()) + "}[.gz] (the four official IDX files, gzipped or not)"
    err = not_found(title, dirs, layout, url)
    if partial:  # some files are there: say which are not (an interrupted download or copy)
        err = incomplete(title, *partial[0], err)
    raise err


class MNIST(DataSource):
    """MNIST: 60000 train + 10000 test images ``[1, 28, 28]`` of levels ``0..255`` (``uint8``), labels 0-9.

    The official test set is the test split; ``val_size`` examples are held out of the official train set
    with a stratified seeded split (default 5000, leaving 55000 for training).

    Args:
        root: folder with the IDX files (also searched: ``root/MNIST/raw``, torchvision's layout).
        shape: must be ``[1, 28, 28]``.
        num_levels: must be 256.
        val_size: examples held out of train for validation.
        seed: seed of the hold-out.
        hflip: random horizontal flip of train images.
    """

    name = "mnist"
    class_names = tuple(str(i) for i in range(10))
    num_classes = 10

    def __init__(
        self,
        root: str,
        shape: Sequence[int] = (1, 28, 28),
        num_levels: int | None = 256,
        val_size: int = 5000,
        seed: int = 0,
        hflip: bool = False,
    ):
        super().__init__()
        self._configure(shape, num_levels, 256, root=root, val_size=val_size, seed=seed, hflip=hflip)

    def _read(self, images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
            raise DatasetFormatError(
                f"{images} / {labels}: expected uint8 images [N, H, W] and N labels, got {x.dtype} {list(x.shape)} "
                f"and {list(y.shape)}"
            )
        if len(y) and int(y.max()) > 9:  # EMNIST and the like: more classes than MNIST's 10 (a classifier failed)
            raise DatasetFormatError(f"{labels}: MNIST labels are 0..9, these run {int(y.min())}..{int(y.max())}")
        return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))

    def _load(self) -> dict[str, Dataset]:
        f = find_idx_files(self.root, MNIST_FILES, "MNIST", MNIST_URL)
        x, y = self._read(f["train_images"], f["train_labels"])
        test = self._read(f["test_images"], f["test_labels"])
        check_shape(self.name, self.shape, x.shape[1:])
        return image_splits(x, y, self.hflip, holdout=(self.val_size, 0), seed=self.seed, test=test)
