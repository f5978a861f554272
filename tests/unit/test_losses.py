"""DSM and ISM losses against closed forms for Gaussian data and Monte-Carlo identities (float64, seeded).

Conventions of :mod:`scoreflow.losses` checked here (``x_t = alpha_t x0 + sigma_t z``, ``D`` data dims):

- ``dsm_loss(form="score") = ||s + z / sigma_t||^2`` (Table 1's ``l(t)``), ``form="eps" = sigma_t^2 l(t)``;
- ``ism_loss(form="score") = ||s||^2 + 2 div s`` (Hutchinson, Rademacher probe), ``form="eps" = sigma_t^2 (.) + D``.

Independent oracles:

- Vincent (2011): ``E[DSM_score(s)] = E[ISM_score(s)] + E||grad log p_0t||^2 = E[ISM_score(s)] + D / sigma_t^2`` for
  every ``s``, hence ``E[DSM_eps(s)] = E[ISM_eps(s)]``, and ``DSM(s1) - DSM(s2) = ISM(s1) - ISM(s2)`` in expectation;
- ``E[DSM_score(s)] - E[DSM_score(s*)] = E||s - s*||^2`` with ``s*`` the exact score of the marginal ``p_t``;
- Gaussian data ``N(mu, diag(v))``: ``p_t = N(alpha mu, diag(S))``, ``S = alpha^2 v + sigma^2``,
  ``s* = -(x - alpha mu) / S``, ``E||s*||^2 = tr S^-1 = -div s*``, so ``E[ISM_score(s*)] = -tr S^-1`` and
  ``E[DSM_eps(s*)] = D - sigma^2 tr S^-1 = sum_i alpha^2 v_i / S_i``.

Monte-Carlo comparisons are z-tests with the sample standard error of the per-example values.
"""

import math

import pytest
import torch

from scoreflow.losses import dsm_loss, ism_loss
from scoreflow.oracles import GaussianMixture, gaussian
from scoreflow.sde import VESDE, VPSDE, SubVPSDE
from scoreflow.weighting import LikelihoodWeighting, OriginalWeighting

SDES = [VPSDE(), SubVPSDE(), VESDE()]
IDS = ["vp", "subvp", "ve"]
EVENT = (1, 2, 2)  # tiny images: exercises the per-example reductions over [C, H, W]
D = 4
N = 20000
Z_MAX = 4.0
F64 = torch.float64

MEAN = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=F64)
VAR = torch.tensor([0.3, 1.5, 0.8, 2.0], dtype=F64)


def _gauss() -> GaussianMixture:
    return gaussian(MEAN, VAR, EVENT)


def _mixture() -> GaussianMixture:
    means = torch.tensor([[1.0, -1.0, 0.5, 2.0], [-1.5, 0.5, -0.5, -1.0]], dtype=F64)
    variances = torch.tensor([[0.2, 0.5, 0.3, 0.4], [0.6, 0.1, 0.4, 0.3]], dtype=F64)
    return GaussianMixture(torch.tensor([0.35, 0.65]), means, variances, EVENT)


def _affine_score(seed: int = 1):
    """A wrong, non-symmetric affine score ``s(x, t) = (W x + b) / (1 + t)``: a dense Jacobian, so the Hutchinson
    probe matters (its divergence is ``tr W / (1 + t)``)."""
    g = torch.Generator().manual_seed(seed)
    W = -0.7 * torch.eye(D, dtype=F64) + 0.4 * torch.randn(D, D, generator=g, dtype=F64)
    b = 0.5 * torch.randn(D, generator=g, dtype=F64)

    def score(x, t):
        out = (x.reshape(x.shape[0], -1) @ W.T + b) / (1 + t)[:, None]
        return out.reshape(x.shape)

    return score


def _draws(data: GaussianMixture, n: int, gen: torch.Generator):
    x0 = data.sample(n, generator=gen)
    z = torch.randn(x0.shape, generator=gen, dtype=F64)
    v = torch.randint(0, 2, x0.shape, generator=gen).to(F64) * 2 - 1
    return x0, z, v


def _times(n: int, gen: torch.Generator, lo: float = 0.05) -> torch.Tensor:
    return lo + (1 - lo) * torch.rand(n, generator=gen, dtype=F64)


def _sq(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).pow(2).sum(1)


