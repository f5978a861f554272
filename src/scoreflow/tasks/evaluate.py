"""``evaluate(cfg)``: bits/dim (ODE and bound) over a whole split, and FID, from a checkpoint alone.

* Every image of the split is evaluated ``repeats`` times. Image ``i``, repeat ``r`` draws its dequantization
  noise, Hutchinson probe, bound times and noises from generators seeded by ``(seed, i, r)`` only, so its
  bound does not depend on the batch it was in, and its ODE value depends on the batch only through the
  adaptive solver's shared step sizes (to within ``rtol``).
* Values are appended to ``partial.jsonl`` after every batch; a rerun in the same directory skips what is
  there (each ``(image, repeat)`` counted once) and refuses to mix values of a different protocol.
* ``devices=N num_nodes=M`` (Lightning Fabric; also under ``torchrun`` and SLURM) deals the batches out to the
  processes. They run independently (an adaptive solver takes a different number of steps on every rank) and
  meet only at barriers before and after the work: each appends to its own ``partial.rank<k>.jsonl`` and
  rank 0 merges the files into ``per_example.npz`` and ``metrics.json``, identical to a one-process run.
* The ODE solver's own error is measured on the first ``solver_check_images`` images, re-solved at a 100x
  tighter tolerance with the same noise and probes, and printed under the results.
* FID samples are written in chunks (``fid_samples/``) and reused by a rerun; the Inception statistics of the
  training split are computed once and cached.

Also accepts score_sde_pytorch ``.pth`` checkpoints (with ``model=``, ``sde=``, ``data=`` chosen on the
command line). The pieces live in :mod:`scoreflow.tasks.checkpoint` (loading, shared with
:mod:`scoreflow.tasks.sample`), :mod:`scoreflow.tasks.likelihood_eval` (bits/dim) and :mod:`scoreflow.tasks.fid`.
"""

from __future__ import annotations

import inspect
import math
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from scoreflow.data.base import ArrayDataset
from scoreflow.likelihood.ode import FIXED_GRID_METHODS
from scoreflow.lit import per_image, preemption
from scoreflow.lit.datamodule import ScoreDataModule
from scoreflow.lit.preemption import EvaluationStopped
from scoreflow.tasks.build import ConfigError, to_container
from scoreflow.tasks.checkpoint import LoadedModel, load_model, resolve_device, task_dir
from scoreflow.tasks.common import results_table, write_metrics
from scoreflow.tasks.console import echo, is_multirun
from scoreflow.tasks.fid import run_fid
from scoreflow.tasks.likelihood_eval import (
    LikelihoodSettings,
    PartialResults,
    check_solver,
    discard_partial,
    is_complete,
    run_likelihoods,
    save_per_example,
    solve_batches,
    summarize,
)
from scoreflow.tasks.resume import rerun_hint

# Ranks meet at a barrier after their share of the solves; on a long job they may finish hours apart, and the
# default 30 min timeout of a process group would kill the early ones.
BARRIER_TIMEOUT = timedelta(days=7)


def launch(cfg: DictConfig):
    """Start the processes of ``cfg.accelerator`` / ``cfg.devices`` / ``cfg.num_nodes`` with Lightning Fabric.

    Run as a script, Fabric re-launches the command once per further local device; under ``torchrun`` or
    SLURM the processes already exist and it only joins them. ``device=cpu|cuda|cuda:N`` (one process) is
    the shorthand of earlier releases. The module is never wrapped in DDP: its forward would synchronize the
    ranks inside every solve.
    """
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    accelerator, devices = str(cfg.get("accelerator") or "auto"), cfg.get("devices") or 1
    if not isinstance(devices, (int, str)):  # a list of device indices, e.g. devices=[0,2]
        devices = [int(i) for i in devices]
    num_nodes = int(cfg.get("num_nodes") or 1)
    device = str(cfg.get("device") or "auto")
    if device != "auto":
        if devices != 1 or num_nodes != 1 or accelerator != "auto":
            raise ConfigError(f"device={device} names one device; for several use accelerator=... devices=N "
                              "num_nodes=M (and leave device=auto)")
        d = resolve_device(device)
        accelerator, devices = d.type, ([d.index] if d.index is not None else 1)
    elif accelerator == "auto":  # not Fabric's auto: it would pick MPS, which has no float64 for the ODE
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    one = num_nodes == 1 and (len(devices) == 1 if isinstance(devices, list) else str(devices) == "1")
    strategy = "auto" if one else DDPStrategy(timeout=BARRIER_TIMEOUT)  # "auto"/-1 devices: DDP, maybe of one
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    fabric.launch()
    return fabric


