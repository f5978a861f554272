"""Exact likelihood of the probability-flow ODE, ``-log p^ODE_eps(x)`` (Song et al. 2021, App. D.2).

The ODE ``dx/dt = F(x, t) = f(x, t) - g(t)^2 s(x, t) / 2`` is a continuous normalizing flow from ``p_eps`` to
``p_T``; by the instantaneous change of variables (Chen et al. 2018), ``d log p_t(x(t)) / dt = -div F``, so

    log p_eps(x) = log pi(x_T) + int_eps^T div F(x(t), t) dt,     div F = a(t) D - g(t)^2 div s / 2.

We integrate the augmented state ``[x, delta_logp]`` forward from ``eps`` to ``T`` with ``torchdiffeq``, the
whole batch as one system (as the reference does). ``div f = a(t) D`` is exact; only ``div s`` is estimated
(exact autograd loop, or a Hutchinson probe drawn once per solve and held fixed along the trajectory).

Two kinds of solve:

* adaptive (``method="dopri5"``, ``bosh3``, ...): step sizes from ``rtol``/``atol`` error control (the reference);
* fixed grid (``method="rk4"`` -- torchdiffeq's 3/8-rule RK4 -- ``heun3``, ``midpoint``, ``euler``) with ``steps``
  steps on the power grid ``t_i = (eps^(1/rho) + i/N (T^(1/rho) - eps^(1/rho)))^rho`` (``grid_rho``; 3 for VP and
  subVP: short steps near ``eps``, where their ODE is stiff, nearly even steps late; 1 for VE, which is not stiff).
  On trained networks the right-hand side wiggles in ``t`` (the sinusoidal embedding of ``999 t`` has periods
  down to ~0.006): an adaptive solver resolves every wiggle although their effect on ``log p`` averages out, so at
  equal error a fixed grid needs several times fewer evaluations (``bench/likelihood_speed.py``). A fixed grid has
  no error control: check its error against a tight adaptive solve (``evaluate.py`` reports it under the result).
  ``grid=`` takes explicit times instead (e.g. a grid frozen once per model and reused for every batch).
* ``method="rk4_shared"``: the same 3/8-rule RK4 steps for ``x``, but the fourth stage (at the step's end, on an
  intermediate state) is a forward pass only; ``delta_logp`` takes the 3/8-rule weights on the divergences of the
  first three stages and of the next step's first stage (same time, accepted state). So 3 vector-Jacobian products
  per step instead of 4 (plus one at ``T``): ~13 % less CPU time per step on the default run's model, where its
  errors at equal steps are like ``rk4``'s (they are aliasing there, below). ``x`` and ``z`` are exactly rk4's;
  ``delta_logp`` is only second order in the step on smooth problems (the fourth stage's O(h^2) state error no
  longer cancels in it): on the tests' Gaussian mixture it is ~100x less accurate than rk4 at 80 steps.
* ``method="exp_pc3"`` (also ``exp_pc2``, ``exp_pc4``: the order): an exponential-integrator Adams
  predictor-corrector in ``lambda = log(alpha_t / sigma_t)`` on the same grids (:func:`_exp_pc`). In ``y = x/alpha``
  and ``r = sigma/alpha`` the ODE is ``dy = eps_hat dr`` exactly (DDIM's form), so the stiff linear part costs
  nothing; ``eps_hat = -sigma s`` and its divergence are interpolated in ``lambda`` through past evaluations
  (DPM-Solver's multistep idea, with a UniPC-style corrector that reuses the new evaluation). One network call
  (forward + vector-Jacobian product) per step instead of RK4's four, third order on smooth problems (oracle
  tests). On the default run's model (subVP, 3600 steps) 60 steps are 5.6x cheaper than score_sde_pytorch's method
  at a smaller max error over 192 test images, with the same mean error; but its interpolation through past
  evaluations amplifies the network's wiggles in ``t``: on a second seed 60 steps miss the reference's max error
  (70 pass, 4.8x), and on the wigglier VP model of 1500 steps its mean error is 2-3x the reference's at 60-80
  steps. So ``rk4`` with 50 steps stays the default (``bench/likelihood_speed.py``, README "ODE likelihood speed").

What limits a fixed grid on a trained network (the default run's model, ``bench/likelihood_speed.py``): the error is
aliasing of those wiggles by steps longer than their periods, not the truncation error of a smooth solution. It
looks like noise: per-image errors of grids shifted by a fraction of a step are uncorrelated or anti-correlated, and
their mean over images is ~0. The per-step contributions to the error in ``log p`` (the local error of a step,
carried to the result with the score as the sensitivity of ``log p`` to the state) are already nearly equal on the
rho = 3 power grid wherever t > 0.05, and tiny below it, so a grid fitted to them from a pilot (equidistribution)
does not beat it. Neither did, at equal evaluations, rho in [2, 5] (better at some step counts, worse at others),
midpoint or heun3, Adams-Bashforth 3/4 (one evaluation per step, all nodes distinct) or phase-shifted grids: all lie
on one error-versus-NFE curve. Some two-piece grids (power grid below t = 0.1, even steps above) happen to alias
less on some images of this model, but not robustly: 19 even steps passed three sets of 64 test images at the
reference's max error, 20 passed two, 21 one, and 20 shifted by a quarter step neither of the two it was tried on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchdiffeq import odeint

from scoreflow.likelihood.divergence import Divergence, draw_probe, estimate_divergence
from scoreflow.likelihood.truncation import truncation_correction as _truncation_correction
from scoreflow.sde import SDE
from scoreflow.utils import ScoreFn, append_dims, as_time, flat_dim, shape_checked

EXP_PC_METHODS: tuple[str, ...] = ("exp_pc2", "exp_pc3", "exp_pc4")


# torchdiffeq's Adams methods are fixed-grid solvers whose multistep weights assume equal steps: on the power grid
# (short steps near eps) they diverged (3.5e9 bits/dim with 20 steps on a digits model). Taken for adaptive ones
# before, they stepped from eps to T in one step: 4 NFE, 0.7 bits/dim off, and the solver check re-solved with the
# same one step, so it vouched for them (audit). Refused by name.
UNEQUAL_STEP_UNSAFE: tuple[str, ...] = ("explicit_adams", "implicit_adams", "fixed_adams")
FIXED_GRID_METHODS: tuple[str, ...] = ("rk4", "rk4_shared", "heun3", "midpoint", "euler", "heun2", *EXP_PC_METHODS)
ODE_DTYPES: tuple[str, ...] = ("float32", "float64")  # the solve's precision (float16 underflows dt)


def ode_methods() -> tuple[str, ...]:
    """Every ``method`` :func:`ode_log_likelihood` accepts: its fixed grids and torchdiffeq's solvers."""
    from torchdiffeq._impl.odeint import SOLVERS  # torchdiffeq's registry: the names odeint accepts

    left_out = ("scipy_solver", *UNEQUAL_STEP_UNSAFE)
    return tuple(sorted({*FIXED_GRID_METHODS, *(m for m in SOLVERS if m not in left_out)}))


