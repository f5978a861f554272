"""Downsampled ImageNet (32x32 by default) in either of its two public layouts.

* ``png`` -- the original release of van den Oord et al. 2016 used by the likelihood papers:
  ``<root>/train_32x32/*.png`` (1,281,149) and ``<root>/valid_32x32/*.png`` (49,999), no labels.
* ``npz`` -- the newer Downsampled-ImageNet release of Chrabaszcz et al. 2017:
  ``train_data_batch_1..10.npz`` and ``val_data.npz``, each with ``data`` (``[N, 3*R*R]`` uint8, the R, G and
  B planes in turn, i.e. CHW order) and ``labels`` (1-based). Also accepted: the same files inside the folders
  the release's zips unpack to, ``Imagenet32_train_npz/`` and ``Imagenet32_val_npz/`` (at 64x64 the train
  batches come in two zips, ``Imagenet64_train_part1_npz/`` with batches 1-5 and ``..._part2_npz/`` with 6-10),
  and the older pickled batches without ``.npz``.

Both keep the whole set in memory as uint8 (3.9 GB at 32x32). The official validation set is the test
split, as in the papers; ``val`` is a seeded hold-out of train.

The two releases downsample differently, so bits/dim measured on one are not comparable with the other.
The likelihood papers (PixelRNN, Glow, Flow++, ScoreFlow's 3.76 bits/dim; TFDS ``downsampled_imagenet/32x32``)
use van den Oord's; ``layout`` also accepts the release names ``van_den_oord`` (= ``png``) and ``chrabaszcz``
(= ``npz``), and the release read is logged and kept in ``release_used``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from scoreflow.data.base import (
    DatasetFormatError,
    DatasetNotFoundError,
    DataSource,
    check_shape,
    corrupt,
    image_splits,
    incomplete,
    not_found,
)

log = logging.getLogger(__name__)

NPZ_TRAIN_BATCHES = 10  # train_data_batch_1..10 of the npz release (Chrabaszcz et al. 2017)
RELEASE_OF_LAYOUT = {
    "png": "van den Oord et al. 2016 (the original release, the one the likelihood papers report on)",
    "npz": "Chrabaszcz et al. 2017 (the newer release; bits/dim not comparable with the likelihood papers')",
}
LAYOUT_OF_RELEASE = {"van_den_oord": "png", "chrabaszcz": "npz"}

IMAGENET_URL = "https://image-net.org/download-images.php"
VAN_DEN_OORD_SIDES = (32, 64)  # the original release's resolutions


def train_zips(side: int, sub: str = "_npz") -> list[str]:
    """The zips of the Chrabaszcz et al. release's train batches at ``side`` (64x64 ships in two parts);
    ``sub=""`` names the pickled release's."""
    if side == 64:
        return [f"Imagenet{side}_train_part{i}{sub}.zip" for i in (1, 2)]
    return [f"Imagenet{side}_train{sub}.zip"]


def imagenet_source(side: int) -> str:
    """Where to get the files at ``side``: the "Get it from" of the not-found error."""
    zips = " + ".join([*train_zips(side), f"Imagenet{side}_val_npz.zip"])
    original = (f"; the original van den Oord train_{side}x{side}.tar / valid_{side}x{side}.tar"
                if side in VAN_DEN_OORD_SIDES else "")
    return f"{IMAGENET_URL} (Downsampled ImageNet: {zips}{original})"


def _release_zip(path: Path, side: int) -> str:
    """The zip (of the npz or the pickled release) a batch file is extracted from."""
    sub = "_npz" if path.suffix == ".npz" else ""
    return f"Imagenet{side}_val{sub}.zip" if path.name.startswith("val_data") else " or ".join(train_zips(side, sub))


def _train_batches(dirs: Sequence[Path], ext: str) -> list[Path]:
    """``train_data_batch_1, 2, ...<ext>`` up to the first one missing, each from the first of ``dirs`` holding it."""
    out: list[Path] = []
    while True:
        name = f"train_data_batch_{len(out) + 1}{ext}"
        found = next((d / name for d in dirs if (d / name).is_file()), None)
        if found is None:
            return out
        out.append(found)


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
    except KeyError as e:
        raise DatasetFormatError(f"{path}: expected a batch with keys 'data' and 'labels' ({e!r})") from e
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError) as e:
        # a truncated npz is a BadZipFile (no central directory) or EOFError; a damaged member a CRC or zlib error
        raise corrupt(path, e, f"re-download it, or re-extract it from {_release_zip(path, side)}") from e
    data, labels = np.asarray(data), np.asarray(labels, dtype=np.int64).reshape(-1)
    other = int(round((data.shape[-1] / 3) ** 0.5))
    if data.ndim == 2 and data.shape[1] == 3 * other * other != 3 * side * side:
        check_shape(f"{path.name}", (3, side, side), (3, other, other))
    if data.dtype != np.uint8 or data.shape != (len(labels), 3 * side * side) or (
            len(labels) and (labels.min() < 1 or labels.max() > 1000)):
        raise DatasetFormatError(
            f"{path}: expected 'data' uint8 [N, {3 * side * side}] and labels 1..1000, "
            f"got {data.dtype} {list(data.shape)} and {len(labels)} labels"
        )
    return data.reshape(-1, 3, side, side), labels - 1


