"""Any folder of images (searched recursively), or train/ val/ test/ folders of them, resized and center-cropped
to ``shape``, held in memory."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from scoreflow.data.base import (
    ArrayDataset,
    DatasetFormatError,
    DatasetNotFoundError,
    DataSource,
    image_splits,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # PIL's unsigned 16-bit greyscale modes


def to_8bit(im: Image.Image) -> Image.Image:
    """A greyscale image of more than 8 bits per sample as ``L``, by value: 16-bit level ``k`` becomes ``k >> 8``.

    ``k >> 8`` (the high byte) is the standard 16 -> 8 bit reduction, the one PIL itself applies when it reads a
    16-bit RGB file as ``RGB``; PIL's ``convert("L")`` would clip every 16-bit level above 255 to 255 instead.
    Mode ``I`` (32-bit integers: how PIL reads 16-bit PGM and some TIFFs) is taken as 16-bit data. Raises
    :class:`DatasetFormatError` where the range is unknown: ``I`` values outside ``0..65535``, and float (``F``)
    images. Other modes (8 bits per sample) are returned as they are.
    """
    if im.mode in SIXTEEN_BIT_MODES or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DatasetFormatError(
                f"a 32-bit integer image (PIL mode {im.mode}) with values {a.min()}..{a.max()}, beyond the 16-bit "
                "range 0..65535, so its scale is unknown; save it with 8 or 16 bits per sample"
            )
        return Image.fromarray((a >> 8).astype(np.uint8))
    if im.mode == "F":
        raise DatasetFormatError(
            "a floating-point image (PIL mode F), whose range is unknown, so it cannot be mapped to 256 levels; "
            "save it with 8 or 16 bits per sample"
        )
    return im


def fit_image(im: Image.Image, channels: int, height: int, width: int) -> np.ndarray:
    """Convert to L (1 channel) or RGB (3), scale so the image covers ``height x width``, center-crop.

    16-bit images are first reduced to 8 bits by value (:func:`to_8bit`). Returns ``uint8 [channels, height,
    width]``; an image already of that size is left untouched.
    """
    im = ImageOps.exif_transpose(im)  # as the image displays: a phone photo's EXIF orientation (it came rotated)
    im = to_8bit(im).convert("L" if channels == 1 else "RGB")
    w, h = im.size
    if (w, h) != (width, height):
        scale = max(width / w, height / h)
        nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)  # LANCZOS antialiases when downscaling
        left, top = (nw - width) // 2, (nh - height) // 2
        im = im.crop((left, top, left + width, top + height))
    a = np.array(im, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def _walk(folder: Path) -> list[Path]:
    """Image files under ``folder``, through symlinked folders too (``Path.rglob`` does not follow them before
    Python 3.13: ``root/cat -> /bigdisk/cat`` lost every cat), each real folder once (a link loop ends)."""
    out, seen = [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        out += [p for p in (Path(top) / n for n in names) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return out



DEFAULT_VAL_SIZE = 100  # also where the held-out test block sits in the seeded order (image_splits test_at)

class ImageFolder(DataSource):
    """Every image under ``root`` (recursively; extensions in ``IMAGE_EXTENSIONS``), levels ``0..255``.

    Two layouts:

    * **split folders**: ``root/train/``, and ``root/val/`` (or ``valid/``, ``validation/``) and/or
      ``root/test/``: each folder is that split; a missing ``val``/``test`` folder is held out of ``train``
      (``val_size`` / ``test_size`` images).
    * **one folder**: the images are split with a (stratified when labelled) seeded hold-out of ``val_size``
      and ``test_size`` images; train gets the rest.

    In either layout, if every image sits inside a first-level subfolder (of ``root``, or of each split
    folder), the subfolder names (sorted, over all splits) are the classes; otherwise labels are ``-1``.
    Files are read in sorted path order. A file PIL cannot read is an error naming it, or, with
    ``skip_bad_files=True``, skipped and counted (``self.skipped`` lists them).

    Args:
        root: the folder.
        shape: ``[C, H, W]`` with ``C`` 1 (greyscale) or 3 (RGB); images are resized and center-cropped to it.
        num_levels: must be 256.
        val_size, test_size: hold-out sizes (only for splits without their own folder).
        seed: split seed.
        hflip: random horizontal flip of train images.
        skip_bad_files: skip unreadable or corrupt files instead of failing.
    """

    name = "image_folder"

    def __init__(
        self,
        root: str,
        shape: Sequence[int] = (3, 32, 32),
        num_levels: int | None = 256,
        val_size: int = DEFAULT_VAL_SIZE,
        test_size: int = 100,
        seed: int = 0,
        hflip: bool = False,
        skip_bad_files: bool = False,
    ):
        super().__init__()
        self._configure(
            shape, num_levels, 256, root=root, val_size=val_size, test_size=test_size, seed=seed, hflip=hflip
        )
        self.skip_bad_files = bool(skip_bad_files)
        self.skipped: list[Path] = []

    def _check_shape(self) -> None:
        """Grey or RGB images ``[C, H, W]``."""
        if len(self.shape) != 3 or self.shape[0] not in (1, 3):
            raise ValueError(f"{self.name}: shape must be [C, H, W] with C in (1, 3), got {list(self.shape)}")

    def split_folders(self) -> dict[str, Path]:
        """``{split: folder}`` of the split-folder layout (``{}`` for a single folder of images). ``train/`` alone
        is that layout too when nothing else under ``root`` holds images (it was read as one folder whose only
        class was "train"); beside other image folders it is one of the classes."""
        found = {}
        for split, names in SPLIT_FOLDERS.items():
            for n in names:
                if (self.root / n).is_dir():
                    found[split] = self.root / n
                    break
        if "train" not in found:
            return {}
        if len(found) == 1 and any(p != found["train"] and (p.is_dir() or p.suffix.lower() in IMAGE_EXTENSIONS)
                                   for p in self.root.iterdir() if not p.name.startswith(".")):
            return {}
        return found

    def files(self, folder: Path | None = None) -> list[Path]:
        """The image files under ``folder`` (default ``root``), sorted."""
        folder = self.root if folder is None else folder
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"image_folder: {folder} is not a directory. Expected layout: any folder of images "
                f"({', '.join(IMAGE_EXTENSIONS)}), optionally one subfolder per class, or train/ val/ test/ "
                "folders of those."
            )
        files = sorted(_walk(folder))
        if not files:
            raise DatasetNotFoundError(
                f"image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}"
            )
        return files

    def _read(self, files: list[Path]) -> tuple[Tensor, list[Path]]:
        """``uint8 [N, C, H, W]`` of the readable files, and those files."""
        c, h, w = self.shape
        x = torch.empty(len(files), c, h, w, dtype=torch.uint8)
        kept: list[Path] = []
        for f in files:
            try:
                with Image.open(f) as im:
                    x[len(kept)] = torch.from_numpy(fit_image(im, c, h, w))
            except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (OSError), truncated data
                if not self.skip_bad_files:
                    why = (f"{f} is {e}" if isinstance(e, DatasetFormatError)  # to_8bit's: read, but range unknown
                           else f"cannot read {f} ({type(e).__name__}: {e})")
                    raise DatasetFormatError(
                        f"image_folder: {why}. Remove or replace the file, "
                        "or set data.skip_bad_files=true to skip unreadable files."
                    ) from e
                self.skipped.append(f)
                continue
            kept.append(f)
        return x[: len(kept)], kept

    def _labels(self, rel: dict[str, list[tuple[str, ...]]]) -> dict[str, Tensor]:
        """Class subfolders (over every split) give labels; otherwise ``-1``. Split folders of which some have
        class subfolders and some not are an error (every label became -1, with one INFO line)."""
        classed = {s: bool(parts) and all(len(p) >= 2 for p in parts) for s, parts in rel.items()}
        if len(rel) > 1 and any(classed.values()) and not all(classed.values()):
            flat = [s for s, c in classed.items() if not c]
            raise DatasetFormatError(
                f"image_folder: {', '.join(s + '/' for s in flat)} under {self.root} has images outside class "
                f"subfolders, while {', '.join(s + '/' for s, c in classed.items() if c)} has one subfolder per "
                "class: put every split's images in class subfolders (labels), or none (unlabelled)")
        every = [p for parts in rel.values() for p in parts]
        if every and all(len(p) >= 2 for p in every):
            self.class_names = tuple(sorted({p[0] for p in every}))
            self.num_classes = len(self.class_names)
            index = {c: i for i, c in enumerate(self.class_names)}
            return {s: torch.tensor([index[p[0]] for p in parts], dtype=torch.long) for s, parts in rel.items()}
        return {s: torch.full((len(parts),), -1, dtype=torch.long) for s, parts in rel.items()}

    def _load(self) -> dict[str, Dataset]:
        folders = self.split_folders()
        if not folders:
            x, kept = self._read(self.files())
            y = self._labels({"all": [f.relative_to(self.root).parts for f in kept]})["all"]
            self._report(len(kept))
            return image_splits(x, y, self.hflip, holdout=(self.val_size, self.test_size), seed=self.seed,
                                test_at=DEFAULT_VAL_SIZE)  # the test images do not move with val_size
        xs, rel = {}, {}
        for split, folder in folders.items():
            xs[split], kept = self._read(self.files(folder))
            rel[split] = [f.relative_to(folder).parts for f in kept]
        ys = self._labels(rel)
        self._report(sum(len(v) for v in xs.values()), folders)
        # splits without a folder are held out of train (stratified, seeded), as in the one-folder layout
        holdout = (0 if "val" in folders else self.val_size, 0 if "test" in folders else self.test_size)
        held = image_splits(xs["train"], ys["train"], self.hflip, holdout=holdout, seed=self.seed,
                            test_at=DEFAULT_VAL_SIZE if holdout[0] else 0)
        out = {"train": held["train"]}
        for split in ("val", "test"):
            out[split] = ArrayDataset(xs[split], ys[split]) if split in folders else held[split]
        return out

    def _report(self, n: int, folders: dict[str, Path] | None = None) -> None:
        layout = f"split folders {', '.join(f.name for f in folders.values())}" if folders else "one folder"
        log.info("image_folder: %d images (%d classes) from %s (%s)", n, self.num_classes, self.root, layout)
        if self.skipped:
            log.warning("image_folder: skipped %d unreadable file(s) (skip_bad_files=true), first: %s",
                        len(self.skipped), self.skipped[0])
