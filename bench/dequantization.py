"""Uniform vs variational (vs truncated-normal) dequantization of ONE score model: test bits/dim, ODE and bound.

    python bench/dequantization.py --score <score run>/checkpoints/last.ckpt --flow <flow run>/checkpoints/last.ckpt

``--score`` is a ``train.py`` checkpoint (trained with uniform dequantization); ``--flow`` a ``train_dequant.py``
checkpoint made from it (same score weights + a trained q_φ(u|k)). Every model is evaluated with the SAME protocol
(set here, overriding what the checkpoints store) and the same per-image seeds (``scoreflow.tasks.checkpoint``), so the
bound's times and noises are common random numbers and the per-image differences have small standard errors.

Jobs (``--jobs``, default all) are cached in ``--out`` as ``<model>_<quantity>.npz`` and skipped when present, so a
long evaluation can be split into several invocations; every invocation prints the table of what is there:

* ``<model>:bound``: the Theorem-3 bound with importance-sampled time, per image, with the ε-correction
  (Song et al. 2021b, Sec. 4.3) and without it, for ``--iw`` draws of u per image; the importance-weighted estimate
  ``−log (1/S Σ_s p(y_s)/q(u_s|k))`` (:func:`scoreflow.dequantization.importance_weighted_nll`) uses all of them.
* ``<model>:ode``: the probability-flow ODE NLL (not ε-corrected, as in ScoreFlow), on the first ``--ode-images``.

Models: ``uniform`` (``--score``), ``variational`` (``--flow``), ``truncated<s>`` (``--score`` with
``TruncatedNormalDequantizer(bin_std=s)``, training-free; ``s=sde`` picks i-DODE's ``K σ_ε/(a α_ε)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch

from scoreflow.dequantization import importance_weighted_nll
from scoreflow.likelihood import mean_and_se
from scoreflow.tasks.build import build_data
from scoreflow.tasks.checkpoint import checkpoint_config, image_seed, load_checkpoint, module_from_checkpoint
from scoreflow.tasks.likelihood_eval import LikelihoodSettings, ode_bpd

LN2 = math.log(2.0)


def load(name: str, args) -> torch.nn.Module:
    if name == "uniform":
        module, cfg, _ = module_from_checkpoint(args.score)
    elif name == "variational":
        module, cfg, _ = module_from_checkpoint(args.flow)
        score = torch.load(args.score, map_location="cpu", weights_only=True)["ema"]["shadow"]
        for k, v in module.score_model.state_dict().items():  # the comparison is only fair on the same weights
            if not torch.equal(v, score["score_model." + k]):
                raise SystemExit(f"--flow {args.flow} does not hold the score weights of --score {args.score} ({k})")
    elif name.startswith("truncated"):
        from scoreflow.dequantization import TruncatedNormalDequantizer

        module, cfg, _ = module_from_checkpoint(args.score)
        s = name.removeprefix("truncated")
        K, a = module.num_levels, module.scale
        deq = (TruncatedNormalDequantizer.from_sde(module.sde, module.eps, num_levels=K, data_scale=a) if s == "sde"
               else TruncatedNormalDequantizer(num_levels=K, bin_std=float(s)))
        module.dequantizer = deq
    else:
        raise SystemExit(f"unknown model {name!r}")
    module.eval_cfg = dataclasses.replace(
        module.eval_cfg, eps=None, test_num_t=args.num_t, importance_sampling=True, truncation_correction=True,
        bound_estimator="paired", stratified=True, rtol=args.rtol, atol=args.rtol, method="dopri5", steps=None,
        divergence="rademacher", ode_dtype="float64")
    module.eval()
    return module


@torch.no_grad()
def bound_values(module, k, indices: list[int], r: int, seed: int) -> dict[str, np.ndarray]:
    """Per image: the bound (nats, with and without the ε-correction), its Monte-Carlo s.e. and log q(u|k)."""
    from scoreflow.likelihood import likelihood_bound

    e = module.eval_cfg
    out: dict[str, list[float]] = {"nll": [], "correction": [], "nll_se": [], "log_q": []}
    for j, i in enumerate(indices):
        g = torch.Generator().manual_seed(image_seed(seed, i, r, "dequantization"))
        y, log_q = module.to_model_space(k[j : j + 1], g)
        res = likelihood_bound(
            module._score_fn(), module.sde, y, eps=module.eps, num_t=e.test_num_t, importance_sampling=True,
            truncation_correction=True, estimator=e.bound_estimator, stratified=e.stratified,
            generator=torch.Generator().manual_seed(image_seed(seed, i, r, "bound")),
        )
        for key, v in (("nll", res.nll), ("correction", res.correction), ("nll_se", res.nll_se), ("log_q", log_q)):
            out[key].append(float(v))
    return {key: np.asarray(v) for key, v in out.items()}


def run_job(model: str, quantity: str, args, dataset, out: Path) -> None:
    path = out / f"{model}_{quantity}.npz"
    if path.exists():
        return
    module = load(model, args)
    t0 = time.time()
    n = min(args.num_images, len(dataset)) if quantity == "bound" else min(args.ode_images, len(dataset))
    batches = [list(range(a, min(a + args.batch_size, n))) for a in range(0, n, args.batch_size)]
    if quantity == "bound":
        vals: dict[str, list[np.ndarray]] = {}
        for r in range(args.iw):
            for b in batches:
                k = torch.stack([torch.as_tensor(dataset[i][0]) for i in b])
                for key, v in bound_values(module, k, b, r, args.seed).items():
                    vals.setdefault(key, []).append(v)
        res = {key: np.concatenate(v).reshape(args.iw, n) for key, v in vals.items()}  # [S, n]
    else:
        s = LikelihoodSettings(ode=True, bound=False, repeats=1, batch_size=args.batch_size, seed=args.seed)
        bpd, nfe = [], []
        for b in batches:
            k = torch.stack([torch.as_tensor(dataset[i][0]) for i in b])
            v, f = ode_bpd(module, k, b, 0, s)
            bpd.append(v.double().numpy())
            nfe.append(f)
        res = {"bpd": np.concatenate(bpd), "nfe": np.asarray(nfe)}
    res["dim"], res["offset"] = np.asarray(dataset[0][0]).size, module.to_bpd(torch.zeros(1), torch.zeros(1), 1).item()
    res["seconds"] = time.time() - t0
    np.savez(path, **res)
    print(f"[bench] {model}:{quantity} on {n} images in {res['seconds']:.0f} s -> {path}")


def fmt(v: np.ndarray | None) -> str:
    return "-" if v is None else "{:.4f} ± {:.4f}".format(*mean_and_se(v))


def summarize(model: str, out: Path) -> dict:
    """Per-image bits/dim arrays of one model from its cached jobs."""
    d: dict = {}
    if (out / f"{model}_bound.npz").exists():
        b = np.load(out / f"{model}_bound.npz")
        D, off = int(b["dim"]), float(b["offset"])

        def to_bpd(nats):  # ScoreLitModule.to_bpd in numpy
            return nats / (D * LN2) + off

        nll, log_q = b["nll"], b["log_q"]  # [S, n] nats
        d["bound"] = to_bpd(nll[0] + log_q[0])
        d["bound_noeps"] = to_bpd(nll[0] - b["correction"][0] + log_q[0])
        d["log_q"] = log_q[0] / (D * LN2)
        d["mc_se"] = float(np.sqrt((b["nll_se"][0] ** 2).mean()) / (D * LN2))
        d["S"] = nll.shape[0]
        if d["S"] > 1:
            d["iw"] = to_bpd(importance_weighted_nll(torch.as_tensor(nll), torch.as_tensor(log_q)).numpy())
    if (out / f"{model}_ode.npz").exists():
        o = np.load(out / f"{model}_ode.npz")
        d["ode"], d["nfe"] = o["bpd"], float(o["nfe"].mean())
    return d


def table(models: list[str], out: Path) -> str:
    data = {m: summarize(m, out) for m in models}
    base = data.get("uniform", {})
    head = ("dequantization", "ODE bpd", "bound bpd (ε-corr.)", "Δ bound vs uniform", "Δ ODE vs uniform",
            "bound w/o ε-corr.", "E log q / (D ln2)", "IW estimate, S draws (biased low: not a bound)")
    rows = []
    for m, d in data.items():
        def delta(key: str, d: dict = d, m: str = m) -> str:  # paired per image: same images, seeds, bound noise
            if m == "uniform" or key not in d or key not in base or d[key].shape != base[key].shape:
                return "-"
            return fmt(d[key] - base[key])

        iw = f"{fmt(d['iw'])} (S={d['S']})" if "iw" in d else "-"
        rows.append((m, fmt(d.get("ode")), fmt(d.get("bound")), delta("bound"), delta("ode"),
                     fmt(d.get("bound_noeps")), fmt(d.get("log_q")), iw))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    for m, d in data.items():
        if "bound" in d:
            lines.append(f"{m}: bound on {d['bound'].size} images (per-image MC s.e. {d['mc_se']:.4f} bpd)"
                         + (f", ODE on {d['ode'].size} images, mean NFE {d['nfe']:.0f}" if "ode" in d else ""))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--score", required=True, help="train.py checkpoint (uniform dequantization)")
    p.add_argument("--flow", help="train_dequant.py checkpoint made from --score")
    p.add_argument("--models", nargs="+", default=["uniform", "variational"],
                   help="uniform, variational, truncated<bin_std> or truncatedsde")
    p.add_argument("--jobs", nargs="+", default=["bound", "ode"], help="model:quantity or quantity (all models)")
    p.add_argument("--out", default="outputs/bench_dequantization")
    p.add_argument("--num-images", type=int, default=10**9, help="test images for the bound (default: all)")
    p.add_argument("--ode-images", type=int, default=10**9, help="test images for the ODE (default: all)")
    p.add_argument("--num-t", type=int, default=500, help="importance-sampled times per image (bound)")
    p.add_argument("--iw", type=int, default=1, help="draws of u per image (bound); > 1 adds the IW estimate")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 rtol = atol (ODE, float64)")
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: small per-image calls on a shared CPU are ~10x slower with 2 contending)")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "variational" in args.models and not args.flow:
        p.error("--flow is required for the variational model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        dataset = build_data(checkpoint_config(load_checkpoint(args.score))).load()["test"]
        for job in args.jobs:
            pairs = [job.split(":")] if ":" in job else [(m, job) for m in args.models]
            for m, q in pairs:
                run_job(m, q, args, dataset, out)
    print(f"== test split, one score model ({args.score}); bits/dim, mean ± s.e. over images ==")
    print(protocol_text(checkpoint_config(load_checkpoint(args.score)), args.num_t, args.rtol))
    print(table(args.models, out))


def protocol_text(score_cfg, num_t: int, rtol: float) -> str:
    """The protocol line: the score checkpoint's SDE (class and parameters) and eps, then the bound and ODE settings."""
    import hydra

    sde = hydra.utils.instantiate(score_cfg.sde)
    params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in vars(sde).items()
                       if not k.startswith("_"))
    eps = score_cfg.get("eps")
    eps_text = f"{float(eps):g} (the checkpoint's)" if eps is not None else f"{sde.default_eps:g} (the SDE's default)"
    return (f"protocol: {type(sde).__name__}({params}), eps = {eps_text}; bound: Theorem 3, importance-sampled t, "
            f"paired stratified estimator, num_t={num_t}; ODE: dopri5 rtol=atol={rtol:g}, float64, 1 Rademacher "
            "probe, no ε-correction")


if __name__ == "__main__":
    main()