def power_grid(eps: float, T: float, steps: int, rho: float = 3.0, *, dtype=torch.float64, device=None) -> Tensor:
    """``steps + 1`` times from ``eps`` to ``T``, evenly spaced in ``t^(1/rho)`` (the ends are exact)."""
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    a, b = eps ** (1.0 / rho), T ** (1.0 / rho)
    grid = (a + u * (b - a)) ** rho
    grid[0], grid[-1] = eps, T
    return grid.to(dtype=dtype, device=device)


def default_grid_rho(sde: SDE, method: str) -> float:
    """The power grid's exponent when none is given: the SDE's (3 for VP/subVP: short steps near the stiff ``eps``
    end; 1 for VE), at most 2 for ``exp_pc*``, which integrates the stiff linear part exactly (on the default run's
    model 60 steps at rho = 2 had max errors 9.6e-4 / 8.7e-4 / 9.7e-4 on three sets of 64 test images, against
    1.4e-3 / 1.6e-3 / 2.3e-3 at rho = 3; ``bench/likelihood_speed.py``)."""
    rho = float(sde.ode_grid_rho)
    return min(rho, 2.0) if method in EXP_PC_METHODS else rho


def check_grid(grid: Tensor | Sequence[float], eps: float, T: float, *, dtype=torch.float64, device=None) -> Tensor:
    """An explicit time grid as a 1-D tensor: at least two strictly increasing times from ``eps`` to ``T``."""
    g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu()
    if g.ndim != 1 or g.numel() < 2:
        raise ValueError(f"grid must be a 1-D sequence of at least 2 times, got shape {tuple(g.shape)}")
    if not bool(torch.isfinite(g).all()) or not bool((g[1:] > g[:-1]).all()):
        raise ValueError("grid must be finite and strictly increasing")
    tol = 1e-12 * max(1.0, abs(T))
    if abs(float(g[0]) - eps) > tol or abs(float(g[-1]) - T) > tol:
        raise ValueError(f"grid must run from eps={eps:g} to T={T:g}, got [{float(g[0]):g}, {float(g[-1]):g}]")
    g = g.clone()
    g[0], g[-1] = eps, T
    return g.to(dtype=dtype, device=device)