def _assert_mean(samples: torch.Tensor, expected: float, what: str) -> None:
    """z-test of ``E[samples] = expected`` with the sample standard error (floored at float64 round-off)."""
    m = float(samples.mean())
    se = float(samples.std()) / math.sqrt(samples.numel())
    tol = Z_MAX * se + 1e-10 * (1 + abs(expected))
    assert abs(m - expected) <= tol, (
        f"{what}: mean {m:.6g} vs {expected:.6g}, z = {(m - expected) / max(se, 1e-300):.2f}"
    )


def _sigma(sde, t):
    return sde.sigma(t).reshape(-1)


# ----------------------------------------------------------------- Vincent (2011): DSM - ISM is model-independent


@pytest.mark.parametrize("form", ["eps", "score"])
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_dsm_minus_ism_same_for_two_models(sde, form, gen):
    """Common random numbers: DSM(s1) - DSM(s2) and ISM(s1) - ISM(s2) agree in expectation (t ~ U[0.05, 1])."""
    data = _mixture()
    x0, z, v = _draws(data, N, gen)
    t = _times(N, gen)
    s1, s2 = data.score_fn(sde), _affine_score()
    d_dsm = dsm_loss(s1, sde, x0, t, noise=z, form=form) - dsm_loss(s2, sde, x0, t, noise=z, form=form)
    d_ism = ism_loss(s1, sde, x0, t, noise=z, probe=v, form=form) - ism_loss(
        s2, sde, x0, t, noise=z, probe=v, form=form
    )
    assert d_dsm.shape == d_ism.shape == (N,)
    _assert_mean((d_dsm - d_ism).detach(), 0.0, f"{type(sde).__name__} {form}")


@pytest.mark.parametrize("model", ["exact", "affine"])
@pytest.mark.parametrize("form", ["eps", "score"])
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_dsm_minus_ism_constant_value(sde, form, model, gen):
    """At fixed t the constant itself: ``E||grad log p_0t||^2 = D / sigma_t^2`` (score form), 0 (eps form)."""
    data = _mixture()
    score = data.score_fn(sde) if model == "exact" else _affine_score()
    for t0 in (0.1, 0.5, 1.0):
        x0, z, v = _draws(data, N, gen)
        t = torch.full((N,), t0, dtype=F64)
        diff = dsm_loss(score, sde, x0, t, noise=z, form=form) - ism_loss(
            score, sde, x0, t, noise=z, probe=v, form=form
        )
        const = D / float(_sigma(sde, t[:1])) ** 2 if form == "score" else 0.0
        _assert_mean(diff.detach(), const, f"{type(sde).__name__} {form} {model} t={t0}")


@pytest.mark.parametrize("form", ["eps", "score"])
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_dsm_excess_over_exact_score_is_squared_score_error(sde, form, gen):
    """``DSM_score(s) - DSM_score(s*) = ||s - s*||^2`` in expectation (``sigma_t^2`` times that in eps form)."""
    data = _mixture()
    x0, z, _ = _draws(data, N, gen)
    t = _times(N, gen)
    exact, wrong = data.score_fn(sde), _affine_score()
    excess = dsm_loss(wrong, sde, x0, t, noise=z, form=form) - dsm_loss(exact, sde, x0, t, noise=z, form=form)
    x_t = sde.perturb(x0, t, z)
    err = _sq(wrong(x_t, t) - exact(x_t, t))
    if form == "eps":
        err = _sigma(sde, t) ** 2 * err
    _assert_mean(excess - err, 0.0, f"{type(sde).__name__} {form}")
    assert float(err.mean()) > 0.05 * float(excess.abs().mean())  # the identity is not trivially 0 = 0


# ----------------------------------------------------------------- closed forms for Gaussian data and its exact score


def _trace_inv_cov(sde, t0: float) -> tuple[float, float]:
    """``(tr S^-1, sigma_t)`` of the marginal ``N(alpha mu, diag(S))`` of Gaussian data, in float64."""
    alpha, sigma = sde.marginal(torch.tensor([t0], dtype=F64))
    S = alpha**2 * VAR + sigma**2
    return float((1 / S).sum()), float(sigma)


