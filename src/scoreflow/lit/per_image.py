"""Per-image bits/dim: the one evaluation path of the training run's test phase and of ``evaluate.py``.

Image ``i``, repeat ``r`` draws its dequantization noise, Hutchinson probe, bound times and noises from
generators seeded by ``(seed, i, r, purpose)`` only (:func:`image_seed`): its bound value does not depend on
the batch, the process or the command that computed it, and its ODE value depends on its batch only through
the adaptive solver's step sizes, which the batch shares. Callers that form the same batches (``batch_size``
consecutive images in index order: ``ScoreLitModule.test_step`` on one process, ``evaluate.py`` on any
number) therefore get identical values.

The functions read the pieces they need from a ``ScoreLitModule`` (``to_model_space``, ``to_bpd``,
``_score_fn``, ``sde``, ``eps``, ``eval_cfg``); nothing here imports Lightning.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from scoreflow.likelihood import (
    BoundPlan,
    draw_probe,
    fit_bound_plan,
    likelihood_bound,
    mean_and_se,
    ode_log_likelihood,
    truncation_correction,
)
from scoreflow.likelihood.ode import FIXED_GRID_METHODS, default_grid_rho

if TYPE_CHECKING:
    from scoreflow.lit.module import ScoreLitModule


def image_seed(seed: int, index: int, repeat: int, purpose: str) -> int:
    """A 63-bit seed for one image, one repeat and one purpose (dequantization, probe, bound, ...)."""
    h = hashlib.blake2b(f"{seed}/{index}/{repeat}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (e.g. an :func:`image_seed`)."""
    return torch.Generator(device=device).manual_seed(seed)


def model_space(module: ScoreLitModule, k: Tensor, indices: list[int], repeat: int,
                seed: int) -> tuple[Tensor, Tensor]:
    """Dequantize and scale each image of ``k [B, ...]`` with its own generator: ``(y [B, ...], log_q [B])``."""
    ys, lqs = [], []
    with torch.no_grad():
        for j, i in enumerate(indices):
            y, lq = module.to_model_space(k[j : j + 1], seeded_generator(k.device, image_seed(seed, i, repeat,
                                                                                               "dequantization")))
            ys.append(y)
            lqs.append(lq)
    return torch.cat(ys), torch.cat(lqs)


def ode_bpd(module: ScoreLitModule, k: Tensor, indices: list[int], repeat: int, seed: int, *,
            solver: dict[str, Any] | None = None, ode_truncation_correction: bool = False) -> tuple[Tensor, int]:
    """Per-image ODE bits/dim ``[B]`` of levels ``k [B, ...]`` (images ``indices``; one solve for the batch)
    and the solver's NFE.

    ``solver`` overrides ``method``/``rtol``/``atol``/``steps``/``grid_rho`` of ``module.eval_cfg`` (the solver
    check of ``evaluate.py``); the noise and probes do not change. ``ode_truncation_correction`` starts from
    ``x_eps ~ p_0eps(.|x)`` and adds the decoder term (off in ScoreFlow).
    """
    e, dev = module.eval_cfg, k.device
    dtype = getattr(torch, e.ode_dtype)
    y, log_q = model_space(module, k, indices, repeat, seed)
    y = y.to(dtype)
    score_fn = module._score_fn()
    probe = None
    if e.divergence != "exact":
        gens = [seeded_generator(dev, image_seed(seed, i, repeat, "probe")) for i in indices]
        probe = torch.cat([draw_probe(e.divergence, y[j : j + 1], generator=g) for j, g in enumerate(gens)])
    corr = torch.zeros(len(indices), dtype=dtype, device=dev)
    if ode_truncation_correction:
        with torch.no_grad():
            parts = [truncation_correction(score_fn, module.sde, y[j : j + 1], module.eps,
                                           generator=seeded_generator(dev, image_seed(seed, i, repeat, "ode_eps")))
                     for j, i in enumerate(indices)]
        corr, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    o = {key: getattr(e, key) for key in ("method", "rtol", "atol", "steps", "grid_rho")} | (solver or {})
    if o["method"] not in FIXED_GRID_METHODS:  # e.g. evaluation.method=dopri5 on a checkpoint stored with rk4
        o["steps"] = None
    res = ode_log_likelihood(score_fn, module.sde, y, eps=module.eps, rtol=o["rtol"], atol=o["atol"],
                             method=o["method"], steps=o["steps"], grid_rho=o["grid_rho"],
                             divergence=e.divergence, probe=probe, dtype=dtype)
    return module.to_bpd(res.nll + corr, log_q.to(dtype), y[0].numel()), res.nfe


def protocol_of(module: ScoreLitModule, *, ode_truncation_correction: bool = False,
                plan_images: int | None = None) -> dict[str, Any]:
    """The settings a per-image value depends on besides the weights and the images: ``eps``, ``dequantization``
    and the ``ode`` and ``bound`` settings, as ``evaluate.py`` records them (its fingerprint) and ``train.py``'s test
    phase in ``test_per_example.npz`` (its meta held a text line before, so ``bench/compare_runs.py`` could not tell
    a train.py run from an evaluate.py run of the same settings). ``plan_images``: the images a fitted bound plan
    was fitted on (default ``bound_plan_images``)."""
    e, m = module.eval_cfg, module
    ode = {"method": e.method, "rtol": e.rtol, "atol": e.atol, "divergence": e.divergence,
           "dtype": e.ode_dtype, "truncation_correction": bool(ode_truncation_correction)}
    if e.method in FIXED_GRID_METHODS:  # only then (rtol/atol unused): folders of earlier releases still resume
        ode |= {"steps": e.steps, "grid_rho": e.grid_rho or default_grid_rho(m.sde, e.method)}
    used = e.bound_plan_images if plan_images is None else plan_images
    bound = {"num_t": e.test_num_t, "importance_sampling": e.importance_sampling, "estimator": e.bound_estimator,
             "stratified": e.stratified, "truncation_correction": e.truncation_correction,
             **({"antithetic": True} if e.bound_antithetic else {}),
             **({"plan": f"fit on {used} images"} if e.bound_plan != "none" else {})}
    return {"eps": m.eps, "dequantization": type(m.dequantizer).__name__ if m.dequantizer else "none", "ode": ode,
            "bound": bound}


