"""Embedded RGB data: patches of the two colour photographs that ship inside scikit-learn (no download).

``sklearn/datasets/images/china.jpg`` and ``flower.jpg`` (427 x 640, 8-bit RGB) are box-downsampled by
``downsample`` and cut into ``P x P`` patches. The splits come from disjoint column bands of each photo
(train | val | test, left to right), so no pixel of a test patch was seen in training. It is the smallest real
colour dataset available offline: enough to train a small model and show colorization (App. I.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from scoreflow.data.base import ArrayDataset, DatasetShapeError, DataSource, not_found

PHOTOS = ("china.jpg", "flower.jpg")


def _photo_dir() -> Path:
    import sklearn  # only its install location is used

    return Path(sklearn.__file__).resolve().parent / "datasets" / "images"


def _patches(img: np.ndarray, size: int, stride: int, x_from: int, x_to: int) -> np.ndarray:
    """The ``size x size`` patches of ``img [H, W, 3]`` inside columns ``[x_from, x_to)``: ``[N, 3, size, size]``."""
    H = img.shape[0]
    out = [
        img[y : y + size, x : x + size].transpose(2, 0, 1)
        for y in range(0, H - size + 1, stride)
        for x in range(x_from, x_to - size + 1, stride)
    ]
    return np.stack(out) if out else np.zeros((0, 3, size, size), np.uint8)


class SklearnPhotos(DataSource):
    """Patches ``[3, P, P]`` (levels ``0..255``) of scikit-learn's two sample photos; label = photo (0 china, 1 flower).

    Args:
        shape: ``[3, P, P]``; P = 16 by default.
        num_levels: must be 256.
        downsample: integer box-downsampling factor applied to the 427 x 640 photos first (4 -> 106 x 160).
        stride: distance between patch corners (patches overlap within a split).
        bands: fractions of each photo's width for ``(train, val)``; test gets the rest, on the right.
        hflip: random horizontal flip of train patches.
    """

    name = "photos"
    class_names = ("china", "flower")
    num_classes = 2

    def __init__(
        self,
        shape: Sequence[int] = (3, 16, 16),
        num_levels: int | None = 256,
        downsample: int = 4,
        stride: int = 2,
        bands: Sequence[float] = (0.7, 0.1),
        hflip: bool = True,
        path: str | None = None,
    ):
        super().__init__()
        self._configure(shape, num_levels, 256)
        self.downsample, self.stride = int(downsample), int(stride)
        self.bands = tuple(float(b) for b in bands)
        if len(self.bands) != 2 or min(self.bands) <= 0 or sum(self.bands) >= 1:
            raise ValueError(f"photos: bands = (train, val) fractions of the width, each > 0, sum < 1; got {bands}")
        self.hflip = bool(hflip)
        self.path = Path(path) if path else None

    def _check_shape(self) -> None:
        """Square RGB patches ``[3, P, P]``."""
        if len(self.shape) != 3 or self.shape[0] != 3 or self.shape[1] != self.shape[2]:
            side = self.shape[-1] if self.shape else 32
            raise DatasetShapeError(f"photos: shape must be [3, P, P], got {list(self.shape)}",
                                    config_key="data.shape", fix=f"'data.shape=[3,{side},{side}]'")

    def _load(self) -> dict[str, Dataset]:
        from PIL import Image

        root = self.path or _photo_dir()
        files = [root / f for f in PHOTOS]
        if not all(f.is_file() for f in files):
            layout = f"{' and '.join(PHOTOS)} (8-bit RGB JPEGs)"
            raise not_found(self.name, [root], layout, "the scikit-learn wheel (pip install scikit-learn)")
        P = self.shape[1]
        parts: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "val": [], "test": []}
        for label, f in enumerate(files):
            with Image.open(f) as im:
                img = np.asarray(im.convert("RGB").reduce(self.downsample))
            W = img.shape[1]
            a = int(round(self.bands[0] * W))
            b = int(round((self.bands[0] + self.bands[1]) * W))
            for split, (lo, hi) in {"train": (0, a), "val": (a, b), "test": (b, W)}.items():
                if hi - lo < P:
                    raise ValueError(f"photos: the {split} band ({hi - lo} px) is narrower than a {P}-px patch")
                parts[split].append((_patches(img, P, self.stride, lo, hi), label))
        out = {}
        for split, items in parts.items():
            x = torch.from_numpy(np.concatenate([p for p, _ in items]))
            y = torch.cat([torch.full((len(p),), lab, dtype=torch.long) for p, lab in items])
            out[split] = ArrayDataset(x, y, hflip=self.hflip and split == "train")
        return out
