"""ODE bits/dim: the reference method (score_sde_pytorch ``likelihood.py``) side by side with scoreflow's.

    python bench/likelihood_speed.py --ckpt outputs/train/<run>/checkpoints/last.ckpt         # CPU, default run
    python bench/likelihood_speed.py --gpu-model ddpmpp --device cuda --num-images 128          # GPU, CIFAR-10 shape

Both methods get the same network, the same batch, the same dequantization draw and the same Rademacher probe
(per-image seeds, as ``evaluate.py``). The reference method is re-implemented faithfully: the whole batch is one
float64 state for ``scipy.integrate.solve_ivp`` (RK45); every evaluation moves the state to the device as float32,
calls the network once for the drift (no grad) and once more, with a backward pass, for the divergence of the
drift, computing ``g^2`` as the square of the diffusion coefficient as that code does, and returns both to the host.

Times are CPU time of this process on the CPU (``time.process_time``: with one thread it does not move when other
programs load the machine) and synchronised wall time on a GPU. Every setting is scored against one tight solve
(scoreflow dopri5 at ``--tight``, float64 state): NFE, seconds
per image, max and mean per-image |error| in bits/dim (NFE counts network calls: for ``rk4_shared`` one in four
is a forward pass without a divergence; ``exp_pc3`` makes one evaluation per step).
The last line is the **time ratio at equal accuracy**:
the reference at its default 1e-5 against our fastest setting whose max error is not larger.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import integrate

from scoreflow.likelihood import draw_probe, ode_log_likelihood
from scoreflow.likelihood.ode import FIXED_GRID_METHODS, ode_methods, power_grid
from scoreflow.utils import flat_dim

LN2 = math.log(2.0)


@dataclass
class Row:
    method: str
    setting: str
    nfe: float
    seconds: float
    bpd: np.ndarray


def reference_nll(score_fn, sde, y: torch.Tensor, probe: torch.Tensor, eps: float, rtol: float, atol: float):
    """score_sde_pytorch's ``likelihood_fn``: scipy RK45 on a host float64 state, two network calls per evaluation."""
    shape, B, dev = y.shape, y.shape[0], y.device
    probe32 = probe.float()

    def drift_fn(x, t):
        # rsde.sde(x, t) with probability_flow=True: f - diffusion**2 * score / 2, diffusion = sqrt(g^2) in float32
        diffusion = sde.g2(t).sqrt()
        return sde.drift(x, t) - (diffusion**2).view(-1, *([1] * (x.ndim - 1))) * score_fn(x, t) * 0.5

    def ode_func(t, state):
        x = torch.from_numpy(state[:-B]).reshape(shape).to(dev).float()
        vec_t = torch.ones(B, device=dev) * t
        with torch.no_grad():
            drift = drift_fn(x, vec_t).detach().cpu().numpy().reshape(-1)
        with torch.enable_grad():  # get_div_fn: Hutchinson divergence of the whole drift by autograd
            x.requires_grad_(True)
            fn_eps = torch.sum(drift_fn(x, vec_t) * probe32)
            grad = torch.autograd.grad(fn_eps, x)[0]
        x.requires_grad_(False)
        div = torch.sum(grad * probe32, dim=tuple(range(1, x.ndim))).detach().cpu().numpy().reshape(-1)
        return np.concatenate([drift, div], axis=0)

    init = np.concatenate([y.detach().cpu().numpy().reshape(-1).astype(np.float64), np.zeros(B)], axis=0)
    sol = integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=atol, method="RK45")
    zp = sol.y[:, -1]
    z = torch.from_numpy(zp[:-B]).reshape(shape)
    delta = torch.from_numpy(zp[-B:])
    return -(sde.prior_logp(z) + delta), sol.nfev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_checkpoint_batch(args):
    """The default run's model, its first ``--num-images`` test images dequantized with evaluate.py's seeds."""
    from scoreflow.tasks.build import build_data
    from scoreflow.tasks.checkpoint import image_seed, seeded_generator
    from scoreflow.tasks.common import module_from_checkpoint

    module, cfg, _ = module_from_checkpoint(args.ckpt)
    module.eval().to(args.device)
    ds = build_data(cfg).load()["test"]
    dev = torch.device(args.device)
    ys, probes = [], []
    for i in range(args.offset, args.offset + args.num_images):
        k = torch.as_tensor(ds[i][0])[None].to(dev)
        y, _ = module.to_model_space(k, seeded_generator(dev, image_seed(0, i, 0, "dequantization")))
        ys.append(y.double())
        probes.append(draw_probe("rademacher", ys[-1], generator=seeded_generator(dev, image_seed(0, i, 0, "probe"))))
    y = torch.cat(ys)
    offset = module.to_bpd(torch.zeros(1, dtype=torch.float64, device=dev), torch.zeros(1, device=dev), flat_dim(y))
    return module._score_fn(), module.sde, module.eps, y, torch.cat(probes), float(offset), f"checkpoint {args.ckpt}"


