"""Controllable generation: imputation, colorization, guidance (exact scores), and mask builders."""

import pytest
import torch

from scoreflow.oracles import GaussianMixture, gaussian
from scoreflow.sampling import (
    COLOR_DECOUPLE,
    center_mask,
    classifier_guided_score,
    colorize,
    couple,
    decouple,
    half_mask,
    inpaint,
    mask_from_png,
    pc_sample,
    random_mask,
)
from scoreflow.sde import VESDE, VPSDE, SubVPSDE

SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}



@pytest.mark.parametrize("sde_name", list(SDES))
def test_inpainting_independent_gaussian_is_exact(sde_name):
    """Known pixels come back exactly; unknown ones have their (here: marginal) mean and variance."""
    sde = SDES[sde_name]
    mu, var = torch.tensor([0.5, -1.0, 0.3, 1.5]), torch.tensor([0.3, 1.0, 0.5, 0.2])
    target = gaussian(mu, var, event_shape=(1, 2, 2))
    y = torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mask = half_mask(2, missing="right")  # [1, 1, 2, 2], column 1 unknown
    res = inpaint(
        target.score_fn(sde), sde, y, mask, corrector="none", steps=200, generator=torch.Generator().manual_seed(0)
    )
    x = res.samples
    assert torch.equal(x[..., 0], y[..., 0])
    m, v = mu.reshape(2, 2)[:, 1].double(), var.reshape(2, 2)[:, 1].double()
    se = (v / 2000).sqrt()
    assert ((x[:, 0, :, 1].mean(0) - m).abs() < 4 * se).all()
    assert ((x[:, 0, :, 1].var(0) / v - 1).abs() < 0.12).all()
    assert res.nfe == 201


@pytest.mark.parametrize("sde_name", list(SDES))
def test_inpainting_mixture_picks_the_component_of_the_known_pixels(sde_name):
    """Components at -2 and +2 (std 0.5): known pixels near +2 make the unknown ones ~N(2, 0.25)."""
    sde = SDES[sde_name]
    mix = GaussianMixture(torch.ones(2), torch.tensor([[-2.0] * 4, [2.0] * 4]), torch.tensor([0.25, 0.25]), (1, 2, 2))
    y = torch.full((1000, 1, 2, 2), 2.0, dtype=torch.float64)
    y[..., 0] = torch.tensor([2.1, 1.9], dtype=torch.float64)
    res = inpaint(
        mix.score_fn(sde), sde, y, half_mask(2), corrector="ald", steps=200, generator=torch.Generator().manual_seed(0)
    )
    unknown = res.samples[..., 1]
    assert torch.equal(res.samples[..., 0], y[..., 0])
    assert ((unknown.mean(0) - 2.0).abs() < 0.1).all()
    assert ((unknown.std(0) / 0.5 - 1).abs() < 0.15).all()


def _recording(score_fn, seen):
    def fn(x, t):
        seen.append((float(t.flatten()[0]), x.detach().clone()))
        return score_fn(x, t)
    return fn


def _kernel(sde, t):
    """Mean factor alpha_t and standard deviation sigma_t of p_0t, read from sde.perturb itself."""
    one, tt = torch.ones(1, dtype=torch.float64), torch.full((1,), t, dtype=torch.float64)
    alpha = float(sde.perturb(one, tt, torch.zeros_like(one)))
    return alpha, float(sde.perturb(torch.zeros_like(one), tt, one))


