"""Sampling with the probability-flow ODE ``dx/dt = f - g^2 s / 2`` (Song et al. 2021, Eq. 13, App. D.3-D.4).

:func:`solve_probability_flow` integrates between any two times, in either direction; :func:`ode_sample`
runs it from the prior at ``T`` down to ``eps`` and removes the remaining noise with Tweedie's formula
(docs/reference.md §8: RK45 with rtol = atol = 1e-5, then one denoising step). Fixed-step methods (``euler``, ``heun``,
``rk4``) are written here so their NFE is exact; adaptive ones come from torchdiffeq.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint
from tqdm.auto import tqdm

from scoreflow.sampling.noise import initial_state, make_noise
from scoreflow.sampling.pc import SampleResult, tweedie_denoise
from scoreflow.sampling.registry import register_sampler
from scoreflow.sde import SDE
from scoreflow.utils import ScoreFn, shape_checked

FIXED_STEP = ("euler", "heun", "rk4")
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def solve_probability_flow(
    score_fn: ScoreFn,
    sde: SDE,
    x: Tensor,
    t0: float,
    t1: float,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, int]:
    """Carry ``x [B, ...]`` from time ``t0`` to ``t1`` along the probability-flow ODE; returns ``(x_t1, nfe)``.

    ``t1 < t0`` integrates backwards (sampling / decoding), ``t1 > t0`` forwards (encoding). Adaptive
    methods treat the whole batch as one system (as the reference does), so their step sizes, and thus
    each result to within ``rtol``, depend on the rest of the batch; fixed-step methods do not.
    ``steps`` (default ``sde.N``) is the number of uniform steps of a fixed-step method; an adaptive one refuses it.
    """
    if method in ADAPTIVE and steps is not None:  # it was ignored: a 'steps=100' run drew dopri5's own steps
        raise ValueError(f"steps={steps} is for a fixed-step method {FIXED_STEP}; method={method!r} is adaptive "
                         "(its steps come from rtol/atol): give steps=None with it")
    nfe = 0
    B = x.shape[0]
    score_fn = shape_checked(score_fn)  # its first evaluation checks the score is shaped like x

    def drift(t: Tensor, x: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        tb = t.to(x.dtype).expand(B)
        return sde.ode_drift(x, tb, score_fn(x, tb))

    with torch.no_grad():
        if method in ADAPTIVE:
            ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
            # step_t: land exactly on t1; otherwise dopri5 steps past it (to t < 0: NaN sigma) and interpolates
            opts = {"step_t": ts[1:]}
            x = odeint(drift, x, ts, method=method, rtol=rtol, atol=atol, options=opts)[-1]
        elif method in FIXED_STEP:
            n = sde.N if steps is None else steps
            ts = torch.linspace(t0, t1, n + 1, dtype=x.dtype, device=x.device)
            for i in tqdm(range(n), disable=not progress, desc=f"ode ({method})"):
                t, h = ts[i], ts[i + 1] - ts[i]
                k1 = drift(t, x)
                if method == "euler":
                    x = x + h * k1
                elif method == "heun":  # explicit trapezoid (Heun's 2nd-order method)
                    x = x + 0.5 * h * (k1 + drift(t + h, x + h * k1))
                else:  # classic 4th-order Runge-Kutta
                    k2 = drift(t + h / 2, x + h / 2 * k1)
                    k3 = drift(t + h / 2, x + h / 2 * k2)
                    k4 = drift(t + h, x + h * k3)
                    x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        else:
            raise ValueError(f"unknown ODE method {method!r}; choose from {FIXED_STEP + ADAPTIVE}")
    return x, nfe


def ode_text(o: Mapping[str, Any]) -> str:
    """``"probability-flow ODE <method> <steps or tolerances>"`` for ODE options ``o``."""
    fixed = o.get("method") in FIXED_STEP
    how = f"steps={o.get('steps') or 'N'}" if fixed else f"rtol={o.get('rtol')} atol={o.get('atol')}"
    return f"probability-flow ODE {o.get('method')} {how}"


@register_sampler("ode", describe=lambda o: f"{ode_text(o)}, denoise={o.get('denoise')}")
def ode_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape_or_z: Sequence[int] | Tensor,
    *,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    steps: int | None = None,
    eps: float | None = None,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> SampleResult:
    """Samples ``[B, ...]`` by integrating the probability flow from ``x_T`` (given or drawn) to ``eps``.

    Args:
        shape_or_z: ``(B, ...)`` to draw ``x_T`` from the prior (with ``generator`` or per-sample ``seeds``),
            or the prior sample ``x_T`` itself.
        method: ``"dopri5"`` (RK45, the paper's choice) or another adaptive torchdiffeq method, or a
            fixed-step ``"euler"`` / ``"heun"`` / ``"rk4"`` with ``steps`` uniform steps (default ``sde.N``).
        eps: end time (default ``sde.default_sample_eps``).
        denoise: finish with Tweedie's ``E[x0 | x_eps]`` (one score evaluation).

    Returns:
        :class:`SampleResult`; ``nfe`` counts drift evaluations (1, 2, 4 per step for euler, heun, rk4)
        plus the denoising step.
    """
    z = shape_or_z if isinstance(shape_or_z, Tensor) else None
    shape = None if z is not None else tuple(shape_or_z)
    rng = make_noise(generator=generator, seeds=seeds, device=device if z is None else z.device)
    x = initial_state(sde, shape, z, rng, dtype=dtype, device=device)
    eps = sde.check_eps(sde.default_sample_eps if eps is None else eps)
    x, nfe = solve_probability_flow(
        score_fn, sde, x, sde.T, eps, method=method, rtol=rtol, atol=atol, steps=steps, progress=progress
    )
    if denoise:
        with torch.no_grad():
            x = tweedie_denoise(score_fn, sde, x, torch.full((x.shape[0],), eps, dtype=x.dtype, device=x.device))
        nfe += 1
    return SampleResult(samples=x, nfe=nfe)
