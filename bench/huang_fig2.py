"""Huang et al. (2021) Figure 2 on the swiss roll: one score model, the lambda-family of plug-in reverse SDEs.

    python bench/huang_fig2.py          # trains `experiment=toy2d data.name=swiss_roll`, 3000 steps (~2 min, 1 core)
    python bench/huang_fig2.py --ckpt <run>/checkpoints/last.ckpt   # reuse a trained model

Left panel of Fig. 2 -> ``docs/huang_fig2_swiss_roll.png``: samples of Euler-Maruyama on Eq. (27) with dt = 1/1000
(the paper's step) for several lambda (rows) at several iterates (columns), all from the same prior draws.
Right panel -> ``docs/huang_fig2_elbo.png`` and the printed table: on the test points,
  * the CT-ELBO of lambda = 0 (Huang et al. Eq. 25 = Song et al. 2021b Theorem 3's bound), in nats;
  * the probability-flow ODE likelihood (exact divergence in 2-D);
  * -E[CT-ELBO_lambda] = -E[CT-ELBO_0] + lambda^2 / (4 (1 - lambda)) F for lambda < 1 (Theorem 6, Eq. 28),
    F = int_eps^T 1/2 g^2 E||s_theta - grad log q_s||^2 ds, which needs the TRUE score of the diffused data. The
    swiss roll here is a curve plus N(0, 0.05^2 I) noise, i.e. a continuous mixture of Gaussians; a mixture of
    4000 Gaussians along the curve (spacing <= 0.007 << 0.05) gives grad log q_s and log p_data to high accuracy;
  * the entropy of the data (-E log p_data on the same points), the floor of every model's NLL.
Every number is a mean over the test points +- its standard error; the JSON lands in bench/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scoreflow.likelihood import likelihood_bound, mean_and_se, ode_log_likelihood
from scoreflow.oracles import GaussianMixture
from scoreflow.sampling import PlugInReverseSDE, time_grid
from scoreflow.sampling.noise import BatchNoise
from scoreflow.tasks.build import build_data
from scoreflow.tasks.common import module_from_checkpoint
from scoreflow.weighting import ImportanceSampledLikelihood

ROOT = Path(__file__).resolve().parents[1]
LAMBDAS = (0.0, 0.5, 0.8, 0.95, 1.0)


def swiss_roll_mixture(K: int = 4000, noise: float = 0.05) -> GaussianMixture:
    """The swiss roll of ``scoreflow.data.toy2d`` as a K-component mixture: ``u ~ U[1.5 pi, 4.5 pi]``,
    ``x = (u cos u, u sin u) / 5 + N(0, noise^2 I)``, with ``u`` on K midpoints."""
    u = 1.5 * math.pi * (1 + 2 * (torch.arange(K, dtype=torch.float64) + 0.5) / K)
    means = torch.stack([u * u.cos(), u * u.sin()], dim=1) / 5
    return GaussianMixture(torch.ones(K), means, torch.full((K,), noise**2))


def chunked(fn, x: torch.Tensor, *args, size: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i : i + size], *(a[i : i + size] for a in args)) for i in range(0, len(x), size)])


def train_model(steps: int, out: Path) -> Path:
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=toy2d", "data.name=swiss_roll",
           f"trainer.max_steps={steps}", "test=false", "logger=none", f"hydra.run.dir={out}"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out / "checkpoints" / "last.ckpt"


@torch.no_grad()
def lambda_samples(score_fn, sde, n: int, steps: int, eps: float, seed: int, snapshots: list[int]):
    """``{lam: [x at each snapshot iterate]}``: Euler-Maruyama on Eq. (27), the same prior draw and noise per lam."""
    ts = time_grid(sde, steps, eps, dtype=torch.float64, device="cpu")
    xT = sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = {}
    for lam in LAMBDAS:
        pred, rng, x = PlugInReverseSDE(lam), BatchNoise(torch.Generator().manual_seed(seed + 1)), xT.clone()
        snaps = [x] if 0 in snapshots else []
        for i in range(steps):
            x = pred.step(score_fn, sde, x, ts[i].expand(n), ts[i + 1].expand(n), rng)
            if i + 1 in snapshots:
                snaps.append(x)
        out[lam] = snaps
    return out, ts


def fisher_term(score_fn, sde, mix: GaussianMixture, x0: torch.Tensor, eps: float, num_t: int, seed: int):
    """Per-point ``F(x0) = int_eps^T 1/2 g^2 E||s_theta - grad log q_s||^2 ds`` with ``s ~ g^2/(sigma^2 Z)``:
    the integrand over the density is ``1/2 Z sigma^2 ||s_theta - grad log q_s||^2``."""
    g = torch.Generator().manual_seed(seed)
    B = x0.shape[0]
    sampler = ImportanceSampledLikelihood(sde, eps)
    u = (torch.arange(num_t, dtype=torch.float64) + torch.rand(B, num_t, generator=g, dtype=torch.float64)) / num_t
    t = sampler.icdf(u).reshape(-1)
    x = x0.repeat_interleave(num_t, 0)
    xt = sde.perturb(x, t, torch.randn(x.shape, generator=g, dtype=torch.float64))
    model = chunked(lambda a, b: score_fn(a, b), xt, t, size=4000)
    true = chunked(lambda a, b: mix.score(a, sde, b), xt, t, size=500)
    val = 0.5 * sampler.Z * sde.sigma(t) ** 2 * (model - true).pow(2).sum(1)
    return val.reshape(B, num_t).mean(1)


def plot_samples(samples, ts, snapshots, mix, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(LAMBDAS), len(snapshots)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.9 * rows), squeeze=False)
    for r, lam in enumerate(LAMBDAS):
        for c, (i, x) in enumerate(zip(snapshots, samples[lam])):
            ax = axes[r, c]
            ax.scatter(x[:, 0], x[:, 1], s=0.6, alpha=0.5, color="tab:blue", linewidths=0)
            ax.set_xlim(-3.2, 3.2)
            ax.set_ylim(-3.2, 3.2)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            if r == 0:
                ax.set_title(f"i = {i} (t = {float(ts[i]):.3g})", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"λ = {lam:g}" + (" (ODE)" if lam == 1 else ""), fontsize=9)
    fig.suptitle("Plug-in reverse SDEs (Huang et al. 2021, Eq. 27), one score model, Euler-Maruyama dt = 1/1000",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_elbo(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lam = np.linspace(0, 0.99, 200)
    c = lam**2 / (4 * (1 - lam))
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    ax.plot(lam, res["bound_lam0"][0] + c * res["fisher"][0], label="−E[CT-ELBO$_λ$] (Theorem 6)")
    ax.axhline(res["ode_nll"][0], color="tab:orange", ls="--", label="ODE NLL (λ = 1)")
    ax.axhline(res["data_entropy"][0], color="grey", ls=":", label="data entropy")
    ax.set_xlabel("λ")
    ax.set_ylabel("nats per point")
    ax.set_ylim(res["data_entropy"][0] - 0.2, res["bound_lam0"][0] + 1.0)
    ax.legend(fontsize=7)
    ax.set_title("Swiss roll: bound of the λ-family vs the ODE", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None, help="a toy2d swiss_roll checkpoint (default: train one)")
    ap.add_argument("--steps", type=int, default=3000, help="training steps when training")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "outputs" / "huang_fig2")
    ap.add_argument("--num-points", type=int, default=1000, help="test points for the likelihoods")
    ap.add_argument("--num-t", type=int, default=500, help="times per point for the bound and for F")
    ap.add_argument("--num-samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "huang_fig2_swiss_roll.png")
    ap.add_argument("--png-elbo", type=Path, default=ROOT / "docs" / "huang_fig2_elbo.png")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "huang_fig2.json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.time()
    ckpt = args.ckpt or train_model(args.steps, args.run_dir)
    train_s = time.time() - t0
    module, cfg, _ = module_from_checkpoint(ckpt, use_ema=True)
    module.eval()
    net_fn, sde = module._score_fn(), module.sde
    score_fn = lambda x, t: net_fn(x, t).double()  # noqa: E731 - the likelihoods run in float64
    eps = float(cfg.get("eps") or sde.default_eps)
    test = build_data(cfg).load()["test"]
    x = torch.stack([test[i][0] for i in range(min(args.num_points, len(test)))]).double()
    mix = swiss_roll_mixture()

    # left panel: samples of the lambda-family
    snapshots = [0, 500, 800, 900, 950, 1000]
    t1 = time.time()
    samples, ts = lambda_samples(score_fn, sde, args.num_samples, 1000, sde.default_sample_eps, args.seed, snapshots)
    plot_samples(samples, ts, snapshots, mix, args.png)
    # how well each lambda's final samples fit the data: cross-entropy -E log p_data(samples) (lower is tighter)
    sample_ce = {lam: mean_and_se(-chunked(mix.log_prob, s[-1])) for lam, s in samples.items()}
    sample_s = time.time() - t1

    # right panel: CT-ELBO of lambda = 0 vs the ODE likelihood, and Theorem 6's curve
    t2 = time.time()
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        bound = likelihood_bound(score_fn, sde, x, eps=eps, num_t=args.num_t, stratified=True,
                                 estimator="paired", generator=g, dtype=torch.float64)
    ode = ode_log_likelihood(score_fn, sde, x, eps=eps, divergence="exact", rtol=1e-5, atol=1e-5,
                             dtype=torch.float64)
    with torch.no_grad():
        fisher = fisher_term(score_fn, sde, mix, x, eps, args.num_t // 5, args.seed + 2)
    entropy = -chunked(mix.log_prob, x)
    lik_s = time.time() - t2

    res = {
        "bound_lam0": mean_and_se(bound.nll),
        "ode_nll": mean_and_se(ode.nll),
        "bound_minus_ode": mean_and_se(bound.nll - ode.nll),
        "fisher": mean_and_se(fisher),
        "data_entropy": mean_and_se(entropy),
        "ode_nfe": ode.nfe,
        "sample_cross_entropy": {str(k): v for k, v in sample_ce.items()},
        "bound_lam": {str(lam): res_lam for lam, res_lam in
                      ((lam, float(bound.nll.mean() + lam**2 / (4 * (1 - lam)) * fisher.mean()))
                       for lam in (0.0, 0.5, 0.8, 0.95))},
        "protocol": (f"{len(x)} swiss-roll test points, eps={eps}, bound: Theorem 3 / Eq. 25 with {args.num_t} "
                     f"stratified IS times (paired estimator, no eps-correction); ODE dopri5 1e-5 exact divergence "
                     f"float64; F with {args.num_t // 5} IS times per point against a {mix.means.shape[0]}-component "
                     f"mixture of the swiss roll; samples: {args.num_samples} per lambda, Euler-Maruyama dt=1/1000 "
                     f"to t={sde.default_sample_eps}, no denoising"),
        "checkpoint": str(ckpt),
        "train_steps": int(cfg.trainer.max_steps),
        "seconds": {"train": round(train_s, 1), "samples": round(sample_s, 1), "likelihoods": round(lik_s, 1)},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    plot_elbo(res, args.png_elbo)

    f = lambda v: f"{v[0]:.4f} ± {v[1]:.4f}"  # noqa: E731
    print(f"\nswiss roll, {len(x)} test points, nats per point (mean ± s.e.)")
    print(f"  CT-ELBO bound, λ = 0 (−E_0)   {f(res['bound_lam0'])}")
    print(f"  ODE NLL (λ = 1)               {f(res['ode_nll'])}   (NFE {ode.nfe})")
    print(f"  bound − ODE, paired           {f(res['bound_minus_ode'])}")
    print(f"  data entropy −E log p_data    {f(res['data_entropy'])}")
    print(f"  F (Theorem 6)                 {f(res['fisher'])}")
    for lam, v in res["bound_lam"].items():
        print(f"  −E[CT-ELBO_λ], λ = {lam:<5}     {v:.4f}")
    ce = ", ".join(f"{k}: {v[0]:.3f}±{v[1]:.3f}" for k, v in sample_ce.items())
    print(f"  samples: −E log p_data(x) per λ: {ce}")
    print(f"  wrote {args.png}, {args.png_elbo}, {args.json}")


if __name__ == "__main__":
    main()