def _read_batches(files: list[Path], side: int) -> tuple[np.ndarray, np.ndarray]:
    """The batches of ``files`` as one ``uint8 [N, 3, side, side]`` array and its labels. For npz files the labels
    are read first (a small member) to size the array, which each batch then fills: the list of batches and their
    concatenation held the training set twice at once (611 MiB for 293 MiB of images; ~7.8 GB per process for
    ImageNet32). Pickled batches cannot be read in part: they are concatenated."""
    sizes: list[int] | None = []
    for f in files:
        try:
            with np.load(f) as z:
                sizes.append(int(np.asarray(z["labels"]).size))
        except Exception:  # noqa: BLE001 - pickled, or damaged: _read_batch reads it and names what is wrong
            sizes = None
            break
    if sizes is None:
        parts = [_read_batch(f, side) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x, y = np.empty((sum(sizes), 3, side, side), dtype=np.uint8), np.empty(sum(sizes), dtype=np.int64)
    at = 0
    for f, n in zip(files, sizes, strict=True):
        bx, by = _read_batch(f, side)
        x[at: at + n], y[at: at + n] = bx, by  # _read_batch checked len(data) == len(labels) == n
        at += n
    return x, y


def png_cache_file(folder: Path, files: list[Path], side: int) -> list[Path]:
    """Where the decoded PNGs of ``folder`` are cached, in order of preference: beside the release's folders
    (``<root>/.scoreflow_cache/``), else under ``~/.cache/scoreflow/``; named by a digest of every file's relative
    path, size and modification time, so a changed or added file is decoded afresh."""
    h = hashlib.sha1(f"{side}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    name = f"{folder.name}-{h.hexdigest()[:16]}.npy"
    return [folder.parent / ".scoreflow_cache" / name, Path.home() / ".cache" / "scoreflow" / name]


def _read_pngs(folder: Path, side: int, cache: bool = False) -> np.ndarray:
    """All PNGs under ``folder`` (sorted by path) as ``uint8 [N, 3, side, side]``.

    ``cache``: keep the decoded array as ``.npy`` (:func:`png_cache_file`) and map it on later loads (copy on
    write: the processes of one machine share its pages). Decoding took 68 us per PNG, 1.5 min of CPU per process
    for the 1.28 M training images, in every rank of every run and in every ``evaluate.py`` / ``sample.py``
    (data audit)."""
    files = sorted(folder.rglob("*.png"))
    if not files:
        raise DatasetFormatError(f"{folder} holds no .png files")
    targets = png_cache_file(folder, files, side) if cache else []
    for target in targets:
        if target.is_file():
            try:
                x = np.load(target, mmap_mode="c")
            except (OSError, ValueError) as e:  # a damaged cache file: decoded again (and rewritten)
                log.warning("ignoring the unreadable PNG cache %s (%s)", target, e)
                continue
            if x.shape == (len(files), 3, side, side) and x.dtype == np.uint8:
                log.info("read %d decoded PNGs of %s from the cache %s", len(files), folder, target)
                return x
    out = _decode_pngs(folder, files, side)
    for target in targets:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                np.save(fh, out)
            os.replace(tmp, target)  # atomic: another process reads a whole file or none
        except OSError as e:  # read-only or full: the next place, else no cache
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("could not cache the decoded PNGs in %s (%s)", target.parent, e)
            continue
        log.info("cached the %d decoded PNGs of %s in %s (%.0f MB; data.png_cache=false: no cache)", len(files),
                 folder, target, out.nbytes / 1e6)
        break
    return out


def _decode_pngs(folder: Path, files: list[Path], side: int) -> np.ndarray:
    """``files`` (PNGs of ``folder``) decoded into ``uint8 [N, 3, side, side]``; a damaged one is named."""
    out = np.empty((len(files), 3, side, side), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                a = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:  # PIL: UnidentifiedImageError (OSError), truncated data
            raise corrupt(f, e, f"re-extract it from {folder.name}.tar (or re-download that)") from e
        if a.shape[:2] != (side, side):  # one image of another size in the release's folder: a damaged file
            raise corrupt(f, ValueError(f"a {a.shape[1]}x{a.shape[0]} image in a {side}x{side} release"),
                          f"re-extract it from {folder.name}.tar (or re-download that)")
        out[i] = a.transpose(2, 0, 1)
        if (i + 1) % 200_000 == 0:
            log.info("read %d / %d PNGs from %s", i + 1, len(files), folder)
    return out


class DownsampledImageNet(DataSource):
    """ImageNet downsampled to ``[3, R, R]`` (R=32 by default), levels ``0..255`` (``uint8``).

    Labels are 0-based class indices in the npz layout and ``-1`` in the png layout (which has none).
    ``layout`` is ``"auto"`` (png, the papers' release, if present, else npz), ``"npz"`` or ``"png"``; the one used
    is logged.

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
        png_cache: bool = True,
    ):
        super().__init__()
        self._configure(shape, num_levels, 256, root=root, val_size=val_size, seed=seed, hflip=hflip)
        layout = LAYOUT_OF_RELEASE.get(layout, layout)
        if layout not in ("auto", "npz", "png"):
            raise ValueError(f"{self.name}: layout must be 'auto', 'npz', 'png', 'van_den_oord' or 'chrabaszcz', "
                             f"got {layout!r}")
        self.layout = layout
        self.png_cache = bool(png_cache)
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

    def _npz_dirs(self, ext: str) -> tuple[list[list[Path]], list[Path]]:
        """Where the batches (``ext`` ``.npz``, or ``""`` for the pickled release) may be: the candidate sets of
        train folders, the first set holding batch 1 being used (the 64x64 release's two part folders are one set,
        its batches spread over both), and the val folders."""
        r, sub = self.side, "_npz" if ext else ""
        train_sets = [
            [self.root],
            [self.root / f"Imagenet{r}_train{sub}"],
            [self.root / f"Imagenet{r}_train_part{i}{sub}" for i in (1, 2)],
        ]
        return train_sets, [self.root, self.root / f"Imagenet{r}_val{sub}"]

    def _npz_files(self) -> tuple[list[Path], Path] | None:
        for ext in (".npz", ""):
            train_sets, val_dirs = self._npz_dirs(ext)
            train = next((batches for dirs in train_sets if (batches := _train_batches(dirs, ext))), [])
            val = next((d / f"val_data{ext}" for d in val_dirs if (d / f"val_data{ext}").is_file()), None)
            if train and val is not None:
                return train, val
        return None

    def _npz_gap(self, train_files: list[Path]) -> list[str]:
        """The batches missing before the last one present in the folder set ``train_files`` were read from (a
        batch removed or not yet extracted: the read stops at it, so every later batch would be dropped)."""
        ext = train_files[0].suffix
        sets, _ = self._npz_dirs(ext)
        dirs = next((ds for ds in sets if train_files[0].parent in ds), [train_files[0].parent])
        have = {n for n in range(1, NPZ_TRAIN_BATCHES + 1)
                if any((d / f"train_data_batch_{n}{ext}").is_file() for d in dirs)}
        last = max(have, default=0)
        return [f"train_data_batch_{n}{ext}" for n in range(1, last + 1) if n not in have]

    def _npz_missing(self) -> list[str]:
        """The files missing from an npz (or pickled) layout that is partly there; ``[]`` if none of it is."""
        every = range(1, NPZ_TRAIN_BATCHES + 1)
        for ext in (".npz", ""):
            train_sets, val_dirs = self._npz_dirs(ext)
            dirs = [d for ds in train_sets for d in ds]
            have = {n for n in every if any((d / f"train_data_batch_{n}{ext}").is_file() for d in dirs)}
            has_val = any((d / f"val_data{ext}").is_file() for d in val_dirs)
            if not have and not has_val:
                continue
            if not have:
                missing = [f"train_data_batch_{{1..{NPZ_TRAIN_BATCHES}}}{ext}"]
            else:  # batches after a gap are not read, so only a missing batch 1 keeps the layout from loading
                missing = [] if 1 in have else [f"train_data_batch_{n}{ext}" for n in every if n not in have]
            return missing + ([] if has_val else [f"val_data{ext}"])
        return []

    def _png_dirs(self) -> tuple[Path, Path] | None:
        train, valid = self.root / f"train_{self.side}x{self.side}", self.root / f"valid_{self.side}x{self.side}"
        return (train, valid) if train.is_dir() and valid.is_dir() else None

    def _png_missing(self) -> list[str]:
        """The folder missing from a png layout of which the other folder is there; ``[]`` otherwise."""
        r = self.side
        present = {n: (self.root / n).is_dir() for n in (f"train_{r}x{r}", f"valid_{r}x{r}")}
        return [f"{n}/" for n, there in present.items() if not there] if any(present.values()) else []

    def _not_found(self) -> DatasetNotFoundError:
        """Neither layout loads: where we looked, what is expected and where to get it at this resolution,
        preceded by what is missing from a layout that is partly there (rather than "not found")."""
        r, npz, png = self.side, self.layout in ("auto", "npz"), self.layout in ("auto", "png")
        train_dirs = [f"Imagenet{r}_train_part{i}_npz/" for i in (1, 2)] if r == 64 else [f"Imagenet{r}_train_npz/"]
        forms, looked = [], []
        if npz:
            forms.append(f"<root>/train_data_batch_{{1..{NPZ_TRAIN_BATCHES}}}.npz + <root>/val_data.npz (also inside "
                         f"{' + '.join(train_dirs)} and Imagenet{r}_val_npz/)")
            looked += ["train_data_batch_1.npz", "val_data.npz", *train_dirs, f"Imagenet{r}_val_npz/"]
        if png:
            forms.append(f"<root>/train_{r}x{r}/*.png + <root>/valid_{r}x{r}/*.png")
            looked += [f"train_{r}x{r}/", f"valid_{r}x{r}/"]
        layout = ("either " if len(forms) > 1 else "") + ", or ".join(forms)
        where = f"{self.root}/{{{', '.join(looked)}}}"
        err = not_found(f"{self.name} (layout={self.layout})", [where], layout, imagenet_source(r))
        partial = [("png", self._png_missing() if png else []), ("npz", self._npz_missing() if npz else [])]
        for kind, missing in partial:  # png first, so that the npz line (auto's first choice) comes out on top
            if missing:
                err = incomplete(f"{self.name} {kind} layout", self.root, missing, err)
        return err

    def _load(self) -> dict[str, Dataset]:
        # auto: van den Oord's release (the likelihood papers') when it is there, else the npz one
        png = self._png_dirs() if self.layout in ("auto", "png") else None
        npz = self._npz_files() if self.layout == "npz" or (self.layout == "auto" and png is None) else None
        half = self._png_missing() if self.layout == "auto" and png is None and npz is not None else []
        if half:  # van den Oord's release half there (an extraction in progress): not read in silence
            log.warning("%s: van den Oord et al.'s release (png, the likelihood papers') is incomplete under %s "
                        "(missing %s): reading the npz release instead, whose bits/dim are not comparable; complete "
                        "it, or set data.layout=chrabaszcz to mean the npz one", self.name, self.root, ", ".join(half))
        if png is not None and self.layout == "auto" and self._npz_files() is not None:
            log.warning("%s: both releases are under %s: reading van den Oord et al.'s (png, the likelihood papers'; "
                        "no labels); data.layout=chrabaszcz reads the npz one (labelled, bits/dim not comparable)",
                        self.name, self.root)
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
            gap = self._npz_gap(train_files)
            if gap:  # batches after the gap are on disk: a silent fraction of the data would be read
                raise incomplete(f"{self.name} npz layout", self.root, gap, self._not_found())
            if len(train_files) < NPZ_TRAIN_BATCHES:
                log.warning("%s: only %d of the release's %d train batches (train_data_batch_1..%d) are under %s: "
                            "training on that fraction of the training set", self.name, len(train_files),
                            NPZ_TRAIN_BATCHES, NPZ_TRAIN_BATCHES,
                            ", ".join(str(d) for d in dict.fromkeys(f.parent for f in train_files)))
            x, y = _read_batches(train_files, self.side)
            tx, ty = _read_batch(val_file, self.side)
            self.layout_used = "npz"
        elif png is not None:
            log.info("%s: using the png layout (%s, %s) under %s: release %s", self.name, png[0].name, png[1].name,
                     self.root, RELEASE_OF_LAYOUT["png"])
            x, tx = (_read_pngs(d, self.side, self.png_cache) for d in png)
            y, ty = np.full(len(x), -1, dtype=np.int64), np.full(len(tx), -1, dtype=np.int64)
            self.layout_used = "png"
        else:
            raise self._not_found()
        test = (torch.from_numpy(tx), torch.from_numpy(ty))
        return image_splits(
            torch.from_numpy(x), torch.from_numpy(y), self.hflip, holdout=(self.val_size, 0), seed=self.seed, test=test
        )


ImageNet32 = DownsampledImageNet
