"""Monte-Carlo variance of the per-image bound per network call: ``python bench/bound_variance.py`` (CPU, 3 min).

On the default run's checkpoint, the first ``--num-images`` test images (dequantized with evaluate.py's seeds,
repeat 0) each get ``--repeats`` independent estimates of Theorem 3's bound with ``--num-t`` score calls, for
every estimator below. The per-image variance is taken over those repeats (stratified or antithetic samples are
not i.i.d., so the within-image sample variance would be wrong for them), multiplied by the calls it used and
averaged over images: "variance per call" in bpd^2. Calls needed for one standard error scale with it, so the
last column, ``var(ScoreFlow) / var(estimator)``, is how many times fewer calls an estimator needs than the
estimator of ScoreFlow's ``bound_likelihood.py`` for the same per-image standard error, and ``nll_se/true`` the
root-mean-square standard error ``likelihood_bound`` reports for one estimate over the true one (from repeats).

That reference estimator, re-implemented here as the file computes it (``dsm=True``, importance weighting): N
importance-sampled times per image, one fresh ``z`` per time, the integrand ``g^2 (||s - grad||^2 - ||grad||^2)
- 2 div f`` times ``sigma^2 Z / g^2`` with ``div f`` by a Rademacher Hutchinson probe (exact for the linear
drift), and the prior term ``-log pi(x_T)`` from one draw per image. Our ``monte_carlo`` estimator is the same
except that it averages ``num_t`` prior draws, so it is not quite the reference: the one prior draw adds
``N Var(-log pi(x_T))`` per call, which the table shows as the gap between the two.

The ``plan`` rows use :func:`fit_bound_plan` on the next ``--pilot-images`` test images (other images, other
draws: the evaluated estimates stay unbiased) and print its cost. The split of the standard error over images
and the number of times that keeps the Monte-Carlo part under 10 % follow the table.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from scoreflow.likelihood.bound import BoundPlan, fit_bound_plan, likelihood_bound
from scoreflow.likelihood.divergence import randn_like
from scoreflow.likelihood.units import num_samples_for_mc_excess, split_standard_error
from scoreflow.utils import append_dims, flat_dim, sum_except_batch
from scoreflow.weighting import ImportanceSampledLikelihood


def load(ckpt: str, first: int, n: int, device: str):
    """Model, and test images ``first .. first+n-1`` dequantized as evaluate.py does for repeat 0."""
    from scoreflow.tasks.build import build_data
    from scoreflow.tasks.checkpoint import image_seed, seeded_generator
    from scoreflow.tasks.common import module_from_checkpoint

    module, cfg, _ = module_from_checkpoint(ckpt)
    module.eval().to(device)
    ds = build_data(cfg).load()["test"]
    dev = torch.device(device)
    ys, log_qs = [], []
    for i in range(first, first + n):
        k = torch.as_tensor(ds[i][0])[None].to(dev)
        y, log_q = module.to_model_space(k, seeded_generator(dev, image_seed(0, i, 0, "dequantization")))
        ys.append(y.double())
        log_qs.append(log_q.double())
    return module, torch.cat(ys), torch.cat(log_qs)


def scoreflow_bound(score_fn, sde, x, eps: float, N: int, generator: torch.Generator) -> torch.Tensor:
    """``bound_likelihood.py``'s DSM bound without the eps offset, in nats ``[B]`` (see the module docstring)."""
    B = x.shape[0]
    sampler = ImportanceSampledLikelihood(sde, eps)
    Z = sampler.Z
    t_all = sampler.icdf(torch.rand(N, B, generator=generator, dtype=torch.float64)).to(x.dtype)
    integral = torch.zeros(B, dtype=x.dtype)
    for t in t_all:  # the file's lax.scan over the N time rows
        probe = torch.randint(0, 2, x.shape, generator=generator).to(x.dtype) * 2 - 1  # Rademacher
        noise = randn_like(x, generator)
        alpha, std = (append_dims(v, x.ndim) for v in sde.marginal(t))
        mean = alpha * x
        noisy = mean + std * noise
        drift_div = sum_except_batch(probe * append_dims(sde.drift_coef(t), x.ndim) * probe)  # eps^T (df/dx) eps
        grad = -(noisy - mean) / std**2
        diff1 = sum_except_batch((score_fn(noisy, t).to(x.dtype) - grad) ** 2)
        diff2 = sum_except_batch(grad**2)
        g2 = sde.g2(t)
        integrand = g2 * (diff1 - diff2) - 2 * drift_div
        integral = integral + std.reshape(-1) ** 2 / g2 * Z * integrand
    integral = integral / N
    T = torch.full((B,), sde.T, dtype=x.dtype)
    alpha_T, std_T = (append_dims(v, x.ndim) for v in sde.marginal(T))
    neg_prior_logp = -sde.prior_logp(alpha_T * x + std_T * randn_like(x, generator))  # one prior draw
    return neg_prior_logp + 0.5 * integral


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="outputs/default_ckpt/checkpoints/last.ckpt")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--num-t", type=int, default=50, help="score calls per image and estimate")
    p.add_argument("--repeats", type=int, default=8, help="independent estimates per image")
    p.add_argument("--pilot-images", type=int, default=32, help="images after the evaluated ones, for the plan")
    p.add_argument("--pilot-bins", type=int, default=20)
    p.add_argument("--pilot-draws", type=int, default=4)
    p.add_argument("--pilot-floor", type=float, default=0.1, help="share of the uniform density in q(u)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    p.add_argument("--today", type=int, default=500, help="evaluate.py's test_num_t to report the MC share at")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    module, y, log_q = load(a.ckpt, 0, a.num_images, a.device)
    score_fn, sde, eps = module._score_fn(), module.sde, module.eps
    B, D, N = y.shape[0], flat_dim(y), a.num_t

    def to_bpd(nll):  # nats -> bits/dim of the 8x8 digits (module.to_bpd: dequantization log q, levels, scale)
        return module.to_bpd(nll.double(), log_q, D).cpu()

    t0 = time.perf_counter()
    _, pilot, _ = load(a.ckpt, a.num_images, a.pilot_images, a.device)
    g = torch.Generator(device=a.device).manual_seed(12345)
    plan = fit_bound_plan(
        score_fn, sde, pilot, eps=eps, num_bins=a.pilot_bins, draws=a.pilot_draws, floor=a.pilot_floor, generator=g
    )
    plan_cv = BoundPlan(plan.cv, torch.ones(plan.num_bins))  # the same fit without q(u) and h(u)
    plan_q = BoundPlan(plan.cv, plan.density)  # without h(u)
    plan_h = BoundPlan(plan.cv, torch.ones(plan.num_bins), plan.mean)  # without q(u)
    pilot_calls = a.pilot_images * a.pilot_bins * a.pilot_draws
    print(
        f"plans fitted on test images {a.num_images}..{a.num_images + a.pilot_images - 1}: {pilot_calls} calls "
        f"({time.perf_counter() - t0:.1f} s); c(u) per bin: {[round(float(c), 2) for c in plan.cv]}; "
        f"q(u): {[round(float(q), 2) for q in plan.density]}"
    )

    def ours(**kw):  # (nll, nll_se) in nats
        def fn(gen):
            res = likelihood_bound(score_fn, sde, y, eps=eps, num_t=N, generator=gen, **kw)
            return res.nll, res.nll_se

        return fn

    def theirs(gen):
        return scoreflow_bound(score_fn, sde, y, eps, N, gen), torch.full((B,), float("nan"))

    rows = {
        "scoreflow bound_likelihood.py": theirs,
        "monte_carlo": ours(estimator="monte_carlo"),
        "paired": ours(estimator="paired"),
        "closed_form": ours(estimator="closed_form"),
        "monte_carlo stratified": ours(estimator="monte_carlo", stratified=True),
        "paired stratified": ours(estimator="paired", stratified=True),
        "closed_form stratified": ours(estimator="closed_form", stratified=True),
        "closed_form strat antithetic": ours(estimator="closed_form", stratified=True, antithetic=True),
        "paired strat antithetic": ours(estimator="paired", stratified=True, antithetic=True),
        "plan c(u) strat": ours(stratified=True, plan=plan_cv),
        "plan c(u)+h(u) strat": ours(stratified=True, plan=plan_h),
        "plan c(u)+q(u) strat": ours(stratified=True, plan=plan_q),
        "plan c(u)+q(u)+h(u) strat": ours(stratified=True, plan=plan),
        "plan c(u)+q(u)+h(u) strat antithetic": ours(stratified=True, plan=plan, antithetic=True),
        "c=0.25 strat (fixed plan, no pilot)": ours(stratified=True, plan=BoundPlan.uniform(cv=0.25)),
    }
    if a.only:
        keep = {s.strip() for s in a.only.split(",")}
        rows = {k: v for k, v in rows.items() if k in keep or k.startswith("scoreflow")}

    print(
        f"\n{B} images (D={D}), {N} score calls per image and estimate, {a.repeats} independent estimates each; "
        f"variances in bpd^2 (mean over images of the per-image variance over repeats), ± its standard error"
    )
    head = (
        f"{'estimator':<36}{'calls/img':>10}{'var/call':>16}{'se @' + str(N):>10}{'x fewer calls':>15}"
        f"{'nll_se/true':>13}{'s':>6}"
    )
    print(head)
    print("-" * len(head))
    results, ref = {}, None
    for name, fn in rows.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            out = [fn(torch.Generator(device=a.device).manual_seed(1000 + r)) for r in range(a.repeats)]
        est = torch.stack([to_bpd(nll) for nll, _ in out])  # [R, B] bits/dim
        claimed = torch.stack([se.double().cpu() for _, se in out]).pow(2).mean() / (D * math.log(2)) ** 2
        per_call = est.var(dim=0) * N  # per image: variance of one estimate x calls it used
        v, v_se = float(per_call.mean()), float(per_call.std() / math.sqrt(B))
        ref = v if ref is None else ref
        results[name] = (est, v)
        print(
            f"{name:<36}{N:>10}{v:>10.3f} ±{v_se:<5.2f}{math.sqrt(v / N):>10.4f}{ref / v:>15.1f}"
            f"{math.sqrt(float(claimed) * N / v):>13.2f}{time.perf_counter() - t0:>6.0f}"
        )

    # the reference's one prior draw: Var(-log pi(x_T)) = Var(||x_T||^2) / 4 with x_T ~ N(alpha_T x, sigma_T^2 I)
    a_T, s_T = (float(v) for v in sde.marginal(torch.full((1,), sde.T, dtype=torch.float64)))
    var_prior = (2 * D * s_T**4 + 4 * s_T**2 * a_T**2 * y.flatten(1).pow(2).sum(1)) / 4 / (D * math.log(2)) ** 2
    print(
        f"(the reference's single prior draw alone adds N Var(-log pi(x_T)) = {N * float(var_prior.mean()):.3f} "
        f"bpd^2 per call at N={N}; our monte_carlo averages N prior draws)"
    )

    # split of the standard error over images, and the number of times that keeps the MC part under 10 %
    best = min(results, key=lambda k: results[k][1])
    split = split_standard_error(results[best][0].T.numpy())  # [B, R]: per-image means of R repeats
    print(
        f"\nSplit over the {B} images with '{best}' ({a.repeats} x {N} calls per image): bpd {split.mean:.4f} "
        f"± {split.se:.4f} = between-image {split.se_between:.4f} (+) Monte-Carlo {split.se_mc:.4f} "
        f"(MC adds {100 * split.mc_excess:.1f} %); variance over images of the per-image bound "
        f"{split.var_between:.4f} bpd^2"
    )
    print(
        f"num_t per image (1 repeat) for Monte-Carlo noise adding < 10 % to the se over images "
        f"(Var(L) = {split.var_between:.4f} bpd^2), and what MC noise adds at {a.today} times:"
    )
    vp = float(var_prior.mean())
    if split.var_between <= 0:
        print("  (no between-image variance left after the Monte-Carlo part: use more images or repeats)")
        return
    for name, (_, v) in results.items():
        if name.startswith("scoreflow"):  # Var = (v - N vp) / n + vp at n calls: the one prior draw is a floor
            left = ((1.1**2 - 1) * split.var_between - vp) * N
            n_t = f"{math.ceil((v - N * vp) / left)}" if left > 0 else "never"
            mc_var = (v - N * vp) / a.today + vp
        else:
            n_t, mc_var = f"{num_samples_for_mc_excess(v, split.var_between, 0.1)}", v / a.today
        print(f"  {name:<40}{n_t:>7}{100 * (math.sqrt(1 + mc_var / split.var_between) - 1):>9.1f} %")
    if any(k.startswith("plan") for k in results):
        print(f"  (plans cost {pilot_calls} pilot calls once per evaluation, on images/draws the estimates do not use)")


if __name__ == "__main__":
    main()
