"""What every data source shares: the ``DataSource`` interface, an in-memory dataset, seeded splits, errors.

A source is built from its config (constructor arguments == yaml keys) and ``load()`` returns
``{"train", "val", "test"}`` datasets whose items are ``(x, y)``: ``x`` is a ``torch.uint8`` tensor of
integer levels ``0..num_levels-1`` of shape ``shape`` for discrete data (``float32`` for continuous data,
``num_levels=None``) and ``y`` an ``int`` label, ``-1`` when the data has none.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")

# How :meth:`DataSource._configure` stores each optional constructor argument a source shares.
CONFIG_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "root": lambda root: Path(root).expanduser(),
    "val_size": int,
    "test_size": int,
    "seed": int,
    "hflip": bool,
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing: the message says where we looked, the layout, and where to get it."""


class DatasetFormatError(ValueError):
    """A dataset's files exist but do not hold what their format promises (bad magic, keys, sizes)."""


class DatasetShapeError(DatasetFormatError):
    """``data.shape`` (or ``data.num_levels``) differs from what the files hold: a usage error naming the key."""

    def __init__(self, message: str, *, config_key: str, fix: str):
        super().__init__(message)
        self.config_key, self.fix = config_key, fix


class DatasetSplitError(ValueError):
    """The held-out splits (``val_size`` + ``test_size``) leave no training examples."""


def not_found(name: str, looked: Sequence[Path | str], layout: str, source: str) -> DatasetNotFoundError:
    """Build the standard missing-dataset error."""
    where = ", ".join(str(p) for p in looked)
    return DatasetNotFoundError(
        f"{name} not found. Looked for: {where}.\nExpected layout: {layout}\nGet it from: {source}"
    )


def incomplete(
    name: str, folder: Path | str, missing: Sequence[str], err: DatasetNotFoundError
) -> DatasetNotFoundError:
    """The missing-dataset error of a layout that is partly there (an interrupted download, copy or extraction):
    which members are missing from ``folder`` first, then ``err``'s where-we-looked, layout and source."""
    return DatasetNotFoundError(f"{name} incomplete in {folder}: missing {', '.join(missing)}.\n{err}")


def corrupt(path: Path | str, exc: BaseException, fix: str, key: str | None = None) -> DatasetFormatError:
    """The error of a file that exists but cannot be decoded (truncated, or not what its name says); ``key``: the
    config key that names the file, where it is not ``data.root``."""
    err = DatasetFormatError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); {fix}")
    if key is not None:
        err.config_key = key
    return err


