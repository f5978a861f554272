"""``evaluate(cfg)``: bits/dim (ODE and bound) over a whole split, and FID, from a checkpoint alone.

* Every image of the split is evaluated ``repeats`` times. Image ``i``, repeat ``r`` draws its dequantization
  noise, Hutchinson probe, bound times and noises from generators seeded by ``(seed, i, r)`` only, so its
  bound does not depend on the batch it was in, and its ODE value depends on the batch only through the
  adaptive solver's shared step sizes (to within ``rtol``).
* Values are appended to ``partial.jsonl`` after every batch; a rerun in the same directory skips what is
  there (each ``(image, repeat)`` counted once) and refuses to mix values of a different protocol.
* FID samples are written in chunks (``fid_samples/``) and reused by a rerun; the Inception statistics of the
  training split are computed once and cached.

Also accepts score_sde_pytorch ``.pth`` checkpoints (with ``model=``, ``sde=``, ``data=`` chosen on the
command line). The pieces live in :mod:`scoreflow.tasks.checkpoint` (loading, shared with
:mod:`scoreflow.tasks.sample`), :mod:`scoreflow.tasks.likelihood_eval` (bits/dim) and :mod:`scoreflow.tasks.fid`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from scoreflow.tasks.build import ConfigError, to_container
from scoreflow.tasks.checkpoint import LoadedModel, load_model, resolve_device, task_dir
from scoreflow.tasks.common import results_table, write_metrics
from scoreflow.tasks.fid import run_fid
from scoreflow.tasks.likelihood_eval import (
    LikelihoodSettings,
    PartialResults,
    run_likelihoods,
    save_per_example,
    summarize,
)


def fingerprint(lm: LoadedModel, split: str, seed: int, ode_tc: bool) -> dict[str, Any]:
    """Everything a per-image value depends on (not the number of images, repeats or the batch size)."""
    e, m = lm.module.eval_cfg, lm.module
    data = {k: v for k, v in to_container(lm.cfg.data).items() if k != "root"}  # the data may move, not change
    return {
        "checkpoint": lm.info["path"], "step": lm.info["step"], "weights": lm.info["weights"], "data": data,
        "split": split,
        "seed": seed, "eps": m.eps, "dequantization": type(m.dequantizer).__name__ if m.dequantizer else "none",
        "ode": {"method": e["method"], "rtol": e["rtol"], "atol": e["atol"], "divergence": e["divergence"],
                "dtype": e["ode_dtype"], "truncation_correction": ode_tc},
        "bound": {"num_t": e["test_num_t"], "importance_sampling": e["importance_sampling"],
                  "estimator": e.get("bound_estimator", "closed_form"), "stratified": bool(e.get("stratified", False)),
                  "truncation_correction": e["truncation_correction"]},
    }


def protocol_text(p: dict[str, Any]) -> str:
    o, b = p["ode"], p["bound"]
    onoff = {True: "on", False: "off"}
    return (f"eps={p['eps']:g}, dequantization={p['dequantization']}, repeats={p['repeats']}, seed={p['seed']}; "
            f"ODE {o['method']} rtol={o['rtol']:g} atol={o['atol']:g} {o['divergence']} {o['dtype']} "
            f"eps-correction {onoff[o['truncation_correction']]}; bound num_t={b['num_t']} "
            f"IS {onoff[b['importance_sampling']]} {b['estimator']}{' stratified' if b['stratified'] else ''} "
            f"eps-correction {onoff[b['truncation_correction']]}")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``; write ``metrics.json`` and ``per_example.npz``; print a table."""
    t0 = time.time()
    out = task_dir(cfg, "evaluate")
    device = resolve_device(cfg.get("device"))
    lm = load_model(cfg, device=device)
    module, split = lm.module, str(cfg.split)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}")
    dataset = lm.source.load()[split]
    n = len(dataset) if cfg.get("num_images") is None else min(int(cfg.num_images), len(dataset))
    e = module.eval_cfg
    s = LikelihoodSettings(
        ode=bool(cfg.ode), bound=bool(cfg.bound), seed=int(cfg.seed),
        repeats=int(cfg.repeats if cfg.get("repeats") is not None else e["test_repeats"]),
        batch_size=int(cfg.batch_size if cfg.get("batch_size") is not None
                       else lm.cfg.get("datamodule", {}).get("eval_batch_size", 128)),
        ode_truncation_correction=bool(cfg.get("ode_truncation_correction", False)),
        bound_chunk_size=int(cfg.get("bound_chunk_size", 1024)), max_batches=cfg.get("max_batches"),
        progress=bool(cfg.get("progress", True)),
    )
    fp = fingerprint(lm, split, s.seed, s.ode_truncation_correction)
    protocol = {**fp, "repeats": s.repeats, "num_images": n, "batch_size": s.batch_size}
    print(f"[scoreflow] evaluating {lm.describe()} on {split} ({n} images) on {device}; results in {out}")
    metrics: dict[str, Any] = {}
    complete = True
    quantities = [q for q, on in (("bpd_ode", s.ode), ("bpd_bound", s.bound)) if on]
    if quantities and n == 0:
        raise ConfigError(f"the {split} split of {lm.source.name} has no images to evaluate")
    if quantities:
        store = PartialResults(out / "partial.jsonl", fp, resume=bool(cfg.get("resume", True)))
        complete = run_likelihoods(module, dataset, n, store, s)
        metrics.update(summarize(store, split, n, s.repeats, quantities))
        save_per_example(out / "per_example.npz", store, n, s.repeats, quantities)
    fid_cfg = cfg.get("fid")
    if complete and fid_cfg is not None and int(fid_cfg.get("num_samples") or 0) > 0:
        fid = run_fid(lm, fid_cfg, cfg.sampler, out, bool(cfg.get("progress", True)))
        metrics.update({f"{split}/{k}": v for k, v in fid.items()})
        protocol["fid"] = {"sampler": to_container(cfg.sampler), "num_samples": int(fid_cfg.num_samples),
                           "reference": f"train split ({int(fid['fid_ref_num_images'])} images)"}
    metrics.update({"complete": complete, "protocol": protocol, "protocol_text": protocol_text(protocol),
                    "wall_time_s": time.time() - t0})
    write_metrics(out / "metrics.json", metrics)
    print(format_table(metrics, split, lm, out, complete))
    return metrics


def format_table(metrics: dict[str, Any], split: str, lm: LoadedModel, out: Path, complete: bool) -> str:
    p = f"{split}/"
    as_test = {"test/" + k[len(p):]: v for k, v in metrics.items() if k.startswith(p)}  # results_table reads test/*
    extra: dict[str, Any] = {}
    for q, label in (("bpd_ode", "images (ODE)"), ("bpd_bound", "images (bound)")):
        if f"{p}{q}_num_images" in metrics:
            extra[label] = int(metrics[f"{p}{q}_num_images"])
    if f"{p}nfe_max" in metrics:
        extra["max NFE (ODE)"] = int(metrics[f"{p}nfe_max"])
    if f"{p}fid" in metrics:
        extra["FID samples / NFE"] = f"{int(metrics[p + 'fid_num_samples'])} / {metrics[p + 'fid_nfe']:.0f}"
    extra["protocol"] = metrics["protocol_text"]
    extra["wall time"] = f"{metrics['wall_time_s']:.1f} s"
    extra["output"] = str(out)
    title = f"{split} split, {lm.info['weights']} weights, step {lm.info['step']}"
    if not complete:
        title += " (PARTIAL: stopped by max_batches; rerun the same command to continue)"
    return results_table(as_test, title=title, extra=extra)