PILOT_REPEAT = -1  # the bound plan's pilot draws: a repeat index no evaluation uses, so their noise is independent


def bound_plan(module: ScoreLitModule, dataset, seed: int, limit: int | None = None) -> BoundPlan | None:
    """The bound's time plan (``evaluation.bound_plan``): ``None`` for ``"none"``; for ``"fit"``, a
    :class:`~scoreflow.likelihood.BoundPlan` fitted by :func:`~scoreflow.likelihood.fit_bound_plan` on the first
    ``bound_plan_images`` of the images evaluated (``dataset[:limit]``), with pilot noise seeded by
    ``(seed, image, -1)`` only.

    The same on every process and in every command that evaluates this model with this seed (the training test
    phase, ``evaluate.py``), and independent of the noise of the evaluated values, so every bound stays unbiased.
    Cached on the module.
    """
    e = module.eval_cfg
    kind = e.bound_plan
    if kind == "none":
        return None
    if kind != "fit":
        raise ValueError(f"evaluation.bound_plan must be 'none' or 'fit', got {kind!r}")
    n = min(e.bound_plan_images, len(dataset), len(dataset) if limit is None else int(limit))
    cached = getattr(module, "_bound_plan_cache", None)
    if cached is not None and cached[:2] == (seed, n):
        return cached[2]
    if n < 1:
        raise ValueError("evaluation.bound_plan=fit needs at least one image to fit the plan on")
    dev = module.device
    indices = list(range(n))
    k = torch.stack([torch.as_tensor(dataset[i][0]) for i in indices]).to(dev)
    y, _ = model_space(module, k, indices, PILOT_REPEAT, seed)
    plan = fit_bound_plan(module._score_fn(), module.sde, y, eps=module.eps,
                          generator=seeded_generator(dev, image_seed(seed, 0, PILOT_REPEAT, "bound_plan")))
    module._bound_plan_cache = (seed, n, plan)
    return plan


def bound_bpd(module: ScoreLitModule, k: Tensor, indices: list[int], repeat: int, seed: int, *,
              chunk_size: int = 1024, plan: BoundPlan | None = None,
              return_se: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Per-image bound bits/dim ``[B]`` (Theorem 3), each image with its own times and noises.

    ``plan``: the time plan of :func:`bound_plan` (needed when ``evaluation.bound_plan`` is ``"fit"``).
    With ``return_se`` also the per-image Monte-Carlo standard error in bits/dim ``[B]``.
    """
    e, dev = module.eval_cfg, k.device
    if e.bound_plan != "none" and plan is None:
        raise ValueError("evaluation.bound_plan is set: pass plan=bound_plan(module, dataset, seed)")
    y, log_q = model_space(module, k, indices, repeat, seed)
    out, ses = [], []
    with torch.no_grad():
        for j, i in enumerate(indices):
            res = likelihood_bound(
                module._score_fn(), module.sde, y[j : j + 1], eps=module.eps, num_t=e.test_num_t,
                importance_sampling=e.importance_sampling, truncation_correction=e.truncation_correction,
                estimator=e.bound_estimator, stratified=e.stratified, antithetic=e.bound_antithetic, plan=plan,
                generator=seeded_generator(dev, image_seed(seed, i, repeat, "bound")), chunk_size=chunk_size,
            )
            out.append(res.nll)
            ses.append(res.nll_se)
    D = y[0].numel()
    bpd = module.to_bpd(torch.cat(out), log_q, D)
    if not return_se:
        return bpd
    return bpd, torch.cat(ses).double() / (D * math.log(2.0))


def mean_se_over_images(table: np.ndarray, computed: np.ndarray | None = None) -> tuple[float, float, int]:
    """``(mean, standard error, number of images)`` over images of each image's mean over its repeats.

    ``computed [N, K]`` marks the values computed (default: those not NaN); images with none are left out. A
    computed value that is not finite stays in: the mean is then NaN or infinite, not the mean of the images that
    happened to be finite (a diverged image read as "not computed" vanished, and the count still included it).
    :func:`nonfinite_images` counts them. The standard error is that of :func:`scoreflow.likelihood.mean_and_se`
    (NaN for a single image).
    """
    table = np.asarray(table, dtype=np.float64).reshape(len(table), -1)
    computed = ~np.isnan(table) if computed is None else np.asarray(computed, dtype=bool).reshape(table.shape)
    keep = computed.any(axis=1)
    table, computed = table[keep], computed[keep]
    if table.shape[0] == 0:
        return math.nan, math.nan, 0
    with np.errstate(invalid="ignore"):
        per_image = np.where(computed, table, 0.0).sum(axis=1) / computed.sum(axis=1)
    return (*mean_and_se(per_image), int(per_image.size))


def nonfinite_images(table: np.ndarray, computed: np.ndarray) -> int:
    """How many images have a computed value that is NaN or infinite (:func:`mean_se_over_images`)."""
    table = np.asarray(table, dtype=np.float64).reshape(len(table), -1)
    computed = np.asarray(computed, dtype=bool).reshape(table.shape)
    return int((computed & ~np.isfinite(table)).any(axis=1).sum())