def as_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A config shape (list, tuple or OmegaConf ``ListConfig``) as a tuple of positive ints."""
    out = tuple(int(s) for s in shape)
    if not out or any(s <= 0 for s in out):
        raise ValueError(f"shape must be a non-empty list of positive ints, got {list(shape)}")
    return out


def check_shape(name: str, expected: tuple[int, ...], loaded: Sequence[int]) -> None:
    """Raise if the configured ``shape`` differs from the shape of one loaded example."""
    if tuple(expected) != tuple(loaded):  # (a plain ValueError: a traceback, exit 1, after the model was built)
        shape = ",".join(str(int(s)) for s in loaded)
        raise DatasetShapeError(f"{name}: data.shape={list(expected)} does not match the data, whose examples have "
                                f"shape {list(loaded)}", config_key="data.shape",
                                fix=f"'data.shape=[{shape}]' (or data files of the configured shape)")


def check_num_levels(name: str, configured: int | None, native: int | None) -> int | None:
    """The data decides ``num_levels`` (it fixes the bits/dim constant ``D log K``); a different value is an error."""
    if configured != native:
        raise DatasetShapeError(f"{name}: data.num_levels={configured}, but the data have {native} levels",
                                config_key="data.num_levels", fix=f"data.num_levels={native}")
    return native


def seeded_split(n: int, sizes: Sequence[int], seed: int, labels: Tensor | None = None) -> list[Tensor]:
    """Split ``range(n)`` into ``len(sizes) + 1`` disjoint index sets: the given sizes, then the rest.

    The split depends only on ``(n, sizes, seed, labels)``. With ``labels`` (all ``>= 0``) it is stratified:
    a seeded shuffle within each class, then the classes are interleaved by within-class rank, so every
    prefix (hence every split, and every prefix of a split) holds each class in proportion to its frequency
    (to within one example per class). The index tensors (``int64``) keep that order rather than being sorted,
    so evaluating "the first N" of ``val`` or ``test`` is still a representative sample.
    """
    if any(s < 0 for s in sizes) or sum(sizes) > n:
        raise ValueError(f"cannot take splits of sizes {list(sizes)} from {n} examples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    if labels is not None and n > 0 and int(labels.min()) >= 0:
        lab = labels.long()[perm]
        order = torch.argsort(lab, stable=True)
        perm, lab = perm[order], lab[order]
        counts = torch.bincount(lab)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(n) - start[lab]
        frac = (rank.double() + 0.5) / counts[lab].double()
        perm = perm[torch.argsort(frac, stable=True)]
    bounds = np.cumsum([0, *sizes, n - sum(sizes)])
    return [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of a batch ``[B, C, H, W]`` left-right with probability 1/2, one uniform draw per image
    from ``generator`` (torch's global RNG when ``None``); other shapes (vectors, 2-D points) are returned
    unchanged and draw nothing. The one flip augmentation of scoreflow (datasets and Lightning modules)."""
    if x.ndim != 4:
        return x
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class ArrayDataset(Dataset):
    """In-memory examples ``x[index[i]], y[index[i]]`` with an optional random horizontal flip.

    Args:
        x: ``[N, *shape]`` tensor (``uint8`` levels for images, ``float32`` for continuous data).
        y: ``[N]`` integer labels (``-1`` for none).
        index: optional ``[M]`` indices into ``x`` (a view of a split without copying the images).
        hflip: flip an image ``[C, H, W]`` left-right with probability 1/2 per access (:func:`random_hflip`).
            Uses torch's global RNG, which ``DataLoader`` seeds differently in every worker.
    """

    def __init__(self, x: Tensor, y: Tensor, index: Tensor | None = None, hflip: bool = False):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} examples but {len(y)} labels")
        self.x, self.y = x, y.long()
        self.index = index
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.x) if self.index is None else len(self.index)

    def digest(self, chunk: int = 4096) -> str:
        """BLAKE2b (16 bytes, hex) of the examples in order: their bytes, shape, dtype and number; not the labels,
        not the flips. Equal for the same examples wherever they were read from; read in chunks of ``chunk``
        examples (no copy of the split; about 0.1 s for CIFAR-10's test split)."""
        import hashlib

        h = hashlib.blake2b(digest_size=16)
        n = len(self)
        h.update(f"{tuple(self.x.shape[1:])} {self.x.dtype} {n}".encode())
        for a in range(0, n, chunk):
            part = self.x[a : a + chunk] if self.index is None else self.x[self.index[a : a + chunk]]
            h.update(part.contiguous().numpy().tobytes())
        return h.hexdigest()

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} examples")
        j = i if self.index is None else int(self.index[i])
        x = self.x[j]
        if self.hflip:
            x = random_hflip(x[None])[0]
        return x, int(self.y[j])


