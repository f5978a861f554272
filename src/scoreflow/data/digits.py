"""The embedded default: scikit-learn's bundled 8x8 handwritten digits (no download, 17 grey levels)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from scoreflow.data.base import DataSource, as_shape, check_num_levels, check_shape, image_splits

DIGITS_SHAPE = (1, 8, 8)
DIGITS_LEVELS = 17  # pixel values are counts 0..16 of the 4x4 blocks of the 32x32 originals


class Digits(DataSource):
    """``sklearn.datasets.load_digits``: 1797 images ``[1, 8, 8]`` of levels ``0..16`` (``uint8``), labels 0-9.

    There is no official split, so a stratified seeded one is drawn: by default
    train 1297 / val 100 / test 400. The test set is the largest the small corpus affords while leaving
    most of it for training; 400 x 64 dims keeps the standard error of the test bits/dim near 0.01.

    Args:
        shape: must be ``[1, 8, 8]``.
        num_levels: must be 17.
        val_size, test_size: hold-out sizes; train gets the rest.
        seed: split seed.
        hflip: random horizontal flip of train images (off by default: digits are not mirror-symmetric).
    """

    name = "digits"
    class_names = tuple(str(i) for i in range(10))
    num_classes = 10

    def __init__(
        self,
        shape: Sequence[int] = DIGITS_SHAPE,
        num_levels: int | None = DIGITS_LEVELS,
        val_size: int = 100,
        test_size: int = 400,
        seed: int = 0,
        hflip: bool = False,
    ):
        super().__init__()
        self.shape = as_shape(shape)
        check_shape(self.name, self.shape, DIGITS_SHAPE)
        self.num_levels = check_num_levels(self.name, num_levels, DIGITS_LEVELS)
        self.val_size, self.test_size, self.seed, self.hflip = int(val_size), int(test_size), int(seed), bool(hflip)

    def _load(self) -> dict[str, Dataset]:
        from sklearn.datasets import load_digits  # imported here: sklearn is slow to import

        d = load_digits()
        x = torch.from_numpy(d.images).round().to(torch.uint8).reshape(-1, *DIGITS_SHAPE)
        y = torch.from_numpy(d.target).long()
        return image_splits(x, y, self.hflip, holdout=(self.val_size, self.test_size), seed=self.seed,
                            test_at=100)  # the default val_size: test independent of val_size
