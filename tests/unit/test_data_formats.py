"""On-disk formats: tiny files written in the real MNIST IDX, CIFAR pickle, ImageNet npz / PNG layouts and a
folder of images are loaded back exactly, split as promised, and missing or malformed roots raise clear errors."""

import gzip
import logging
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scoreflow.data import (
    CIFAR10,
    MNIST,
    DatasetFormatError,
    DatasetNotFoundError,
    DownsampledImageNet,
    ImageFolder,
    read_idx,
)


def rng_images(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def labels_of(ds) -> Counter:
    return Counter(int(ds.y[i]) for i in ds.index)


def assert_split_round_trip(splits, x_written: np.ndarray, y_written: np.ndarray, names=("train", "val")):
    """The named splits partition the written examples and return them unchanged (no flip outside train)."""
    idx = torch.cat([splits[k].index for k in names]).sort().values
    assert torch.equal(idx, torch.arange(len(x_written)))
    for k in names:
        ds = splits[k]
        for i in range(len(ds)):
            x, y = ds[i]
            j = int(ds.index[i])
            ok = torch.equal(x, torch.from_numpy(x_written[j])) or (
                k == "train" and torch.equal(x, torch.from_numpy(x_written[j]).flip(-1))
            )
            assert ok and x.dtype == torch.uint8 and y == int(y_written[j])


# --- MNIST IDX ----------------------------------------------------------------------------------------


def write_idx(path, a: np.ndarray, gz: bool):
    header = struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    raw = header + a.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def mnist_root(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    data = {
        "train": (rng_images(0, 20, 28, 28), np.arange(20) % 10),
        "t10k": (rng_images(1, 6, 28, 28), np.arange(6) % 3),
    }
    for prefix, (x, y) in data.items():
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x, gz=True)  # one gzipped, one raw: both accepted
        write_idx(root / f"{prefix}-labels-idx1-ubyte", y, gz=False)
    return root, data


def test_read_idx_checks_magic_and_size(tmp_path):
    a = rng_images(0, 2, 3, 4)
    write_idx(tmp_path / "a", a, gz=False)
    assert np.array_equal(read_idx(tmp_path / "a"), a)
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x03" + bytes(12))
    with pytest.raises(DatasetFormatError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-1])
    with pytest.raises(DatasetFormatError, match="header says"):
        read_idx(tmp_path / "short")


def test_mnist_idx_round_trip_and_splits(mnist_root):
    root, data = mnist_root
    splits = MNIST(str(root), val_size=4, seed=0, hflip=True).load()
    assert {k: len(v) for k, v in splits.items()} == {"train": 16, "val": 4, "test": 6}
    x_tr, y_tr = data["train"]
    assert_split_round_trip(splits, x_tr[:, None], y_tr)
    x_te, y_te = data["t10k"]
    assert torch.equal(splits["test"].x, torch.from_numpy(x_te[:, None])) and splits["test"][5][1] == int(y_te[5])
    assert not splits["val"].hflip and not splits["test"].hflip and splits["train"].hflip
    again = MNIST(str(root), val_size=4, seed=0).load()
    assert torch.equal(again["val"].index, splits["val"].index)
    assert not torch.equal(MNIST(str(root), val_size=4, seed=5).load()["val"].index, splits["val"].index)


