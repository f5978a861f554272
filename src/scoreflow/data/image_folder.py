"""Any folder of images (searched recursively), resized and center-cropped to ``shape``, held in memory."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from scoreflow.data.base import DatasetNotFoundError, DataSource, as_shape, check_num_levels, image_splits

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def fit_image(im: Image.Image, channels: int, height: int, width: int) -> np.ndarray:
    """Convert to L (1 channel) or RGB (3), scale so the image covers ``height x width``, center-crop.

    Returns ``uint8 [channels, height, width]``; an image already of that size is left untouched.
    """
    im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    if (w, h) != (width, height):
        scale = max(width / w, height / h)
        nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)  # LANCZOS antialiases when downscaling
        left, top = (nw - width) // 2, (nh - height) // 2
        im = im.crop((left, top, left + width, top + height))
    a = np.array(im, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


class ImageFolder(DataSource):
    """Every image under ``root`` (recursively; extensions in ``IMAGE_EXTENSIONS``), levels ``0..255``.

    If every image sits inside a first-level subfolder, the subfolder names (sorted) are the classes;
    otherwise labels are ``-1``. Files are read in sorted path order and split with a (stratified when
    labelled) seeded hold-out: ``val_size`` and ``test_size`` images, train gets the rest.

    Args:
        root: the folder.
        shape: ``[C, H, W]`` with ``C`` 1 (greyscale) or 3 (RGB); images are resized and center-cropped to it.
        num_levels: must be 256.
        val_size, test_size: hold-out sizes.
        seed: split seed.
        hflip: random horizontal flip of train images.
    """

    name = "image_folder"

    def __init__(
        self,
        root: str,
        shape: Sequence[int] = (3, 32, 32),
        num_levels: int | None = 256,
        val_size: int = 100,
        test_size: int = 100,
        seed: int = 0,
        hflip: bool = False,
    ):
        super().__init__()
        self.root = Path(root).expanduser()
        self.shape = as_shape(shape)
        if len(self.shape) != 3 or self.shape[0] not in (1, 3):
            raise ValueError(f"{self.name}: shape must be [C, H, W] with C in (1, 3), got {list(self.shape)}")
        self.num_levels = check_num_levels(self.name, num_levels, 256)
        self.val_size, self.test_size, self.seed, self.hflip = int(val_size), int(test_size), int(seed), bool(hflip)

    def files(self) -> list[Path]:
        """The image files under ``root``, sorted."""
        if not self.root.is_dir():
            raise DatasetNotFoundError(
                f"image_folder: {self.root} is not a directory. Expected layout: any folder of images "
                f"({', '.join(IMAGE_EXTENSIONS)}), optionally one subfolder per class."
            )
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DatasetNotFoundError(
                f"image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}"
            )
        return files

    def _load(self) -> dict[str, Dataset]:
        files = self.files()
        rel = [f.relative_to(self.root).parts for f in files]
        if all(len(p) >= 2 for p in rel):
            self.class_names = tuple(sorted({p[0] for p in rel}))
            self.num_classes = len(self.class_names)
            index = {c: i for i, c in enumerate(self.class_names)}
            y = torch.tensor([index[p[0]] for p in rel], dtype=torch.long)
        else:
            y = torch.full((len(files),), -1, dtype=torch.long)
        c, h, w = self.shape
        x = torch.empty(len(files), c, h, w, dtype=torch.uint8)
        for i, f in enumerate(files):
            with Image.open(f) as im:
                x[i] = torch.from_numpy(fit_image(im, c, h, w))
        log.info("image_folder: %d images (%d classes) from %s", len(files), self.num_classes, self.root)
        return image_splits(x, y, self.hflip, holdout=(self.val_size, self.test_size), seed=self.seed)