def images_digest(dataset) -> str:
    """The split's images in order (``ArrayDataset.digest``): the data may move (``root`` is not part of the
    fingerprint) but not change. The whole split, so that raising ``num_images`` resumes."""
    if not isinstance(dataset, ArrayDataset):
        raise TypeError(f"evaluate.py fingerprints its split as an in-memory ArrayDataset (every scoreflow source "
                        f"returns one); got {type(dataset).__name__}")
    return dataset.digest()


def fingerprint(lm: LoadedModel, split: str, seed: int, ode_tc: bool, *, data_digest: str | None = None,
                ode_batch_size: int | None = None) -> dict[str, Any]:
    """Everything a per-image value depends on (not the number of images or repeats): the checkpoint's weights,
    its SDE, network settings and data scaling, the images themselves (``data_digest``), the ODE's and the
    bound's settings and, for an adaptive ODE solver, the batch size (a batch is solved as one system, so its
    step sizes depend on every image in it: ``ode_batch_size``). A rerun compares the settings of the quantities
    it computes (:class:`~scoreflow.tasks.likelihood_eval.PartialResults`)."""
    e, m = lm.module.eval_cfg, lm.module
    data = {k: v for k, v in to_container(lm.cfg.data).items() if k != "root"}  # the data may move, not change
    settings = per_image.protocol_of(m, ode_truncation_correction=ode_tc)  # eps, dequantization, ode, bound
    return {
        "checkpoint": lm.info["path"], "step": lm.info["step"], "weights": lm.info["weights"],
        "weights_digest": lm.info.get("weights_digest"), "data": data,
        # the network's settings and the map into its space: a score_sde .pth takes them from the command line
        "sde": to_container(lm.cfg.sde), "model": to_container(lm.cfg.model), "scale": m.scale, "shift": m.shift,
        **({"data_digest": data_digest} if data_digest else {}),
        **({"ode_batch_size": ode_batch_size} if ode_batch_size and e.method not in FIXED_GRID_METHODS else {}),
        "split": split,
        "seed": seed, **settings,
    }


def protocol_text(p: dict[str, Any], ode: bool = True, bound: bool = True) -> str:
    """One line of what was computed: the ODE and bound settings of the quantities evaluated (``ode``, ``bound``)
    and, with FID, its sampler (not the likelihood ODE's, which FID does not use)."""
    o, b = p["ode"], p["bound"]
    onoff = {True: "on", False: "off"}
    solve = f"steps={o['steps']} grid_rho={o['grid_rho']:g}" if "steps" in o else \
        f"rtol={o['rtol']:g} atol={o['atol']:g}"
    parts = [f"eps={p['eps']:g}, dequantization={p['dequantization']}, repeats={p['repeats']}, seed={p['seed']}"]
    if ode:
        parts.append(f"ODE {o['method']} {solve} {o['divergence']} {o['dtype']} "
                     f"eps-correction {onoff[o['truncation_correction']]}")
    if bound:
        parts.append(f"bound num_t={b['num_t']} IS {onoff[b['importance_sampling']]} {b['estimator']}"
                     f"{' stratified' if b['stratified'] else ''}{' antithetic' if b.get('antithetic') else ''}"
                     f"{' plan ' + b['plan'] if b.get('plan') else ''} "
                     f"eps-correction {onoff[b['truncation_correction']]}")
    if isinstance(p.get("fid"), dict):
        f, sm = p["fid"], p["fid"].get("sampler") or {}
        name = str(sm.get("_target_", "?")).rsplit(".", 1)[-1]
        if "method" in sm:  # the probability-flow ODE
            how = f"{sm['method']} steps={sm['steps']}" if sm.get("steps") else \
                f"{sm['method']} rtol={sm.get('rtol')} atol={sm.get('atol')}"
        else:
            how = f"{sm.get('predictor')} + {sm.get('corrector')} steps={sm.get('steps') or 'N'}"
        parts.append(f"FID: {f['num_samples']} samples, {name} {how}, against the {f['reference']}")
    return "; ".join(parts)


def num_images(cfg: DictConfig, lm: LoadedModel, split: str, available: int) -> int:
    """``cfg.num_images``; ``null``: as many as the training run's test phase (its ``datamodule.test_subset``),
    so that ``evaluate.py ckpt_path=...`` alone reproduces it; ``all``: every image of the split."""
    want = cfg.get("num_images")
    if want is None and split == "test":
        want = (lm.cfg.get("datamodule") or {}).get("test_subset")
    if want is None or str(want) == "all":
        return available
    if int(want) < 0:
        raise ConfigError(f"num_images must be >= 0, null or all, got {want}")
    return min(int(want), available)