@pytest.mark.parametrize("form", ["eps", "score"])
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_ism_exact_gaussian_score_closed_form(sde, form):
    """``E[ISM_score(s*)] = -tr S^-1``; eps form ``D - sigma^2 tr S^-1``. Default noise and probe (global seed)."""
    torch.manual_seed(0)
    data = _gauss()
    score = data.score_fn(sde)
    for t0 in (sde.default_eps, 0.05, 0.5, 1.0):
        x0 = data.sample(N, generator=torch.Generator().manual_seed(int(t0 * 1e5)))
        t = torch.full((N,), t0, dtype=F64)
        val = ism_loss(score, sde, x0, t, form=form).detach()
        tr, sigma = _trace_inv_cov(sde, t0)
        expected = -tr if form == "score" else D - sigma**2 * tr
        _assert_mean(val, expected, f"{type(sde).__name__} {form} t={t0}")


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_ism_divergence_term_exact_for_diagonal_jacobian(sde, gen):
    """The Gaussian score's Jacobian is ``-diag(S^-1)``, so any Rademacher probe gives the exact divergence:
    per example ``ISM_score(s*) - ||s*(x_t)||^2 = -2 tr S^-1`` with no Monte-Carlo error."""
    data = _gauss()
    score = data.score_fn(sde)
    x0, z, v = _draws(data, 64, gen)
    for t0 in (0.05, 0.5, 1.0):
        t = torch.full((64,), t0, dtype=F64)
        val = ism_loss(score, sde, x0, t, noise=z, probe=v, form="score").detach()
        norm2 = _sq(score(sde.perturb(x0, t, z), t))
        tr, _ = _trace_inv_cov(sde, t0)
        torch.testing.assert_close(val - norm2, torch.full_like(val, -2 * tr), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["eps", "score"])
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_dsm_exact_gaussian_score_closed_form(sde, form):
    """``E||sigma s*(x_t) + z||^2 = sum_i alpha^2 v_i / S_i = D - sigma^2 tr S^-1``; score form divided by sigma^2.
    Default noise (global seed)."""
    torch.manual_seed(1)
    data = _gauss()
    score = data.score_fn(sde)
    for t0 in (sde.default_eps, 0.05, 0.5, 1.0):
        x0 = data.sample(N, generator=torch.Generator().manual_seed(int(t0 * 1e5) + 7))
        t = torch.full((N,), t0, dtype=F64)
        val = dsm_loss(score, sde, x0, t, form=form)
        tr, sigma = _trace_inv_cov(sde, t0)
        alpha = float(sde.alpha(torch.tensor([t0], dtype=F64)))
        eps_form = float((alpha**2 * VAR / (alpha**2 * VAR + sigma**2)).sum())
        assert eps_form == pytest.approx(D - sigma**2 * tr, rel=1e-9)  # the two closed forms agree
        expected = eps_form if form == "eps" else eps_form / sigma**2
        _assert_mean(val, expected, f"{type(sde).__name__} {form} t={t0}")


# ----------------------------------------------------------------- forms, reductions, weightings, gradients


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_eps_and_score_forms_per_example(sde, gen):
    """Same noise and probe: ``DSM_eps = sigma^2 DSM_score`` and ``ISM_eps = sigma^2 ISM_score + D`` per example,
    which is what makes DSM and ISM interchangeable under every weighting."""
    x0, z, v = _draws(_mixture(), 16, gen)
    t = _times(16, gen, lo=1e-3)
    s = _affine_score()
    s2 = _sigma(sde, t) ** 2
    torch.testing.assert_close(
        dsm_loss(s, sde, x0, t, noise=z, form="eps"),
        s2 * dsm_loss(s, sde, x0, t, noise=z, form="score"),
        rtol=1e-10,
        atol=0,
    )
    torch.testing.assert_close(
        ism_loss(s, sde, x0, t, noise=z, probe=v, form="eps"),
        s2 * ism_loss(s, sde, x0, t, noise=z, probe=v, form="score") + D,
        rtol=1e-10,
        atol=1e-10,
    )


def _ref_g2(sde, t: torch.Tensor) -> torch.Tensor:
    """``g(t)^2`` from the SDEs' textbook definitions (independent of ``sde.g2``)."""
    if isinstance(sde, VESDE):
        return sde.sigma(t) ** 2 * 2 * math.log(sde.sigma_max / sde.sigma_min)
    beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
    if isinstance(sde, SubVPSDE):
        B = sde.beta_min * t + 0.5 * (sde.beta_max - sde.beta_min) * t**2
        return beta * (1 - torch.exp(-2 * B))
    return beta


