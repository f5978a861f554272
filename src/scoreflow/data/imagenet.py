"""Downsampled ImageNet (32x32 by default) in either of its two public layouts.

* ``png`` -- the original release of van den Oord et al. 2016 used by the likelihood papers:
  ``<root>/train_32x32/*.png`` (1,281,149) and ``<root>/valid_32x32/*.png`` (49,999), no labels.
* ``npz`` -- the newer Downsampled-ImageNet release of Chrabaszcz et al. 2017:
  ``train_data_batch_1..10.npz`` and ``val_data.npz``, each with ``data`` (``[N, 3*R*R]`` uint8, the R, G and
  B planes in turn, i.e. CHW order) and ``labels`` (1-based). Also accepted: the same files inside
  ``Imagenet32_train_npz/`` and ``Imagenet32_val_npz/``, and the older pickled batches without ``.npz``.

Both keep the whole set in memory as uint8 (3.9 GB at 32x32). The official validation set is the test
split, as in the papers; ``val`` is a seeded hold-out of train.

The two releases downsample differently, so bits/dim measured on one are not comparable with the other.
The likelihood papers (PixelRNN, Glow, Flow++, ScoreFlow's 3.76 bits/dim; TFDS ``downsampled_imagenet/32x32``)
use van den Oord's; ``layout`` also accepts the release names ``van_den_oord`` (= ``png``) and ``chrabaszcz``
(= ``npz``), and the release read is logged and kept in ``release_used``.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from scoreflow.data.base import (
    DatasetFormatError,
    DataSource,
    check_shape,
    image_splits,
    not_found,
)

log = logging.getLogger(__name__)

NPZ_TRAIN_BATCHES = 10  # train_data_batch_1..10 of the npz release (Chrabaszcz et al. 2017)
RELEASE_OF_LAYOUT = {
    "png": "van den Oord et al. 2016 (the original release, the one the likelihood papers report on)",
    "npz": "Chrabaszcz et al. 2017 (the newer release; bits/dim not comparable with the likelihood papers')",
}
LAYOUT_OF_RELEASE = {"van_den_oord": "png", "chrabaszcz": "npz"}

IMAGENET_URL = (
    "https://image-net.org/download-images.php (Downsampled ImageNet: Imagenet32_train_npz.zip and "
    "Imagenet32_val_npz.zip; the original van den Oord train_32x32.tar / valid_32x32.tar)"
)


def _read_batch(path: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    """One npz (or pickled) batch as ``uint8 [N, 3, side, side]`` and 0-based ``int64 [N]`` labels."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                data, labels = z["data"], z["labels"]
        else:
            with open(path, "rb") as fh:
                d = pickle.load(fh)
            data, labels = d["data"], d["labels"]
    except (KeyError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise DatasetFormatError(f"{path}: expected a batch with keys 'data' and 'labels' ({e!r})") from e
    data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64).reshape(-1)
    other = int(round((data.shape[-1] / 3) ** 0.5))
    if data.ndim == 2 and data.shape[1] == 3 * other * other != 3 * side * side:
        check_shape(f"{path.name}", (3, side, side), (3, other, other))
    if data.dtype != np.uint8 or data.shape != (len(labels), 3 * side * side) or (len(labels) and labels.min() < 1):
        raise DatasetFormatError(
            f"{path}: expected 'data' uint8 [N, {3 * side * side}] and 1-based labels, "
            f"got {data.dtype} {list(data.shape)} and {len(labels)} labels"
        )
    return data.reshape(-1, 3, side, side), labels - 1


def _read_pngs(folder: Path, side: int) -> np.ndarray:
    """All PNGs under ``folder`` (sorted by path) as ``uint8 [N, 3, side, side]``."""
    files = sorted(folder.rglob("*.png"))
    if not files:
        raise DatasetFormatError(f"{folder} holds no .png files")
    out = np.empty((len(files), 3, side, side), dtype=np.uint8)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"))
        check_shape(str(f), (3, side, side), (3, *a.shape[:2]))
        out[i] = a.transpose(2, 0, 1)
        if (i + 1) % 200_000 == 0:
            log.info("read %d / %d PNGs from %s", i + 1, len(files), folder)
    return out