def eval_batch_size(run_cfg: DictConfig) -> int:
    """The training run's ``datamodule.eval_batch_size`` (its test phase's batches), or ScoreDataModule's default."""
    stored = (run_cfg.get("datamodule") or {}).get("eval_batch_size")
    if stored is None:
        stored = inspect.signature(ScoreDataModule).parameters["eval_batch_size"].default
    return int(stored)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``; write ``metrics.json`` and ``per_example.npz``; print a table.

    On several processes every rank returns the merged likelihood metrics; rank 0 alone writes the files,
    prints, and computes FID.
    """
    t0 = time.time()
    fabric = launch(cfg)
    out = task_dir(cfg, "evaluate")

    def make_stop(signum: int, requeue: bool) -> EvaluationStopped:
        return EvaluationStopped(signum, out, requeue=requeue, is_global_zero=fabric.global_rank == 0)

    def children() -> list[Any]:  # the processes Fabric's local launcher started (rank 0 only): signalled too
        return list(getattr(getattr(fabric.strategy, "launcher", None), "procs", None) or [])

    # SLURM's time-limit warning (SIGUSR1) requeues the job and SIGTERM stops it, with one line, exit 128 + signal;
    # Ctrl-C keeps its KeyboardInterrupt path (entry.py: "interrupted ..."). The finished batches are on disk.
    try:
        with preemption.stop_on_signals(make_stop, (*preemption.REQUEUE_SIGNALS, signal.SIGTERM), children):
            return _evaluate(cfg, fabric, out, t0)
    except EvaluationStopped as stop:
        preemption.finish(stop, rerun_hint(out) if is_multirun() else "")


def _evaluate(cfg: DictConfig, fabric: Any, out: Path, t0: float) -> dict[str, Any]:
    rank, world, main = fabric.global_rank, fabric.world_size, fabric.global_rank == 0
    lm = load_model(cfg, device=fabric.device)
    module, split = lm.module, str(cfg.split)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}")
    dataset = lm.source.load()[split]
    e = module.eval_cfg
    n = num_images(cfg, lm, split, len(dataset))
    s = LikelihoodSettings(
        ode=bool(cfg.ode), bound=bool(cfg.bound), seed=int(cfg.seed if cfg.seed is not None else e.seed),
        repeats=int(cfg.repeats if cfg.repeats is not None else e.test_repeats),
        batch_size=int(cfg.batch_size if cfg.batch_size is not None else eval_batch_size(lm.cfg)),
        ode_truncation_correction=bool(cfg.ode_truncation_correction),
        bound_chunk_size=int(cfg.bound_chunk_size), max_batches=cfg.max_batches,
        progress=bool(cfg.progress), solver_check_images=min(int(cfg.solver_check_images or 0), n),
    )
    fp = fingerprint(lm, split, s.seed, s.ode_truncation_correction, data_digest=images_digest(dataset),
                     ode_batch_size=s.batch_size)
    if "plan" in fp["bound"]:  # the plan is fitted on the first min(bound_plan_images, n) images evaluated: a run
        used = min(int(e.bound_plan_images), n, len(dataset))  # with more images may fit another plan, not mixed
        fp["bound"] = {**fp["bound"], "plan": f"fit on {used} images"}
    protocol = {**fp, "repeats": s.repeats, "num_images": n, "batch_size": s.batch_size}
    if s.ode:
        c = check_solver(e)
        protocol["solver_check"] = {"num_images": s.solver_check_images, "method": c["method"], "rtol": c["rtol"],
                                    "atol": c["atol"]}
    if main:
        where = f"{world} processes ({fabric.device.type})" if world > 1 else str(fabric.device)
        echo(f"[scoreflow] evaluating {lm.describe()} on {split} ({n} images) on {where}; results in {out}")
    metrics: dict[str, Any] = {}
    complete = True
    quantities = [q for q, on in (("bpd_ode", s.ode), ("bpd_bound", s.bound)) if on]
    if quantities and n == 0:
        raise ConfigError(f"the {split} split of {lm.source.name} has no images to evaluate")
    if quantities:
        resume = bool(cfg.resume)
        if main and not resume:
            discard_partial(out)
        fabric.barrier()
        batches = solve_batches(n, s, adaptive=e.method not in FIXED_GRID_METHODS)
        store = PartialResults(out, fp, rank=rank, resume=resume, quantities=tuple(quantities), batches=batches)
        fabric.barrier()  # every rank has read what is done before any rank appends: they agree on the shares
        run_likelihoods(module, dataset, n, store, s, rank=rank, world_size=world)
        fabric.barrier()  # the one wait for the other ranks, after all local work
        merged = PartialResults(out, fp, rank=rank, quantities=tuple(quantities), batches=batches) \
            if world > 1 else store  # reads every rank's file
        complete = is_complete(merged, n, s)
        metrics.update(summarize(merged, split, n, s.repeats, quantities, s.solver_check_images))
        if main:
            save_per_example(out / "per_example.npz", merged, n, s.repeats, quantities, s.solver_check_images)
        fabric.barrier()  # no rank exits (and tears the process group down) while rank 0 still reads the files
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if not main:
        return metrics
    fid_cfg = cfg.get("fid")
    fid_asked = fid_cfg is not None and int(fid_cfg.get("num_samples") or 0) > 0
    if fid_asked and not complete:  # the samples wait for the likelihoods: the rerun that completes them runs FID
        metrics["fid_status"] = "deferred: FID runs once the likelihoods are complete (rerun the same command)"
    if complete and fid_asked:
        fid = run_fid(lm, fid_cfg, cfg.sampler, out, bool(cfg.progress))
        metrics.update({f"{split}/{k}": v for k, v in fid.items()})
        protocol["fid"] = {"sampler": to_container(cfg.sampler), "num_samples": int(fid_cfg.num_samples),
                           "reference": f"train split ({int(fid['fid_ref_num_images'])} images)"}
    metrics.update({"complete": complete, "protocol": protocol,
                    "protocol_text": protocol_text(protocol, s.ode, s.bound),
                    "num_processes": world, "wall_time_s": time.time() - t0})
    write_metrics(out / "metrics.json", metrics)
    echo(format_table(metrics, split, lm, out, complete))  # console and run log
    return metrics


def solver_error_text(metrics: dict[str, Any], split: str, check: dict[str, Any]) -> str:
    """``≤ X bpd (max |Δ| over n images ...)``: how far the reported ODE digits are from a 100x tighter solve."""
    p = f"{split}/ode_solver_error_"
    if check["num_images"] == 0:
        return "not measured (solver_check_images=0)"
    if f"{p}max" not in metrics:
        return "not measured yet (the check runs after the main solves)"
    se = metrics.get(f"{split}/bpd_ode_se")
    vs_se = f" = {metrics[p + 'max'] / se:.2g} s.e." if se and se == se and se > 0 else ""
    return (f"≤ {metrics[p + 'max']:.1e} bpd{vs_se} (max |Δ| over {int(metrics[p + 'num_images'])} images "
            f"vs {check['method']} rtol={check['rtol']:g} atol={check['atol']:g}, same noise and probes; "
            f"mean {metrics[p + 'mean']:.1e})")


def format_table(metrics: dict[str, Any], split: str, lm: LoadedModel, out: Path, complete: bool) -> str:
    p = f"{split}/"
    as_test = {"test/" + k[len(p):]: v for k, v in metrics.items() if k.startswith(p)}  # results_table reads test/*
    extra: dict[str, Any] = {}
    for q, label in (("bpd_ode", "images (ODE)"), ("bpd_bound", "images (bound)")):
        if f"{p}{q}_num_images" in metrics:
            extra[label] = int(metrics[f"{p}{q}_num_images"])
    if f"{p}nfe_max" in metrics:
        extra["max NFE (ODE)"] = int(metrics[f"{p}nfe_max"])
    check = metrics["protocol"].get("solver_check")
    if check is not None:
        extra["solver error (ODE)"] = solver_error_text(metrics, split, check)
    if "fid_status" in metrics:
        extra["FID"] = metrics["fid_status"]
    if f"{p}fid" in metrics:
        extra["FID samples / NFE"] = f"{int(metrics[p + 'fid_num_samples'])} / {metrics[p + 'fid_nfe']:.0f}"
    if f"{p}bpd_bound_se_mc" in metrics:
        excess = metrics[p + "bpd_bound_mc_excess"]
        share = (f"the Monte-Carlo noise adds {100 * excess:.1f} % to the s.e." if math.isfinite(excess) else
                 "the spread between images is lost in the Monte-Carlo noise: more images, or more times per image")
        extra["bound s.e. split"] = (
            f"between images {metrics[p + 'bpd_bound_se_between']:.4f} ⊕ Monte-Carlo "
            f"{metrics[p + 'bpd_bound_se_mc']:.4f} ({share})")
    extra["protocol"] = metrics["protocol_text"]
    extra["wall time"] = f"{metrics['wall_time_s']:.1f} s"
    extra["output"] = str(out)
    title = f"{split} split, {lm.info['weights']} weights, step {lm.info['step']}"
    if not complete:
        title += " (PARTIAL: stopped by max_batches; rerun the same command to continue)"
    return results_table(as_test, title=title, extra=extra)