@dataclass
class ODELikelihood:
    """Result of :func:`ode_log_likelihood`; per-example values are ``[B]`` tensors in nats.

    Attributes:
        nll: ``-(prior_logp + delta_logp) + correction``.
        nfe: number of evaluations of the ODE right-hand side (each is one score call plus its divergence;
            the one extra score call of the truncation correction is not counted).
        z: the latent ``x_T``, shaped like ``x``.
        delta_logp: ``int_eps^T div F dt`` along the trajectory.
        prior_logp: ``log pi(x_T)``.
        correction: the eps-truncation correction (zeros unless requested).
        nfe_drift_only: score calls without a divergence (``rk4_shared``'s fourth stages; 0 for other methods).
            Each costs a forward pass only, about 0.4 of an evaluation with its divergence on the default model.
        x_eps: where the solve started: ``x`` itself, or the draw ``x_eps ~ p_0eps(.|x)`` of the correction.
    """

    nll: Tensor
    nfe: int
    z: Tensor
    delta_logp: Tensor
    prior_logp: Tensor
    correction: Tensor
    x_eps: Tensor
    eps: float
    divergence: str
    truncation_correction: bool
    nfe_drift_only: int = 0


def ode_log_likelihood(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    *,
    eps: float | None = None,
    T: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    divergence: Divergence = "rademacher",
    probe: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    options: dict[str, Any] | None = None,
    truncation_correction: bool = False,
    steps: int | None = None,
    grid_rho: float | None = None,
    grid: Tensor | Sequence[float] | None = None,
) -> ODELikelihood:
    """Negative log-likelihood of ``x`` under the probability-flow ODE, one value per example.

    Args:
        score_fn: ``score_fn(x [B, ...], t [B]) -> [B, ...]``, shaped like ``x`` (else ``ValueError`` at its first
            evaluation); called in ``dtype`` (a network evaluated in float64 must have been converted with
            ``.double()``).
        sde: the forward SDE.
        x: data ``[B, ...]`` (``[B, D]`` or ``[B, C, H, W]``), on the scale the model was trained on.
        eps, T: integration interval; default ``sde.default_eps`` and ``sde.T``.
        rtol, atol, method, options: passed to ``torchdiffeq.odeint`` (reference: dopri5 at 1e-5, float64);
            ``rtol``/``atol`` only matter for adaptive methods. ``method="rk4_shared"`` is solved here, not by
            torchdiffeq (module docstring); ``options`` must then be empty.
        steps, grid_rho: fixed-grid methods (``FIXED_GRID_METHODS``) only: the number of steps and the exponent
            of the power grid in ``t`` (module docstring; ``None``: :func:`default_grid_rho`, 3 for VP/subVP, 1 for VE,
            2 for VP/subVP with ``exp_pc*``).
        grid: fixed-grid methods only: explicit times ``eps = t_0 < ... < t_N = T`` used instead of the power grid
            (``steps`` is then ``None`` or ``N``; ``grid_rho`` must be ``None``).
        divergence: ``"exact"`` (``D`` backward passes per step; small ``D`` only), ``"rademacher"`` or
            ``"gaussian"`` (Hutchinson, one probe per example per solve, held fixed along the trajectory).
        probe: an explicit Hutchinson probe shaped like ``x`` (overrides ``divergence``).
        generator: source of the probe and of the ``x_eps`` sample of the correction.
        dtype: compute precision (defaults to ``x.dtype``).
        truncation_correction: if ``True``, solve from one ``x_eps ~ p_0eps(.|x)`` and add the Tweedie
            decoder term minus the entropy (:mod:`scoreflow.likelihood.truncation`), which bounds
            ``-log p_0(x)`` of the model "ODE + Tweedie decoder". Off by default, as in the reference.
    """
    eps = sde.check_eps(sde.default_eps if eps is None else float(eps))
    T = sde.T if T is None else float(T)
    dtype = x.dtype if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be floating point, got {dtype}")
    x = x.detach().to(dtype)
    B, D = x.shape[0], flat_dim(x)
    if method not in ode_methods():
        why = " (its multistep weights assume equal steps: unstable on the power grid)" \
            if method in UNEQUAL_STEP_UNSAFE else ""
        raise ValueError(f"method={method!r}{why} is not one of {ode_methods()}")
    fixed = method in FIXED_GRID_METHODS
    if grid is not None:
        if not fixed:
            raise ValueError(f"grid= needs a fixed-grid method {FIXED_GRID_METHODS}; {method!r} is adaptive")
        if grid_rho is not None:
            raise ValueError("give either grid= (explicit times) or grid_rho= (the power grid), not both")
        grid = check_grid(grid, eps, T, dtype=dtype, device=x.device)
        if steps is not None and int(steps) != grid.numel() - 1:
            raise ValueError(f"steps={steps} disagrees with the {grid.numel() - 1} steps of grid=")
        steps = grid.numel() - 1
    if fixed and (steps is None or int(steps) < 1):
        raise ValueError(f"method={method!r} is a fixed-grid solver: give steps=N (e.g. 40), got steps={steps}")
    if not fixed and steps is not None:
        raise ValueError(f"steps={steps} needs a fixed-grid method {FIXED_GRID_METHODS}; {method!r} is adaptive "
                         "(its step sizes come from rtol/atol): set steps=None (evaluation.steps=null) with it")
    if method in ("rk4_shared", *EXP_PC_METHODS) and options:
        raise ValueError(f"options={options} are torchdiffeq's; method={method!r} takes none")
    grid_rho = float(default_grid_rho(sde, method) if grid_rho is None else grid_rho)
    if fixed and grid_rho <= 0:
        raise ValueError(f"grid_rho must be > 0, got {grid_rho}")
    score_fn = shape_checked(score_fn)  # its first evaluation checks the score is shaped like x

    with torch.no_grad():
        correction = torch.zeros(B, dtype=dtype, device=x.device)
        x_start = x
        if truncation_correction:
            correction, x_start = _truncation_correction(score_fn, sde, x, eps, generator=generator)
        label = divergence if probe is None else "probe"
        if probe is None:
            probe = draw_probe(divergence, x, generator=generator)
        elif probe.shape != x.shape:
            raise ValueError(f"probe must be shaped like x {tuple(x.shape)}, got {tuple(probe.shape)}")
        else:
            probe = probe.to(x)

        nfe = 0
        nfe_drift_only = 0

        def drift(t: Tensor, x_t: Tensor) -> Tensor:
            nonlocal nfe_drift_only
            nfe_drift_only += 1
            tt = as_time(t, B, x_t)
            return sde.ode_drift(x_t, tt, score_fn(x_t, tt).to(dtype))

        def score_and_div(t: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """One evaluation: ``(t as [B], s, the estimate of div s)``, both detached."""
            nonlocal nfe
            nfe += 1
            tt = as_time(t, B, x_t)
            with torch.enable_grad():
                xg = x_t.detach().requires_grad_(True)
                s = score_fn(xg, tt).to(dtype)
                div_s = estimate_divergence(s, xg, probe)
            return tt, s.detach(), div_s.detach()

        def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            x_t = state[0]
            tt, s, div_s = score_and_div(t, x_t)
            # instantaneous change of variables: div F = div f - g^2 div s / 2, with div f = a(t) D exact
            return sde.ode_drift(x_t, tt, s), sde.div_drift(tt, D) - 0.5 * sde.g2(tt) * div_s

        def eps_hat(t: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
            """``eps_hat = -sigma_t s`` and the estimate of its divergence ``-sigma_t div s``."""
            tt, s, div_s = score_and_div(t, x_t)
            sigma = sde.sigma(tt)
            return -append_dims(sigma, x_t.ndim) * s, -sigma * div_s

        ts = torch.tensor([eps, T], dtype=dtype, device=x.device)
        y0 = (x_start, torch.zeros(B, dtype=dtype, device=x.device))
        if fixed:
            if grid is None:
                grid = power_grid(eps, T, int(steps), grid_rho, dtype=dtype, device=x.device)
            options = {**(options or {}), "grid_constructor": lambda func, y0, t: grid}
        if method == "rk4_shared":
            z, delta_logp = _rk4_shared(rhs, drift, y0, grid)
        elif method in EXP_PC_METHODS:
            z, delta_logp = _exp_pc(eps_hat, sde, x_start, grid, order=int(method[-1]), dim=D)
        else:
            xs, deltas = odeint(rhs, y0, ts, rtol=rtol, atol=atol, method=method, options=options)
            z, delta_logp = xs[-1], deltas[-1]
        prior_logp = sde.prior_logp(z)
        nll = -(prior_logp + delta_logp) + correction

    return ODELikelihood(
        nll=nll,
        nfe=nfe,
        z=z,
        delta_logp=delta_logp,
        prior_logp=prior_logp,
        correction=correction,
        x_eps=x_start,
        eps=eps,
        divergence=label,
        truncation_correction=truncation_correction,
        nfe_drift_only=nfe_drift_only,
    )


def _rk4_shared(rhs, drift, y0: tuple[Tensor, Tensor], grid: Tensor) -> tuple[Tensor, Tensor]:
    """3/8-rule RK4 on ``grid`` whose fourth stage is drift-only (module docstring): ``(x_T, delta_logp)``."""
    x, delta = y0
    k1, d1 = rhs(grid[0], (x, delta))
    for i in range(grid.numel() - 1):
        t0, h = grid[i], grid[i + 1] - grid[i]
        k2, d2 = rhs(t0 + h / 3, (x + h * k1 / 3, delta))
        k3, d3 = rhs(t0 + 2 * h / 3, (x + h * (k2 - k1 / 3), delta))
        k4 = drift(grid[i + 1], x + h * (k1 - k2 + k3))
        x = x + (k1 + 3 * (k2 + k3) + k4) * (h / 8)
        # the divergence at the step's end is taken on the accepted state: it is the next step's first stage
        k1_next, d1_next = rhs(grid[i + 1], (x, delta))
        delta = delta + (d1 + 3 * (d2 + d3) + d1_next) * (h / 8)
        k1, d1 = k1_next, d1_next
    return x, delta


# Gauss-Legendre rule for the per-step weights of the exponential-integrator multistep method (exact for the
# degree <= 3 Lagrange polynomials times the smooth weights e^{-lambda}, sigma(lambda) to ~1e-16 per step)
_GL_NODES = 16


def log_snr_half(sde: SDE, t: Tensor) -> Tensor:
    """``lambda_t = log(alpha_t / sigma_t)`` (half the log signal-to-noise ratio): decreasing in ``t``."""
    return sde.log_alpha(t) - sde.sigma(t).log()


def time_of_log_snr_half(sde: SDE, lam: Tensor, eps: float, T: float, iters: int = 80) -> Tensor:
    """The ``t`` in ``[eps, T]`` with ``lambda_t = lam`` (bisection in float64; ``lam`` within the interval's range)."""
    lo = torch.full_like(lam, eps, dtype=torch.float64)
    hi = torch.full_like(lam, T, dtype=torch.float64)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        before = log_snr_half(sde, mid) > lam
        lo, hi = torch.where(before, mid, lo), torch.where(before, hi, mid)
    return 0.5 * (lo + hi)


def _lagrange_integrals(q: Tensor, qw: Tensor, nodes: Sequence[float]) -> Tensor:
    """``sum_q qw[..., q] L_j(q)`` for the Lagrange basis ``L_j`` on ``nodes``: ``[..., len(nodes)]``."""
    out = []
    for j, lj in enumerate(nodes):
        basis = torch.ones_like(q)
        for m, lm in enumerate(nodes):
            if m != j:
                basis = basis * (q - lm) / (lj - lm)
        out.append((qw * basis).sum(-1))
    return torch.stack(out, -1)


_WEIGHTS_CACHE: dict[tuple, list] = {}


def _exp_pc_weights(sde: SDE, grid: Tensor, order: int) -> list[tuple[list[float], ...]]:
    """Per step: the predictor's weights on ``eps_hat``, the corrector's on ``eps_hat`` and on its divergence (the
    log-density is only ever updated by the corrector).

    ``int w(l) L_j(l) dl`` over the step ``[lambda_i, lambda_{i+1}]`` (``lambda`` falls as ``t`` grows) for the Lagrange
    basis on the step's interpolation nodes, with ``w = -e^{-l}`` (the state ``y``) and ``w = -sigma(l)`` (the
    log-density), by Gauss-Legendre in ``lambda``. They depend on the grid only, so they are computed once per
    (SDE, grid, order) and reused for every batch.
    """
    t = grid.detach().to(torch.float64).cpu()
    key = (repr(sde), tuple(t.tolist()), order)
    if key in _WEIGHTS_CACHE:
        return _WEIGHTS_CACHE[key]
    eps, T = float(t[0]), float(t[-1])
    lam = log_snr_half(sde, t)
    a, b = lam[:-1, None], lam[1:, None]
    x, w = (torch.as_tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(_GL_NODES))
    q = 0.5 * (b - a) * x + 0.5 * (a + b)  # [N, nodes]
    qw = 0.5 * (b - a) * w
    w_state, w_logp = -torch.exp(-q) * qw, -sde.sigma(time_of_log_snr_half(sde, q, eps, T)) * qw
    lam_list, out = lam.tolist(), []
    for i in range(t.numel() - 1):
        pred = lam_list[max(0, i - order + 1): i + 1]  # the last `order` evaluated points
        corr = lam_list[max(0, i - order + 2): i + 2]  # the last `order - 1` of them and the new one
        out.append(tuple(_lagrange_integrals(q[i], wq[i], nodes).tolist()
                         for nodes, wq in ((pred, w_state), (corr, w_state), (corr, w_logp))))
    if len(_WEIGHTS_CACHE) > 64:
        _WEIGHTS_CACHE.clear()
    _WEIGHTS_CACHE[key] = out
    return out


def _exp_pc(eps_hat, sde: SDE, x0: Tensor, grid: Tensor, *, order: int, dim: int) -> tuple[Tensor, Tensor]:
    """Exponential-integrator Adams predictor-corrector in ``lambda = log(alpha/sigma)``: ``(x_T, delta_logp)``.

    With ``y = x / alpha`` and ``r = sigma / alpha = e^{-lambda}`` the probability-flow ODE of any of our SDEs is
    exactly ``dy = eps_hat(x, t) dr`` (``d(r^2)/dt = g^2 / alpha^2`` is the kernel's variance equation), and
    ``d delta_logp = a(t) D dt + sigma div_x eps_hat dr / r``, i.e. ``D d log alpha + div_x eps_hat (-sigma) d lambda``.
    The linear part is integrated exactly (no stiffness near ``eps``); ``eps_hat`` and its divergence are
    interpolated in ``lambda`` through the last ``order`` evaluations (Adams-Bashforth predictor), the network is
    evaluated once at the predicted point, and the step is redone with the interpolant through the last
    ``order - 1`` old values and the new one (Adams-Moulton corrector; the new value is kept for the next step,
    not re-evaluated on the corrected state, as in UniPC). One evaluation per step, plus one at ``t_0``.
    """
    t = grid.to(torch.float64).cpu()
    alpha = sde.log_alpha(t).exp().tolist()
    weights = _exp_pc_weights(sde, grid, order)
    e, h = eps_hat(grid[0], x0)
    hist_e, hist_h = [e], [h]
    y, delta = x0 / alpha[0], torch.zeros_like(h)
    for i, (py, cy, cd) in enumerate(weights):
        y_pred = y + sum(c * v for c, v in zip(py, hist_e[-len(py):]))
        e, h = eps_hat(grid[i + 1], alpha[i + 1] * y_pred)
        hist_e, hist_h = (hist_e + [e])[-order:], (hist_h + [h])[-order:]
        y = y + sum(c * v for c, v in zip(cy, hist_e[-len(cy):]))
        delta = delta + sum(c * v for c, v in zip(cd, hist_h[-len(cd):]))
    log_alpha_ends = sde.log_alpha(t[[0, -1]])
    delta = delta + dim * float(log_alpha_ends[1] - log_alpha_ends[0])
    return alpha[-1] * y, delta
