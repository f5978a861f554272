"""Data sources: datasets in their real on-disk formats, plus the embedded default (sklearn digits).

Every source is built from its ``conf/data/*.yaml`` (keys == constructor arguments) and ``load()`` returns
``{"train", "val", "test"}`` datasets of ``(x, y)``: ``x`` a ``uint8`` tensor of levels ``0..num_levels-1``
shaped ``shape`` (``float32`` for continuous data, where ``num_levels`` is ``None``), ``y`` an ``int``
(``-1`` if unlabelled). Modules import only torch, numpy, PIL (and sklearn / matplotlib lazily).
"""

from scoreflow.data.base import (
    ArrayDataset,
    DatasetFormatError,
    DatasetNotFoundError,
    DataSource,
    random_hflip,
    seeded_split,
)
from scoreflow.data.cifar import CIFAR10
from scoreflow.data.digits import Digits
from scoreflow.data.image_folder import ImageFolder
from scoreflow.data.imagenet import DownsampledImageNet, ImageNet32
from scoreflow.data.mnist import MNIST, read_idx
from scoreflow.data.mnist5k import MNIST5k
from scoreflow.data.photos import SklearnPhotos
from scoreflow.data.toy2d import Toy2D, render_png

__all__ = [
    "ArrayDataset",
    "CIFAR10",
    "DataSource",
    "random_hflip",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "Digits",
    "DownsampledImageNet",
    "ImageFolder",
    "ImageNet32",
    "MNIST",
    "MNIST5k",
    "Toy2D",
    "read_idx",
    "render_png",
    "seeded_split",
    "SklearnPhotos",
]