class DownsampledImageNet(DataSource):
    """ImageNet downsampled to ``[3, R, R]`` (R=32 by default), levels ``0..255`` (``uint8``).

    Labels are 0-based class indices in the npz layout and ``-1`` in the png layout (which has none).
    ``layout`` is ``"auto"`` (npz if present, else png), ``"npz"`` or ``"png"``; the one used is logged.

    Args:
        root: folder with one of the layouts above.
        shape: ``[3, R, R]``; ``R`` picks the file names (``train_32x32``, ``Imagenet64_train_npz``, ...).
        num_levels: must be 256.
        val_size: examples held out of train for validation (stratified when labelled).
        seed: seed of the hold-out.
        hflip: random horizontal flip of train images.
        layout: ``"auto"``, ``"npz"`` or ``"png"``, or the release by name: ``"chrabaszcz"`` (npz) or
            ``"van_den_oord"`` (png).
    """

    name = "imagenet"
    num_classes = 1000

    def __init__(
        self,
        root: str,
        shape: Sequence[int] = (3, 32, 32),
        num_levels: int | None = 256,
        val_size: int = 10000,
        seed: int = 0,
        hflip: bool = False,
        layout: str = "auto",
    ):
        super().__init__()
        self._configure(shape, num_levels, 256, root=root, val_size=val_size, seed=seed, hflip=hflip)
        layout = LAYOUT_OF_RELEASE.get(layout, layout)
        if layout not in ("auto", "npz", "png"):
            raise ValueError(f"{self.name}: layout must be 'auto', 'npz', 'png', 'van_den_oord' or 'chrabaszcz', "
                             f"got {layout!r}")
        self.layout = layout
        self.layout_used: str | None = None

    def _check_shape(self) -> None:
        """Square RGB images only; the side names the source (``imagenet32``, ``imagenet64``)."""
        if len(self.shape) != 3 or self.shape[0] != 3 or self.shape[1] != self.shape[2]:
            raise ValueError(f"{self.name}: shape must be [3, R, R], got {list(self.shape)}")
        self.side = self.shape[-1]
        self.name = f"imagenet{self.side}"

    @property
    def release_used(self) -> str | None:
        """Which public release was read (after :meth:`load`), e.g. ``"van den Oord et al. 2016 (...)"``."""
        return None if self.layout_used is None else RELEASE_OF_LAYOUT[self.layout_used]

    def _npz_files(self) -> tuple[list[Path], Path] | None:
        r = self.side
        for ext in (".npz", ""):
            sub = "_npz" if ext else ""
            train_dirs = [self.root, self.root / f"Imagenet{r}_train{sub}"]
            val_dirs = [self.root, self.root / f"Imagenet{r}_val{sub}"]
            train_dir = next((d for d in train_dirs if (d / f"train_data_batch_1{ext}").is_file()), None)
            val = next((d / f"val_data{ext}" for d in val_dirs if (d / f"val_data{ext}").is_file()), None)
            if train_dir is not None and val is not None:
                pat = re.compile(rf"train_data_batch_(\d+){re.escape(ext)}$")
                nums = sorted(int(m.group(1)) for p in train_dir.iterdir() if (m := pat.match(p.name)))
                nums = [n for i, n in enumerate(nums) if n == i + 1]  # the consecutive run 1, 2, ...
                return [train_dir / f"train_data_batch_{n}{ext}" for n in nums], val
        return None

    def _png_dirs(self) -> tuple[Path, Path] | None:
        train, valid = self.root / f"train_{self.side}x{self.side}", self.root / f"valid_{self.side}x{self.side}"
        return (train, valid) if train.is_dir() and valid.is_dir() else None

    def _load(self) -> dict[str, Dataset]:
        npz = self._npz_files() if self.layout in ("auto", "npz") else None
        png = self._png_dirs() if self.layout in ("auto", "png") and npz is None else None
        if npz is not None:
            train_files, val_file = npz
            log.info(
                "%s: using the npz layout (%d train batches, %s) under %s: release %s",
                self.name,
                len(train_files),
                val_file.name,
                self.root,
                RELEASE_OF_LAYOUT["npz"],
            )
            if len(train_files) < NPZ_TRAIN_BATCHES:
                log.warning("%s: only %d of the release's %d train batches (train_data_batch_1..%d) are under %s: "
                            "training on that fraction of the training set", self.name, len(train_files),
                            NPZ_TRAIN_BATCHES, NPZ_TRAIN_BATCHES, train_files[0].parent)
            parts = [_read_batch(f, self.side) for f in train_files]
            x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
            tx, ty = _read_batch(val_file, self.side)
            self.layout_used = "npz"
        elif png is not None:
            log.info("%s: using the png layout (%s, %s) under %s: release %s", self.name, png[0].name, png[1].name,
                     self.root, RELEASE_OF_LAYOUT["png"])
            x, tx = _read_pngs(png[0], self.side), _read_pngs(png[1], self.side)
            y, ty = np.full(len(x), -1, dtype=np.int64), np.full(len(tx), -1, dtype=np.int64)
            self.layout_used = "png"
        else:
            r = self.side
            layout = (
                f"either <root>/train_data_batch_{{1..10}}.npz + <root>/val_data.npz (also inside "
                f"Imagenet{r}_train_npz/ and Imagenet{r}_val_npz/), or <root>/train_{r}x{r}/*.png + "
                f"<root>/valid_{r}x{r}/*.png"
            )
            looked = [
                self.root / "train_data_batch_1.npz",
                self.root / f"Imagenet{r}_train_npz",
                self.root / f"train_{r}x{r}",
            ]
            raise not_found(f"{self.name} (layout={self.layout})", looked, layout, IMAGENET_URL)
        test = (torch.from_numpy(tx), torch.from_numpy(ty))
        return image_splits(
            torch.from_numpy(x), torch.from_numpy(y), self.hflip, holdout=(self.val_size, 0), seed=self.seed, test=test
        )


ImageNet32 = DownsampledImageNet