@pytest.mark.parametrize("sde_name", list(SDES))
def test_inpainting_feeds_the_score_the_known_entries_freshly_noised_by_the_perturbation_kernel(sde_name):
    """At every score call the known entries must be a fresh draw of N(alpha_t y, sigma_t^2): the other tests
    cannot see a wrong noise there for independent pixels (audit: no noise, no alpha_t or twice the noise all
    passed for VP). Also: NaN in the unknown entries of the input stays out, and known_error is the sampler's own
    distance from the known entries before they are put back."""
    sde, n = SDES[sde_name], 4000
    target = gaussian(torch.zeros(4), 1.0, event_shape=(1, 2, 2))
    y = torch.full((n, 1, 2, 2), 0.7, dtype=torch.float64)
    y[..., 1] = float("nan")  # unknown column: never read
    seen = []
    res = inpaint(_recording(target.score_fn(sde), seen), sde, y, half_mask(2), corrector="none", steps=20,
                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(res.samples).all() and torch.equal(res.samples[..., 0], y[..., 0])
    assert len(seen) == 21
    checked = 0
    for t, x in seen[::4]:
        alpha, sigma = _kernel(sde, t)
        known = x[..., 0].flatten()
        assert abs(float(known.mean()) - alpha * 0.7) < 5 * sigma / (known.numel() ** 0.5), (t, sde_name)
        assert abs(float(known.std()) / sigma - 1) < 0.05, (t, sde_name, float(known.std()), sigma)
        checked += 1
    assert checked == 6
    assert res.known_error is not None and 0 < res.known_error < 0.25  # the last state held the condition (~0.04)


def test_colorization_feeds_the_score_the_grey_level_freshly_noised():
    """The same for colorization (VP): the grey level of what the score sees is N(alpha_t g, sigma_t^2 / 3)."""
    sde, n = SDES["vp"], 4000
    target = gaussian(torch.zeros(12), 1.0, event_shape=(3, 2, 2))
    gray = torch.full((n, 1, 2, 2), -0.4, dtype=torch.float64)
    seen = []
    res = colorize(_recording(target.score_fn(sde), seen), sde, gray, corrector="none", steps=20,
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(res.samples.mean(1, keepdim=True), gray, rtol=0, atol=1e-12)
    for t, x in seen[::5]:
        alpha, sigma = _kernel(sde, t)
        g = x.mean(1).flatten()
        assert abs(float(g.mean()) - alpha * -0.4) < 5 * sigma / (3 * g.numel()) ** 0.5, t
        assert abs(float(g.std()) / (sigma / 3**0.5) - 1) < 0.05, (t, float(g.std()), sigma)
    assert res.known_error is not None and 0 < res.known_error < 0.25


def test_color_matrix_is_orthogonal_with_a_grey_axis():
    M = COLOR_DECOUPLE
    torch.testing.assert_close(M @ M.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(M[:, 0], torch.full((3,), 3**-0.5, dtype=torch.float64))
    paper = torch.tensor([[0.577, -0.816, 0], [0.577, 0.408, 0.707], [0.577, 0.408, -0.707]], dtype=torch.float64)
    torch.testing.assert_close(M, paper, rtol=0, atol=6e-4)  # App. I.3 prints 3 digits
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(couple(decouple(x)), x)
    torch.testing.assert_close(decouple(x)[:, 0], x.sum(1) / 3**0.5)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_colorization_keeps_the_grey_level_and_fills_colour(sde_name):
    """For isotropic RGB Gaussian data the decoupled channels are independent, so the colour is exact."""
    sde, n = SDES[sde_name], 1000
    mu = torch.linspace(-0.5, 0.9, 12, dtype=torch.float64)
    target = gaussian(mu, 0.2, event_shape=(3, 2, 2))
    gray = torch.full((n, 1, 2, 2), 0.3, dtype=torch.float64)
    res = colorize(
        target.score_fn(sde), sde, gray, corrector="none", steps=200, generator=torch.Generator().manual_seed(0)
    )
    x = res.samples
    assert x.shape == (n, 3, 2, 2)
    torch.testing.assert_close(x.mean(1, keepdim=True), gray, rtol=0, atol=1e-12)
    u = decouple(mu.reshape(1, 3, 2, 2))
    u[:, 0] = 3**0.5 * 0.3
    expected_var = 0.2 * 2 / 3  # the two imputed unit directions carry 2/3 of each channel
    assert (x.mean(0) - couple(u)[0]).abs().max() < 5 * (expected_var / n) ** 0.5
    assert abs(x.var(0).mean() / expected_var - 1) < 0.1


@pytest.mark.parametrize("sde_name", list(SDES))
def test_classifier_guidance_with_exact_posterior_samples_the_component(sde_name):
    """p_t(y | x) of a 2-component mixture is exact; guided sampling with scale 1 samples component y."""
    sde = SDES[sde_name]
    mix = GaussianMixture(
        torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), torch.tensor([[0.3, 0.5], [0.4, 0.2]])
    )
    comps = [gaussian(mix.means[k], mix.variances[k]) for k in range(2)]

    def classifier(x, t):  # logits log w_k + log N_k,t(x): softmax gives the exact p_t(y | x)
        return torch.stack([mix.log_w[k] + comps[k].log_prob(x, sde, t) for k in range(2)], dim=1)

    for y in (0, 1):
        score = classifier_guided_score(mix.score_fn(sde), classifier, y, scale=1.0)
        x = pc_sample(
            score,
            sde,
            (2000, 2),
            corrector="none",
            steps=250,
            generator=torch.Generator().manual_seed(y),
            dtype=torch.float64,
        ).samples
        mean, var = mix.means[y], mix.variances[y]
        assert ((x.mean(0) - mean).abs() < 4 * (var / 2000).sqrt()).all(), (y, x.mean(0))
        assert ((x.var(0) / var - 1).abs() < 0.12).all(), (y, x.var(0))
        assert torch.cov(x.T)[0, 1].abs() < 0.05


def test_guidance_labels_per_example_and_scale_zero():
    x, t = torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=torch.float64)

    def classifier(x, t):  # linear logits: grad log softmax_y = w_y - sum_k p_k w_k
        return x @ w.T

    base = lambda x, t: -x  # noqa: E731
    labels = torch.tensor([0, 1, 1, 0])
    got = classifier_guided_score(base, classifier, labels, scale=2.0)(x, t)
    p = (x @ w.T).softmax(dim=1)
    torch.testing.assert_close(got, -x + 2.0 * (w[labels] - p @ w))
    torch.testing.assert_close(classifier_guided_score(base, classifier, 0, scale=0.0)(x, t), -x)
    with torch.no_grad():  # samplers run under no_grad; guidance must still differentiate
        torch.testing.assert_close(classifier_guided_score(base, classifier, labels, scale=2.0)(x, t), got)


def test_mask_builders(tmp_path):
    m = center_mask(8, frac=0.5)
    assert m.shape == (1, 1, 8, 8) and m.sum() == 64 - 16 and m[0, 0, 2:6, 2:6].sum() == 0
    h = half_mask((4, 6), missing="bottom")
    assert h[0, 0, :2].all() and not h[0, 0, 2:].any()
    r1, r2 = random_mask(16, p_known=0.3, seed=5), random_mask(16, p_known=0.3, seed=5)
    assert torch.equal(r1, r2) and 0.15 < r1.mean() < 0.45 and not torch.equal(r1, random_mask(16, 0.3, seed=6))
    from PIL import Image

    img = torch.zeros(6, 6, dtype=torch.uint8)
    img[:, :3] = 255
    Image.fromarray(img.numpy()).save(tmp_path / "mask.png")
    p = mask_from_png(tmp_path / "mask.png")
    assert p.shape == (1, 1, 6, 6) and p[0, 0, :, :3].all() and not p[0, 0, :, 3:].any()
    assert mask_from_png(tmp_path / "mask.png", size=3).shape == (1, 1, 3, 3)
    with pytest.raises(ValueError):
        half_mask(4, missing="middle")


def test_inpaint_refuses_a_mask_that_does_not_fit_the_data():
    """A mask broadcasting to more images than given returned that many samples (2 for 1 image); another shape
    failed inside the score function, which was blamed."""
    sde = VPSDE()
    target = gaussian(torch.zeros(16), torch.ones(16), event_shape=(1, 4, 4))
    y = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    for bad in (torch.ones(2, 1, 4, 4), torch.ones(1, 1, 1, 4, 4), torch.ones(1, 1, 3, 4)):
        with pytest.raises(ValueError, match=r"mask of shape .* does not broadcast to the data's shape \[1, 1, 4, 4\]"):
            inpaint(target.score_fn(sde), sde, y, bad, corrector="none", steps=2)
    res = inpaint(target.score_fn(sde), sde, y, torch.ones(1, 1, 4, 4), corrector="none", steps=2)
    assert res.samples.shape == (1, 1, 4, 4)


def test_inpaint_refuses_a_soft_mask_and_takes_a_boolean_one():
    """A mask of 0.5 blended the clamped known sample with the free one: neither imputation nor data."""
    sde = VPSDE()
    target = gaussian(torch.zeros(16), torch.ones(16), event_shape=(1, 4, 4))
    y = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    soft = torch.full((1, 1, 4, 4), 0.5)
    with pytest.raises(ValueError, match=r"only 0 \(to fill in\) and 1 \(known\); got values \[0.5\]"):
        inpaint(target.score_fn(sde), sde, y, soft, corrector="none", steps=2)
    hard = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    hard[..., :2] = True
    res = inpaint(target.score_fn(sde), sde, y + 3, hard, corrector="none", steps=2)
    assert (res.samples[..., :2] == 3).all() and (res.samples[..., 2:] != 3).all()


def test_guidance_refuses_labels_that_are_not_class_indices():
    x, t = torch.randn(2, 2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    base = lambda x, t: -x  # noqa: E731
    classifier = lambda x, t: x @ torch.eye(2, dtype=x.dtype)  # noqa: E731  2 classes
    for bad, what in ((torch.tensor([0.7, 1.2]), "torch.float32"), (1.5, "torch.float32"), (-1, "values \\[-1\\]"),
                      (torch.tensor([[0, 1]]), "shape \\[1, 2\\]"), (True, "torch.bool")):
        with pytest.raises(ValueError, match=f"y must be a class index >= 0.*{what}"):
            classifier_guided_score(base, classifier, bad)
    with pytest.raises(ValueError, match=r"label 2 but the classifier has 2 classes \(0..1\)"):
        classifier_guided_score(base, classifier, torch.tensor([0, 2]))(x, t)