class DataSource(ABC):
    """A configured dataset. Subclasses set ``shape``, ``num_levels``, ``class_names`` and implement ``_load``.

    Attributes:
        shape: shape of one example, ``(C, H, W)`` or ``(D,)``.
        num_levels: ``K`` for integer data in ``0..K-1`` (the dequantizer maps it to ``(k + u) / K``);
            ``None`` for continuous data.
        class_names: label names where known, else ``None``.
        num_classes: number of labels (``0`` for unlabelled data, whose ``y`` is ``-1``).
    """

    name: str = "data"
    shape: tuple[int, ...]
    num_levels: int | None
    class_names: tuple[str, ...] | None = None
    num_classes: int = 0

    def __init__(self) -> None:
        self._splits: dict[str, Dataset] | None = None

    def _configure(
        self, shape: Sequence[int], num_levels: int | None, native_levels: int | None, **options: Any
    ) -> None:
        """Store the constructor arguments the sources share (each subclass keeps its own signature and defaults).

        In this order: ``root`` (if given) user-expanded; ``shape`` as a tuple (:func:`as_shape`), then checked by
        :meth:`_check_shape`; ``num_levels``, which must be the data's ``native_levels`` (:func:`check_num_levels`);
        then the other ``options`` in the order given, stored as :data:`CONFIG_OPTIONS` says (``val_size``,
        ``test_size`` and ``seed`` as ints, ``hflip`` as a bool).
        """
        unknown = set(options) - set(CONFIG_OPTIONS)
        if unknown:
            raise TypeError(f"{type(self).__name__}._configure: unknown options {sorted(unknown)}")
        if "root" in options:
            self.root = CONFIG_OPTIONS["root"](options.pop("root"))
        self.shape = as_shape(shape)
        self._check_shape()
        self.num_levels = check_num_levels(self.name, num_levels, native_levels)
        for key, value in options.items():
            setattr(self, key, CONFIG_OPTIONS[key](value))

    def _check_shape(self) -> None:
        """Raise ``ValueError`` if the configured ``self.shape`` does not suit this source (any shape does here)."""
        return None

    @property
    def dim(self) -> int:
        """Number of dimensions ``D`` of one example (the bits/dim denominator)."""
        return math.prod(self.shape)

    def load(self) -> dict[str, Dataset]:
        """``{"train", "val", "test"}`` datasets; loaded once, then cached."""
        if self._splits is None:
            splits = self._load()
            if tuple(splits) != SPLITS:
                raise RuntimeError(f"{type(self).__name__}._load returned splits {tuple(splits)}, expected {SPLITS}")
            self._splits = splits
        return self._splits

    @abstractmethod
    def _load(self) -> dict[str, Dataset]:
        """Read the data and build the three splits."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={list(self.shape)}, num_levels={self.num_levels})"


def image_splits(
    x: Tensor,
    y: Tensor,
    hflip: bool,
    *,
    holdout: tuple[int, int],
    seed: int,
    test: tuple[Tensor, Tensor] | None = None,
    test_at: int | None = None,
) -> dict[str, Dataset]:
    """Build the three splits of in-memory images; only ``train`` flips.

    ``holdout = (val_size, test_size)`` examples are drawn from ``x`` with a stratified seeded split (``test_size``
    must be 0 when an official ``test`` set is given); the rest is ``train``. The test block is taken at position
    ``test_at`` of the seeded order (a source passes its default ``val_size``), so the test images depend on
    ``(len(x), test_size, seed, labels)`` only: another ``val_size`` (``val_size=0`` to train on more) keeps the
    test set, so runs that differ in it are still compared on the same images. With ``val_size == test_at`` the
    splits are those of releases that took ``val`` first, then ``test``. ``None``: ``val_size`` (that older rule).
    """
    val_size, test_size = holdout
    if test is not None and test_size:
        raise ValueError("an official test split is given; test_size must be 0")
    if val_size + test_size >= len(x):
        raise DatasetSplitError(
            f"the data hold {len(x)} examples: holding out val_size={val_size} + test_size={test_size} leaves "
            f"{max(len(x) - val_size - test_size, 0)} to train on")
    order = seeded_split(len(x), [], seed, labels=y)[0]  # the stratified seeded order of every example
    at = val_size if test_at is None else max(0, min(int(test_at), len(x) - test_size))
    test_idx = order[at : at + test_size]
    rest = torch.cat([order[:at], order[at + test_size :]])
    val_idx, train_idx = rest[:val_size], rest[val_size:]
    out = {
        "train": ArrayDataset(x, y, train_idx, hflip=hflip),
        "val": ArrayDataset(x, y, val_idx),
        "test": ArrayDataset(x, y, test_idx) if test is None else ArrayDataset(*test),
    }
    return out