@pytest.mark.parametrize("loss", ["dsm", "ism"])
@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_weightings_give_lambda_times_l(sde, loss, gen):
    """``weight * eps-form`` is ``lambda(t) l(t)`` (up to the model-independent ISM constant): ``lambda = sigma^2``
    for ``original``, ``lambda = g^2`` for ``likelihood`` (Song et al. 2021b, Table 1)."""
    x0, z, v = _draws(_mixture(), 16, gen)
    t = _times(16, gen, lo=1e-3)
    s = _affine_score()
    kw = {"noise": z} if loss == "dsm" else {"noise": z, "probe": v}
    fn = dsm_loss if loss == "dsm" else ism_loss
    eps_form, l_t = fn(s, sde, x0, t, form="eps", **kw), fn(s, sde, x0, t, form="score", **kw)
    sigma2 = _sigma(sde, t) ** 2
    const = 0.0 if loss == "dsm" else D  # ISM_eps = sigma^2 l_ISM + D
    orig = OriginalWeighting(sde, eps=1e-3).weight(t) * eps_form
    lik = LikelihoodWeighting(sde, eps=1e-3).weight(t) * eps_form
    torch.testing.assert_close(orig, sigma2 * l_t + const, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lik, _ref_g2(sde, t) * l_t + _ref_g2(sde, t) / sigma2 * const, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fn", [dsm_loss, ism_loss], ids=["dsm", "ism"])
def test_shape_reduce_and_errors(fn, gen):
    sde = VPSDE()
    x0 = torch.randn(5, 3, 2, 2, generator=gen, dtype=F64)
    z = torch.randn(x0.shape, generator=gen, dtype=F64)
    v = torch.randint(0, 2, x0.shape, generator=gen).to(F64) * 2 - 1
    t = _times(5, gen)
    kw = {"noise": z} if fn is dsm_loss else {"noise": z, "probe": v}

    def score(x, t):
        return -x * x.sum((1, 2, 3), keepdim=True) / (1 + t[:, None, None, None])  # examples do not interact

    for form in ("eps", "score"):
        total = fn(score, sde, x0, t, form=form, reduce="sum", **kw)
        mean = fn(score, sde, x0, t, form=form, reduce="mean", **kw)
        assert total.shape == mean.shape == (5,)
        torch.testing.assert_close(mean, total / 12, rtol=1e-12, atol=0)
        # per example: the batch does not mix (example 2 alone gives the same value)
        one = fn(score, sde, x0[2:3], t[2:3], form=form, **{k: a[2:3] for k, a in kw.items()})
        torch.testing.assert_close(one, total[2:3], rtol=1e-12, atol=0)
        with torch.no_grad():  # validation under no_grad: the same values
            torch.testing.assert_close(fn(score, sde, x0, t, form=form, **kw), total.detach(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="form"):
        fn(score, sde, x0, t, form="x0", **kw)
    with pytest.raises(ValueError, match="reduce"):
        fn(score, sde, x0, t, reduce="max", **kw)


@pytest.mark.parametrize("form", ["eps", "score"])
def test_ism_gradient_through_divergence(form, gen):
    """ISM keeps the graph of its divergence: for ``s = W x + b`` the per-batch gradient is, in closed form,
    ``sum_n c_n (2 (W x_n + b) x_n^T + 2 v_n v_n^T)`` and ``sum_n c_n 2 (W x_n + b)``, ``c_n = sigma_n^2`` or 1."""
    sde = SubVPSDE()
    x0, z, v = _draws(_mixture(), 8, gen)
    t = _times(8, gen)
    W = (0.3 * torch.randn(D, D, generator=gen, dtype=F64)).requires_grad_(True)
    b = torch.randn(D, generator=gen, dtype=F64).requires_grad_(True)

    def score(x, t):
        return (x.reshape(x.shape[0], -1) @ W.T + b).reshape(x.shape)

    ism_loss(score, sde, x0, t, noise=z, probe=v, form=form).sum().backward()
    x = sde.perturb(x0, t, z).reshape(8, D)
    vf = v.reshape(8, D)
    c = _sigma(sde, t) ** 2 if form == "eps" else torch.ones(8, dtype=F64)
    s = x @ W.detach().T + b.detach()
    gW = torch.einsum("n,ni,nj->ij", c, 2 * s, x) + torch.einsum("n,ni,nj->ij", c, 2 * vf, vf)
    gb = (c[:, None] * 2 * s).sum(0)
    torch.testing.assert_close(W.grad, gW, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(b.grad, gb, rtol=1e-10, atol=1e-10)
