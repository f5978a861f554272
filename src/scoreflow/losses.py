"""Per-example score-matching objectives. Nothing here reduces over the batch.

``score_fn(x, t)`` takes ``x [B, ...]`` and ``t [B]`` and returns a tensor shaped like ``x``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from scoreflow.likelihood.divergence import divergence_hutchinson
from scoreflow.sde import SDE
from scoreflow.utils import ScoreFn, append_dims, call_score, mean_except_batch, sum_except_batch

Reduce = Literal["sum", "mean"]


def _reduce(x: Tensor, reduce: Reduce) -> Tensor:
    if reduce == "sum":
        return sum_except_batch(x)
    if reduce == "mean":
        return mean_except_batch(x)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def dsm_loss(
    score_fn: ScoreFn,
    sde: SDE,
    x0: Tensor,
    t: Tensor,
    *,
    noise: Tensor | None = None,
    form: Literal["eps", "score"] = "eps",
    reduce: Reduce = "sum",
) -> Tensor:
    """Denoising score matching, one value per example ``[B]``.

    ``form="eps"`` gives ``||sigma_t s + z||^2`` (= ``sigma_t^2 l(t)``); ``form="score"`` gives
    ``l(t) = ||s - grad log p_0t(x_t|x0)||^2 = ||sigma_t s + z||^2 / sigma_t^2`` (Song et al. 2021b, Table 1).
    """
    z = torch.randn_like(x0) if noise is None else noise
    x_t = sde.perturb(x0, t, z)
    sigma = append_dims(sde.sigma(t), x0.ndim)
    per = (sigma * call_score(score_fn, x_t, t) + z) ** 2
    if form == "score":
        per = per / sigma**2
    elif form != "eps":
        raise ValueError(f"form must be 'eps' or 'score', got {form!r}")
    return _reduce(per, reduce)


def ism_loss(
    score_fn: ScoreFn,
    sde: SDE,
    x0: Tensor,
    t: Tensor,
    *,
    noise: Tensor | None = None,
    probe: Tensor | None = None,
    form: Literal["eps", "score"] = "eps",
    reduce: Reduce = "sum",
) -> Tensor:
    """Implicit (Hutchinson) score matching of Huang et al. 2021 (Sec. 6), per example ``[B]``.

    ``form="score"``: ``||s||^2 + 2 div s`` (divergence by a Rademacher probe), which equals the DSM
    ``l(t)`` minus a constant independent of the model in expectation. ``form="eps"``:
    ``sigma_t^2 (||s||^2 + 2 div s) + D``, equal in expectation to the eps-form DSM term, so the two
    losses are interchangeable under every weighting. ``reduce="mean"`` divides by ``D``.
    Keeps the graph so the result is differentiable w.r.t. the model.
    """
    z = torch.randn_like(x0) if noise is None else noise
    v = torch.randint_like(x0, 2) * 2 - 1 if probe is None else probe
    with torch.enable_grad():
        x_t = sde.perturb(x0, t, z).detach().requires_grad_(True)
        s = call_score(score_fn, x_t, t)
        div = divergence_hutchinson(s, x_t, v, create_graph=True)
    val = sum_except_batch(s**2) + 2 * div
    if form == "eps":
        D = x0[0].numel()
        val = sde.sigma(t) ** 2 * val + D
    elif form != "score":
        raise ValueError(f"form must be 'eps' or 'score', got {form!r}")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    return val / x0[0].numel() if reduce == "mean" else val