def load_random_network(args):
    """``ddpmpp`` (or another preset) with random weights and a non-zero output layer, at CIFAR-10 shape."""
    from omegaconf import OmegaConf

    from scoreflow.nets.score_model import ScoreModel
    from scoreflow.sde import VPSDE
    from scoreflow.utils import ieee_float32

    cfg = OmegaConf.load(f"conf/model/{args.gpu_model}.yaml")
    net_cfg = {k: v for k, v in OmegaConf.to_container(cfg.net).items() if k != "_target_"}
    net_cfg["dropout"] = 0.0
    from scoreflow.nets.ncsnpp import NCSNpp

    torch.manual_seed(0)
    net = NCSNpp(shape=(3, 32, 32), **net_cfg)
    net.conv_out.reset_parameters()  # the zero-initialised output conv would make the score exactly 0
    sde = VPSDE()
    model = ScoreModel(net, sde, parametrization="eps", time_label="t999").eval().to(args.device)
    dev = torch.device(args.device)
    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randint(0, 256, (args.num_images, 3, 32, 32), generator=g)
    u = torch.rand(k.shape, generator=g, dtype=torch.float64)
    y = (2 * (k + u) / 256 - 1).to(dev)
    probe = draw_probe("rademacher", y.cpu(), generator=torch.Generator(device="cpu").manual_seed(1)).to(dev)

    def score_fn(x, t):
        with torch.autocast(x.device.type, enabled=False), ieee_float32():
            return model(x.float(), t.float()).to(x.dtype)

    return score_fn, sde, 1e-5, y, probe, 7.0, f"{args.gpu_model} (random weights, non-zero output conv)"


OURS_SYNTAX = ("METHOD@TOL (adaptive), METHOD#STEPS (fixed power grid), METHOD#STEPS^RHO (its rho) or METHOD#N>KNEE:M "
               "(two-piece grid), comma-separated, e.g. dopri5@1e-5,rk4#40")


def _parse_ours(spec: str) -> dict:
    if "#" in spec:
        method, rest = spec.split("#")
        if ">" in rest:
            n, tail = rest.split(">")
            knee, n_even = tail.split(":")
            return {"method": method, "two_piece": (int(n), float(knee), int(n_even))}
        if "^" in rest:
            n, rho = rest.split("^")
            return {"method": method, "steps": int(n), "grid_rho": float(rho)}
        return {"method": method, "steps": int(rest)}
    method, tol = spec.split("@")
    return {"method": method, "rtol": float(tol), "atol": float(tol)}


def parse_ours(spec: str) -> dict:
    """One setting of ours; ``ValueError`` naming the syntax if ``spec`` is malformed.

    ``dopri5@1e-5``: adaptive, rtol=atol. ``rk4#40``: fixed power grid with 40 steps (the SDE's rho).
    ``rk4#40^2.5``: the same with rho = 2.5. ``rk4#50>0.1:19``: two-piece grid, the 50-step power grid's times
    below t = 0.1, then 19 even steps from 0.1 to T (passed as ``grid=``).
    """
    try:
        kw = _parse_ours(spec)
    except ValueError:  # a missing or extra separator, a number that is not one
        raise ValueError(f"malformed setting {spec!r}: expected {OURS_SYNTAX}") from None
    method, fixed = kw["method"], "rtol" not in kw
    if method not in ode_methods():
        raise ValueError(f"setting {spec!r}: unknown method {method!r}; known: {', '.join(ode_methods())}")
    if fixed != (method in FIXED_GRID_METHODS):
        want = "adaptive: give METHOD@TOL" if fixed else "a fixed-grid method: give METHOD#STEPS"
        raise ValueError(f"setting {spec!r}: {method!r} is {want} (expected {OURS_SYNTAX})")
    n_steps = [kw["two_piece"][0], kw["two_piece"][2]] if "two_piece" in kw else [kw.get("steps", 1)]
    if min(n_steps) < 1 or not kw.get("rtol", 1.0) > 0 or not kw.get("grid_rho", 1.0) > 0:  # nan too
        raise ValueError(f"setting {spec!r}: step counts must be at least 1, TOL and RHO positive")
    return kw