def test_mnist_errors(mnist_root, tmp_path):
    root, _ = mnist_root
    with pytest.raises(ValueError, match=r"\[1, 32, 32\].*\[1, 28, 28\]"):
        MNIST(str(root), shape=[1, 32, 32], val_size=2).load()
    with pytest.raises(DatasetNotFoundError) as e:
        MNIST(str(tmp_path / "nowhere")).load()
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "http" in msg
    assert isinstance(e.value, FileNotFoundError)
    (root / "t10k-labels-idx1-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DatasetFormatError, match="t10k-labels"):
        MNIST(str(root), val_size=2).load()


# --- CIFAR-10 pickles ----------------------------------------------------------------------------------


@pytest.fixture
def cifar_root(tmp_path):
    d = tmp_path / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batches = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 3}
    written = {}
    for seed, (name, n) in enumerate(batches.items()):
        x = rng_images(seed, n, 3, 32, 32)
        y = [(seed + i) % 10 for i in range(n)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": y,
            b"data": x.reshape(n, 3072),  # rows: 1024 R, 1024 G, 1024 B
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n)],
        }
        with open(d / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
        written[name] = (x, np.array(y))
    return tmp_path / "cifar", written


def test_cifar10_round_trip_and_splits(cifar_root):
    root, written = cifar_root
    src = CIFAR10(str(root), val_size=5, seed=0, hflip=True)
    splits = src.load()
    assert {k: len(v) for k, v in splits.items()} == {"train": 15, "val": 5, "test": 3}
    x_tr = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    y_tr = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert_split_round_trip(splits, x_tr, y_tr)
    x_te, y_te = written["test_batch"]
    assert torch.equal(splits["test"].x, torch.from_numpy(x_te))
    assert [splits["test"][i][1] for i in range(3)] == y_te.tolist()
    assert src.num_classes == 10 and src.class_names[0] == "airplane" and src.num_levels == 256
    # the batch directory itself is also accepted as root
    assert len(CIFAR10(str(root / "cifar-10-batches-py"), val_size=0).load()["train"]) == 20


def test_cifar10_errors(cifar_root, tmp_path):
    root, _ = cifar_root
    with pytest.raises(DatasetNotFoundError) as e:
        CIFAR10(str(tmp_path / "empty")).load()
    assert "data_batch_1" in str(e.value) and "cifar-10-python.tar.gz" in str(e.value)
    with pytest.raises(ValueError, match=r"\[3, 28, 28\].*\[3, 32, 32\]"):
        CIFAR10(str(root), shape=[3, 28, 28]).load()
    partial = tmp_path / "partial" / "cifar-10-batches-py"  # an interrupted copy: the missing batches are named
    partial.mkdir(parents=True)
    (partial / "data_batch_1").write_bytes((root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    with pytest.raises(DatasetNotFoundError, match="incomplete in .*missing data_batch_2, data_batch_3, "
                                                   "data_batch_4, data_batch_5, test_batch") as e:
        CIFAR10(str(tmp_path / "partial")).load()
    assert "Expected layout" in str(e.value)
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({b"pixels": np.zeros((1, 3072), np.uint8)}, fh)
    with pytest.raises(DatasetFormatError, match="b'labels'"):
        CIFAR10(str(root), val_size=1).load()


# --- Downsampled ImageNet: npz batches and PNG folders ------------------------------------------------


def write_npz_layout(root, n_batches=10, per_batch=3, n_val=4, side=32):
    root.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for b in range(1, n_batches + 1):
        x = rng_images(b, per_batch, 3, side, side)
        y = np.array([(b * 7 + i) % 1000 + 1 for i in range(per_batch)])  # 1-based, as in the release
        np.savez(root / f"train_data_batch_{b}.npz", data=x.reshape(per_batch, -1), labels=y.tolist(), mean=np.zeros(3))
        xs.append(x)
        ys.append(y)
    vx, vy = rng_images(99, n_val, 3, side, side), np.arange(1, n_val + 1)
    np.savez(root / "val_data.npz", data=vx.reshape(n_val, -1), labels=vy.tolist())
    return np.concatenate(xs), np.concatenate(ys), vx, vy


def write_png_layout(root, n_train=6, n_valid=3, side=32):
    out = {}
    for folder, n, seed in ((f"train_{side}x{side}", n_train, 0), (f"valid_{side}x{side}", n_valid, 1)):
        (root / folder).mkdir(parents=True)
        x = rng_images(seed, n, side, side, 3)
        for i in range(n):
            Image.fromarray(x[i]).save(root / folder / f"{i:07d}.png")
        out[folder] = x.transpose(0, 3, 1, 2)
    return out


def test_imagenet_npz_layout(tmp_path, caplog):
    x, y, vx, vy = write_npz_layout(tmp_path / "in32")
    src = DownsampledImageNet(str(tmp_path / "in32"), val_size=6, seed=0, hflip=True)
    with caplog.at_level(logging.INFO, logger="scoreflow.data.imagenet"):
        splits = src.load()
    assert "npz layout" in caplog.text and src.layout_used == "npz"
    assert {k: len(v) for k, v in splits.items()} == {"train": 24, "val": 6, "test": 4}
    assert_split_round_trip(splits, x, y - 1)  # labels become 0-based
    assert torch.equal(splits["test"].x, torch.from_numpy(vx))
    assert [splits["test"][i][1] for i in range(4)] == (vy - 1).tolist()
    # CHW order: the first 1024 values of a row are the red plane
    row = np.load(tmp_path / "in32" / "train_data_batch_1.npz")["data"][0]
    assert np.array_equal(splits["train"].x[0, 0].numpy().reshape(-1), row[:1024])


def test_imagenet_npz_with_missing_train_batches_warns(tmp_path, caplog):
    """3 of the release's 10 batches train on 30 % of the data: said as a warning, not only in an INFO count."""
    write_npz_layout(tmp_path / "in32", n_batches=3)
    with caplog.at_level(logging.WARNING, logger="scoreflow.data.imagenet"):
        DownsampledImageNet(str(tmp_path / "in32"), val_size=1).load()
    assert "only 3 of the release's 10 train batches" in caplog.text
    caplog.clear()
    write_npz_layout(tmp_path / "full", n_batches=10)
    with caplog.at_level(logging.WARNING, logger="scoreflow.data.imagenet"):
        DownsampledImageNet(str(tmp_path / "full"), val_size=1).load()
    assert "train batches" not in caplog.text


def test_imagenet_npz_in_release_subfolders(tmp_path):
    x, _, _, _ = write_npz_layout(tmp_path / "in32" / "Imagenet32_train_npz", n_batches=2)
    (tmp_path / "in32" / "Imagenet32_train_npz" / "val_data.npz").rename(tmp_path / "val_data.npz")
    (tmp_path / "in32" / "Imagenet32_val_npz").mkdir()
    (tmp_path / "val_data.npz").rename(tmp_path / "in32" / "Imagenet32_val_npz" / "val_data.npz")
    splits = DownsampledImageNet(str(tmp_path / "in32"), val_size=1).load()
    assert len(splits["train"]) + len(splits["val"]) == len(x) == 6 and len(splits["test"]) == 4


def test_imagenet_png_layout_and_layout_choice(tmp_path, caplog):
    root = tmp_path / "in32"
    written = write_png_layout(root)
    src = DownsampledImageNet(str(root), val_size=2, seed=0)
    with caplog.at_level(logging.INFO, logger="scoreflow.data.imagenet"):
        splits = src.load()
    assert "png layout" in caplog.text and src.layout_used == "png"
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "val": 2, "test": 3}
    assert_split_round_trip(splits, written["train_32x32"], np.full(6, -1))
    assert torch.equal(splits["test"].x, torch.from_numpy(written["valid_32x32"]))
    # with both layouts present, auto prefers the papers' release (png), saying so; layout="npz" forces the other
    write_npz_layout(root, n_batches=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="scoreflow.data.imagenet"):
        auto = DownsampledImageNet(str(root), val_size=0)
        assert len(auto.load()["test"]) == 3 and auto.layout_used == "png"
    assert "both releases" in caplog.text and "data.layout=chrabaszcz" in caplog.text
    forced = DownsampledImageNet(str(root), val_size=0, layout="npz")
    assert forced.load()["test"].x.shape[0] == 4 and forced.layout_used == "npz"


def test_imagenet_png_release_is_decoded_once_then_mapped_from_its_cache(tmp_path, caplog, monkeypatch):
    """The van den Oord release was decoded on every load (68 us per PNG: 1.5 min of CPU per process for the
    training set, in every rank, run and evaluate.py). Now the decoded array is cached beside the release and mapped
    on the next load; a changed file is decoded afresh; an unwritable root falls back to ~/.cache/scoreflow/."""
    import scoreflow.data.imagenet as imagenet

    root = tmp_path / "in32"
    written = write_png_layout(root)
    first = DownsampledImageNet(str(root), val_size=0).load()
    cached = sorted((root / ".scoreflow_cache").glob("*.npy"))
    assert [p.name.split("-")[0] for p in cached] == ["train_32x32", "valid_32x32"]
    decoded, real = [], imagenet._decode_pngs
    monkeypatch.setattr(imagenet, "_decode_pngs", lambda *a: decoded.append(a[0].name) or real(*a))
    with caplog.at_level(logging.INFO, logger="scoreflow.data.imagenet"):
        again = DownsampledImageNet(str(root), val_size=0).load()
    assert decoded == [] and "from the cache" in caplog.text
    assert torch.equal(again["train"].x, first["train"].x) and torch.equal(again["test"].x, first["test"].x)
    assert torch.equal(again["test"].x, torch.from_numpy(written["valid_32x32"]))
    Image.fromarray(rng_images(7, 32, 32, 3)).save(root / "valid_32x32" / "0000000.png")  # a file changed
    changed = DownsampledImageNet(str(root), val_size=0).load()
    assert decoded == ["valid_32x32"] and not torch.equal(changed["test"].x, first["test"].x)
    no_cache = tmp_path / "nc"
    write_png_layout(no_cache)
    DownsampledImageNet(str(no_cache), val_size=0, png_cache=False).load()
    assert not (no_cache / ".scoreflow_cache").exists()
    blocked = tmp_path / "ro"  # nothing can be written beside the release: the user's cache folder instead
    write_png_layout(blocked)
    (blocked / ".scoreflow_cache").write_text("a file where the folder would go")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    DownsampledImageNet(str(blocked), val_size=0).load()
    assert len(list((tmp_path / "home" / ".cache" / "scoreflow").glob("*.npy"))) == 2


def test_imagenet_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        DownsampledImageNet(str(tmp_path / "none")).load()
    msg = str(e.value)
    assert "train_data_batch_" in msg and "val_data.npz" in msg and "train_32x32" in msg and "image-net.org" in msg
    write_npz_layout(tmp_path / "in64", n_batches=1, side=8)
    with pytest.raises(ValueError, match=r"\[3, 32, 32\].*\[3, 8, 8\]"):
        DownsampledImageNet(str(tmp_path / "in64")).load()
    with pytest.raises(ValueError, match=r"\[3, R, R\]"):
        DownsampledImageNet(str(tmp_path), shape=[1, 32, 32])


# --- a folder of images -------------------------------------------------------------------------------


def test_image_folder_labels_resize_and_round_trip(tmp_path):
    root = tmp_path / "imgs"
    exact = {}
    for c, cls in enumerate(("cats", "dogs")):
        (root / cls / "nested").mkdir(parents=True)
        for i in range(5):
            a = rng_images(10 * c + i, 16, 16, 3)
            Image.fromarray(a).save(root / cls / f"{i}.png")
            exact[(c, i)] = a.transpose(2, 0, 1)
        Image.fromarray(rng_images(50 + c, 40, 24, 3)).save(root / cls / "nested" / "big.jpg")  # 24 wide, 40 tall
    src = ImageFolder(str(root), shape=[3, 16, 16], val_size=2, test_size=4, seed=0, hflip=True)
    splits = src.load()
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "val": 2, "test": 4}
    assert src.class_names == ("cats", "dogs") and src.num_classes == 2
    x = splits["train"].x
    assert x.shape == (12, 3, 16, 16) and x.dtype == torch.uint8
    files = src.files()
    for j, f in enumerate(files):
        label = 0 if f.parent.name == "cats" or f.parent.parent.name == "cats" else 1
        assert int(splits["train"].y[j]) == label
        if f.suffix == ".png":  # already the target size: loaded untouched
            assert torch.equal(x[j], torch.from_numpy(exact[(label, int(f.stem))]))
    assert labels_of(splits["test"]) == {0: 2, 1: 2}
    grey = ImageFolder(str(root / "cats"), shape=[1, 8, 12], val_size=1, test_size=1).load()
    assert grey["train"].x.shape[1:] == (1, 8, 12) and int(grey["val"][0][1]) == -1


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not a directory"):
        ImageFolder(str(tmp_path / "missing")).load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images"):
        ImageFolder(str(tmp_path / "empty")).load()
    with pytest.raises(ValueError, match="C in"):
        ImageFolder(str(tmp_path), shape=[4, 8, 8])


def _class_folders(root: Path, classes: dict[str, int], start: int = 0) -> None:
    for c, (cls, n) in enumerate(classes.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng_images(start + 100 * c + i, 8, 8, 3)).save(root / cls / f"{i}.png")


def test_image_folder_follows_symlinked_class_folders(tmp_path):
    """``root/cat -> /elsewhere/cat``: Path.rglob does not follow folder links (Python < 3.13), so the 10 cats were
    lost without a word (data audit: 10 images, 1 class, instead of 20 and 2). A link loop is read once."""
    _class_folders(tmp_path / "root", {"dog": 10})
    _class_folders(tmp_path / "elsewhere", {"cat": 10}, start=50)
    (tmp_path / "root" / "cat").symlink_to(tmp_path / "elsewhere" / "cat", target_is_directory=True)
    (tmp_path / "elsewhere" / "cat" / "loop").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    src = ImageFolder(str(tmp_path / "root"), shape=[3, 8, 8], val_size=2, test_size=2)
    splits = src.load()
    assert src.class_names == ("cat", "dog") and sum(len(v) for v in splits.values()) == 20


def test_image_folder_with_train_alone_is_the_split_layout_and_mixed_labelling_is_refused(tmp_path):
    """``root/train/<class>/`` alone was read as one folder whose only class was "train"; README: a missing
    ``val``/``test`` folder is held out of ``train``. Split folders labelled in one split and not in another gave
    every image the label -1 with one INFO line; now an error naming the flat split."""
    _class_folders(tmp_path / "a" / "train", {"cat": 6, "dog": 6})
    src = ImageFolder(str(tmp_path / "a"), shape=[3, 8, 8], val_size=2, test_size=2)
    splits = src.load()
    assert src.class_names == ("cat", "dog") and {k: len(v) for k, v in splits.items()} == {
        "train": 8, "val": 2, "test": 2}
    _class_folders(tmp_path / "b", {"train": 3, "cat": 3})  # "train" beside another image folder: a class
    src = ImageFolder(str(tmp_path / "b"), shape=[3, 8, 8], val_size=1, test_size=1)
    src.load()
    assert src.class_names == ("cat", "train")
    _class_folders(tmp_path / "c" / "train", {"cat": 4, "dog": 4})
    _class_folders(tmp_path / "c", {"test": 3})  # test/ holds its images directly: no labels
    with pytest.raises(DatasetFormatError, match=r"test/ under .* has images outside class subfolders, while "
                                                 r"train/ has one subfolder per class"):
        ImageFolder(str(tmp_path / "c"), shape=[3, 8, 8]).load()


def test_image_folder_applies_the_exif_orientation(tmp_path):
    """A phone JPEG stored sideways with EXIF orientation 6 is read as it displays (it came rotated)."""
    a = np.zeros((8, 12, 3), dtype=np.uint8)
    a[:2] = 255  # a band along the top of the stored pixels
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    (tmp_path / "r").mkdir()
    im.save(tmp_path / "r" / "photo.png", exif=exif.tobytes())
    x = ImageFolder(str(tmp_path / "r"), shape=[3, 12, 8], val_size=0, test_size=0).load()["train"].x[0]
    assert x.shape == (3, 12, 8)
    assert int(x[0, :, -2:].float().mean()) == 255 and int(x[0, :, :-2].float().max()) == 0  # the band: at the right


def test_imagenet_auto_warns_when_van_den_oords_release_is_half_there(tmp_path, caplog):
    write_npz_layout(tmp_path, n_batches=10)
    (tmp_path / "train_32x32").mkdir()  # valid_32x32/ not extracted yet
    with caplog.at_level(logging.WARNING, logger="scoreflow.data.imagenet"):
        src = DownsampledImageNet(str(tmp_path), val_size=1)
        src.load()
    assert src.layout_used == "npz"
    assert "release (png, the likelihood papers') is incomplete" in caplog.text and "valid_32x32/" in caplog.text


def test_labels_outside_the_formats_range_are_refused(cifar_root, mnist_root, tmp_path):
    """Another data set in a known layout (CIFAR-100-like labels, EMNIST, ImageNet above 1000) loaded with labels
    the source's num_classes does not cover, and a classifier's loss failed far from the cause (data audit)."""
    root, _ = cifar_root
    batch = root / "cifar-10-batches-py" / "data_batch_2"
    d = pickle.loads(batch.read_bytes())
    d[b"labels"] = [11] * len(d[b"labels"])
    batch.write_bytes(pickle.dumps(d, protocol=2))
    with pytest.raises(DatasetFormatError, match=r"data_batch_2: CIFAR-10 labels are 0..9, these run 11..11"):
        CIFAR10(str(root)).load()
    mroot, data = mnist_root
    write_idx(mroot / "t10k-labels-idx1-ubyte", np.arange(6) + 40, gz=False)
    with pytest.raises(DatasetFormatError, match=r"MNIST labels are 0..9, these run 40..45"):
        MNIST(str(mroot)).load()
    write_npz_layout(tmp_path / "in32")
    np.savez(tmp_path / "in32" / "val_data.npz", data=rng_images(9, 2, 3, 32, 32).reshape(2, -1), labels=[1, 1001])
    with pytest.raises(DatasetFormatError, match="labels 1..1000"):
        DownsampledImageNet(str(tmp_path / "in32")).load()