def parse_tols(spec: str) -> list[float]:
    """``--ref-tols``: comma-separated positive tolerances; ``ValueError`` if not."""
    try:
        tols = [float(s) for s in spec.split(",")]
    except ValueError:
        raise ValueError(f"malformed tolerances {spec!r}: expected positive numbers, comma-separated, "
                         "e.g. 1e-5,1e-4") from None
    if not all(t > 0 for t in tols):
        raise ValueError(f"tolerances {spec!r} must be positive")
    return tols


def two_piece_grid(sde, eps: float, n_power: int, knee: float, n_even: int) -> torch.Tensor:
    """Times of the ``n_power``-step power grid below ``knee``, then ``n_even`` even steps from ``knee`` to T."""
    g = power_grid(eps, sde.T, n_power, sde.ode_grid_rho)
    return torch.cat([g[g < knee], torch.linspace(knee, sde.T, n_even + 1, dtype=torch.float64)])


def setting_name(kw: dict) -> str:
    if "two_piece" in kw:
        n, knee, n_even = kw["two_piece"]
        return f"{kw['method']} {n}>{knee:g}:{n_even} steps"
    if "steps" in kw:
        rho = f" rho={kw['grid_rho']:g}" if "grid_rho" in kw else ""
        return f"{kw['method']} {kw['steps']} steps{rho}"
    return f"{kw['method']} rtol=atol={kw['rtol']:g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a train.py checkpoint (CPU mode)")
    p.add_argument("--gpu-model", help="a conf/model preset with random weights (GPU mode), e.g. ddpmpp")
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--offset", type=int, default=0, help="checkpoint mode: start at this test image")
    p.add_argument("--batch", type=int, default=None,
                   help="solve the images in batches of this size (every method, as evaluate.py does) and pool the "
                   "per-image errors; default: all images as one batch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tight", type=float, default=1e-7, help="rtol=atol of the reference solve (dopri5)")
    p.add_argument("--ref-tols", default="1e-5,1e-4", help="tolerances of the reference method (first = default)")
    p.add_argument("--ours", default="dopri5@1e-5,rk4#30,rk4#40,rk4#50,rk4_shared#40,"
                   "exp_pc3#30,exp_pc3#40,exp_pc3#50,exp_pc3#60,exp_pc4#50",
                   help="comma-separated: METHOD@TOL (adaptive), METHOD#STEPS (fixed power grid), METHOD#STEPS^RHO "
                   "(its rho), METHOD#N>KNEE:M (two-piece: the N-step power grid below KNEE, M even steps above)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--cache", default="outputs/bench_cache",
                   help="folder where the tight solve is kept between runs (keyed by model, images and tolerance)")
    args = p.parse_args()
    try:  # the settings first: a malformed one would otherwise fail only after the tight and reference solves
        ours_settings = [parse_ours(spec) for spec in args.ours.split(",")]
    except ValueError as e:
        p.error(f"--ours: {e}")
    try:
        ref_tols = parse_tols(args.ref_tols)
    except ValueError as e:
        p.error(f"--ref-tols: {e}")
    if (args.ckpt is None) == (args.gpu_model is None):
        raise SystemExit("give exactly one of --ckpt (a train.py checkpoint) or --gpu-model (e.g. ddpmpp)")
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    score_fn, sde, eps, y, probe, offset, what = (load_checkpoint_batch if args.ckpt else load_random_network)(args)
    D, B = flat_dim(y), y.shape[0]

    def to_bpd(nll: torch.Tensor) -> np.ndarray:
        return (nll.double().cpu() / (D * LN2)).numpy() + offset

    clock = time.process_time if dev.type == "cpu" else time.perf_counter
    bs = args.batch or B
    chunks = [(y[i:i + bs], probe[i:i + bs]) for i in range(0, B, bs)]

    def pooled(method: str, setting: str, solve) -> Row:
        """``solve(y, probe) -> (nll, nfe)`` on every batch: total time, mean NFE per batch, per-image bpd."""
        nfes, bpds, seconds = [], [], 0.0
        for yb, pb in chunks:
            sync(dev)
            t0 = clock()
            nll, nfe = solve(yb, pb)
            sync(dev)
            seconds += clock() - t0
            nfes.append(nfe)
            bpds.append(to_bpd(nll))
        return Row(method, setting, float(np.mean(nfes)), seconds, np.concatenate(bpds))

    def ours(**kw) -> Row:
        setting = setting_name(kw)
        if "two_piece" in kw:
            kw = dict(kw)
            kw["grid"] = two_piece_grid(sde, eps, *kw.pop("two_piece"))

        def solve(yb, pb):
            r = ode_log_likelihood(score_fn, sde, yb, eps=eps, probe=pb, dtype=torch.float64, **kw)
            # NFE = network calls; rk4_shared's drift-only ones (forward pass, no divergence) are counted too
            return r.nll, r.nfe + r.nfe_drift_only

        return pooled("scoreflow", setting, solve)

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"# {what}: {B} images of shape {tuple(y.shape[1:])} on {name}, torch {torch.__version__}; "
          f"times: {'process CPU time' if dev.type == 'cpu' else 'wall time'}"
          + (f"; solved in batches of {bs}, errors pooled" if bs < B else ""), flush=True)
    tight_bpd, tight_nfe = [], []
    for yb, pb in chunks:  # one tight solve per batch, cached (keyed by the batch's own images and probe)
        ident = f"{what}|{yb.shape[0]}|{args.tight}|{float(yb.sum())}|{float(pb.sum())}"
        key = hashlib.sha1(ident.encode()).hexdigest()
        cached = Path(args.cache) / f"tight_{key[:16]}.npz"
        if cached.exists():
            c = np.load(cached)
            tight_bpd.append(c["bpd"])
            tight_nfe.append(float(c["nfe"]))
            print(f"# tight solve (cached in {cached}): dopri5 rtol=atol={args.tight:g}: {tight_nfe[-1]:.0f} NFE",
                  flush=True)
            continue
        sync(dev)
        t0 = clock()
        r = ode_log_likelihood(score_fn, sde, yb, eps=eps, probe=pb, dtype=torch.float64, method="dopri5",
                               rtol=args.tight, atol=args.tight)
        sync(dev)
        seconds = clock() - t0
        tight_bpd.append(to_bpd(r.nll))
        tight_nfe.append(float(r.nfe))
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cached, nfe=r.nfe, seconds=seconds, bpd=tight_bpd[-1])
        print(f"# tight solve: dopri5 rtol=atol={args.tight:g}: {r.nfe} NFE, {seconds:.1f} s", flush=True)
    tight = Row("scoreflow", "tight", float(np.mean(tight_nfe)), 0.0, np.concatenate(tight_bpd))
    rows: list[Row] = []
    for tol in ref_tols:
        rows.append(pooled("reference", f"RK45 rtol=atol={tol:g}",
                           lambda yb, pb, tol=tol: reference_nll(score_fn, sde, yb, pb, eps, tol, tol)))
        print(_fmt(rows[-1], tight, B), flush=True)
    for kw in ours_settings:
        rows.append(ours(**kw))
        print(_fmt(rows[-1], tight, B), flush=True)

    ref = rows[0]
    ref_err = np.abs(ref.bpd - tight.bpd).max()
    ok = [r for r in rows if r.method == "scoreflow" and np.abs(r.bpd - tight.bpd).max() <= ref_err]
    print()
    if ok:
        best = min(ok, key=lambda r: r.seconds)
        print(f"equal accuracy (max |error| <= {ref_err:.2e} bpd, the reference at its default): "
              f"scoreflow {best.setting} is {ref.seconds / best.seconds:.2f}x faster than the reference "
              f"({best.seconds / B * 1e3:.1f} vs {ref.seconds / B * 1e3:.1f} ms/image, "
              f"{best.nfe:.0f} vs {ref.nfe:.0f} NFE)")
    else:
        print(f"no scoreflow setting reached the reference's max error {ref_err:.2e} bpd")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": what, "images": B, "device": str(dev), "tight_nfe": tight.nfe, "rows": [
                {"method": r.method, "setting": r.setting, "nfe": r.nfe, "seconds": r.seconds,
                 "max_err": float(np.abs(r.bpd - tight.bpd).max()), "mean_err": float(np.abs(r.bpd - tight.bpd).mean())}
                for r in rows]}, f, indent=1)


def _fmt(r: Row, tight: Row, B: int) -> str:
    err = np.abs(r.bpd - tight.bpd)
    return (f"{r.method:9s} {r.setting:28s} NFE {r.nfe:6.0f}  {r.seconds / B * 1e3:8.1f} ms/image  "
            f"max err {err.max():.2e}  mean err {err.mean():.2e}  bpd {r.bpd.mean():.5f}")


if __name__ == "__main__":
    main()
