"""Per-image bits/dim over a split: the probability-flow ODE and the bound, resumable and batch-independent.

* Image ``i``, repeat ``r`` draws its dequantization noise, Hutchinson probe, bound times and noises from
  generators seeded by ``(seed, i, r)`` only (:func:`scoreflow.tasks.checkpoint.image_seed`).
* :class:`PartialResults` appends the values to ``partial.jsonl`` after every batch, so a rerun skips what is
  there and refuses to mix values of a different protocol; :func:`summarize` and :func:`save_per_example`
  turn them into metrics and ``per_example.npz``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreflow.lit.module import ScoreLitModule
from scoreflow.tasks.checkpoint import image_seed, seeded_generator


class ProtocolMismatchError(RuntimeError):
    """A rerun would mix per-image values computed with different settings."""


class PartialResults:
    """Append-only JSON lines of per-image values, so an interrupted evaluation resumes without double counting.

    Line 1 is ``{"protocol": {...}}``; every other line is one batch of one quantity:
    ``{"q": "bpd_ode", "r": repeat, "i": [image indices], "v": [values], "nfe": solver evaluations}``.
    A line is written and ``fsync``-ed in one go; a torn last line (a kill mid-write) is ignored.
    """

    def __init__(self, path: Path, fingerprint: dict[str, Any], resume: bool = True):
        self.path = path
        self.values: dict[str, dict[tuple[int, int], float]] = {"bpd_ode": {}, "bpd_bound": {}, "nfe": {}}
        self.solves: list[int] = []  # NFE of every ODE solve (one per batch)
        if path.exists() and resume:
            self._read(fingerprint)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_line({"protocol": fingerprint}, mode="w")

    def _read(self, fingerprint: dict[str, Any]) -> None:
        text = self.path.read_text()
        if text and not text.endswith("\n"):  # torn by an interruption: drop the tail, that batch is recomputed
            text = text[: text.rfind("\n") + 1]
            with open(self.path, "r+") as f:
                f.truncate(len(text.encode()))
        lines = text.splitlines()
        head = json.loads(lines[0]) if lines else {}
        stored = head.get("protocol")
        if stored != json.loads(json.dumps(fingerprint)):
            diff = {k: (stored.get(k) if stored else None, v) for k, v in fingerprint.items()
                    if not stored or stored.get(k) != json.loads(json.dumps(v))}
            raise ProtocolMismatchError(
                f"{self.path} holds values of another protocol (stored vs now: {diff}). Evaluate in another "
                "directory (hydra.run.dir=...) or pass resume=false to discard them."
            )
        for line in lines[1:]:
            self._add(json.loads(line))

    def _add(self, rec: dict[str, Any]) -> None:
        store = self.values[rec["q"]]
        for i, v in zip(rec["i"], rec["v"]):
            store.setdefault((int(i), int(rec["r"])), float(v))  # first value wins: each counted once
        if rec["q"] == "bpd_ode":
            for i in rec["i"]:
                self.values["nfe"].setdefault((int(i), int(rec["r"])), float(rec["nfe"]))
            self.solves.append(int(rec["nfe"]))

    def _write_line(self, rec: dict[str, Any], mode: str = "a") -> None:
        with open(self.path, mode) as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def done(self, quantity: str, index: int, repeat: int) -> bool:
        return (index, repeat) in self.values[quantity]

    def append(self, quantity: str, repeat: int, indices: list[int], values: Tensor, nfe: int | None = None) -> None:
        rec = {"q": quantity, "r": repeat, "i": indices, "v": [float(v) for v in values.double().cpu()]}
        if nfe is not None:
            rec["nfe"] = int(nfe)
        self._write_line(rec)
        self._add(rec)

    def table(self, quantity: str, n: int, repeats: int) -> np.ndarray:
        """``[n, repeats]`` values, NaN where not computed yet."""
        out = np.full((n, repeats), np.nan)
        for (i, r), v in self.values[quantity].items():
            if i < n and r < repeats:
                out[i, r] = v
        return out


@dataclass
class LikelihoodSettings:
    ode: bool
    bound: bool
    repeats: int
    batch_size: int
    seed: int
    ode_truncation_correction: bool = False
    bound_chunk_size: int = 1024
    max_batches: int | None = None
    progress: bool = True


def _model_space(module: ScoreLitModule, k: Tensor, indices: list[int], r: int, seed: int) -> tuple[Tensor, Tensor]:
    """Dequantize and scale each image with its own generator (so its noise does not depend on the batch)."""
    ys, lqs = [], []
    with torch.no_grad():
        for j, i in enumerate(indices):
            g = seeded_generator(k.device, image_seed(seed, i, r, "dequantization"))
            y, lq = module.to_model_space(k[j : j + 1], g)
            ys.append(y)
            lqs.append(lq)
    return torch.cat(ys), torch.cat(lqs)


def ode_bpd(module: ScoreLitModule, k: Tensor, indices: list[int], r: int, s: LikelihoodSettings) -> tuple[Tensor, int]:
    """Per-image ODE bits/dim ``[B]`` of levels ``k [B, ...]`` (one solve for the batch) and the solver's NFE."""
    from scoreflow.likelihood import draw_probe, ode_log_likelihood, truncation_correction

    e, dev = module.eval_cfg, k.device
    dtype = getattr(torch, e["ode_dtype"])
    y, log_q = _model_space(module, k, indices, r, s.seed)
    y = y.to(dtype)
    score_fn = module._score_fn()
    probe = None
    if e["divergence"] != "exact":
        gens = [seeded_generator(dev, image_seed(s.seed, i, r, "probe")) for i in indices]
        probe = torch.cat([draw_probe(e["divergence"], y[j : j + 1], generator=g) for j, g in enumerate(gens)])
    corr = torch.zeros(len(indices), dtype=dtype, device=dev)
    if s.ode_truncation_correction:  # SPEC §4.4: start from x_eps ~ p_0eps(.|x) and add the decoder term
        with torch.no_grad():
            parts = [truncation_correction(score_fn, module.sde, y[j : j + 1], module.eps,
                                           generator=seeded_generator(dev, image_seed(s.seed, i, r, "ode_eps")))
                     for j, i in enumerate(indices)]
        corr, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    res = ode_log_likelihood(score_fn, module.sde, y, eps=module.eps, rtol=e["rtol"], atol=e["atol"],
                             method=e["method"], divergence=e["divergence"], probe=probe, dtype=dtype)
    return module.to_bpd(res.nll + corr, log_q.to(dtype), y[0].numel()), res.nfe


def bound_bpd(module: ScoreLitModule, k: Tensor, indices: list[int], r: int, s: LikelihoodSettings) -> Tensor:
    """Per-image bound bits/dim ``[B]`` (Theorem 3), each image with its own times and noises."""
    from scoreflow.likelihood import likelihood_bound

    e, dev = module.eval_cfg, k.device
    y, log_q = _model_space(module, k, indices, r, s.seed)
    out = []
    with torch.no_grad():
        for j, i in enumerate(indices):
            res = likelihood_bound(
                module._score_fn(), module.sde, y[j : j + 1], eps=module.eps, num_t=int(e["test_num_t"]),
                importance_sampling=e["importance_sampling"], truncation_correction=e["truncation_correction"],
                estimator=e.get("bound_estimator", "closed_form"), stratified=bool(e.get("stratified", False)),
                generator=seeded_generator(dev, image_seed(s.seed, i, r, "bound")), chunk_size=s.bound_chunk_size,
            )
            out.append(res.nll)
    return module.to_bpd(torch.cat(out), log_q, y[0].numel())


def _batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(a, min(a + batch_size, n))) for a in range(0, n, batch_size)]


def run_likelihoods(module: ScoreLitModule, dataset, n: int, store: PartialResults, s: LikelihoodSettings) -> bool:
    """Evaluate images ``0..n-1`` of ``dataset``, ``s.repeats`` times, skipping what ``store`` holds.

    Returns ``True`` when every value is there (``False`` if ``s.max_batches`` stopped it early).
    """
    quantities = [q for q, on in (("bpd_bound", s.bound), ("bpd_ode", s.ode)) if on]
    units = [(r, b) for r in range(s.repeats) for b in _batches(n, s.batch_size)]

    def pending(q: str, r: int, b: list[int]) -> list[int]:
        return [i for i in b if not store.done(q, i, r)]

    todo = [(r, b) for r, b in units if any(pending(q, r, b) for q in quantities)]
    bar = tqdm(total=len(units), initial=len(units) - len(todo), disable=not s.progress, desc="likelihood",
               unit="batch", dynamic_ncols=True)
    dev = module.device
    for done_now, (r, b) in enumerate(todo):
        if s.max_batches is not None and done_now >= s.max_batches:
            bar.close()
            return False
        for q in quantities:
            idx = pending(q, r, b)
            if not idx:
                continue
            k = torch.stack([torch.as_tensor(dataset[i][0]) for i in idx]).to(dev)
            if q == "bpd_ode":
                v, nfe = ode_bpd(module, k, idx, r, s)
                store.append(q, r, idx, v, nfe)
            else:
                store.append(q, r, idx, bound_bpd(module, k, idx, r, s))
        bar.update(1)
        bar.set_postfix({q.removeprefix("bpd_"): f"{np.nanmean(store.table(q, n, s.repeats)):.4f}" for q in quantities})
    bar.close()
    return True


def summarize(store: PartialResults, split: str, n: int, repeats: int, quantities: list[str]) -> dict[str, float]:
    """Mean and standard error over images of the per-image mean over its repeats.

    A partial evaluation averages the repeats each image has so far (images with none are left out).
    """
    out: dict[str, float] = {}
    for q in quantities:
        table = store.table(q, n, repeats)
        table = table[~np.isnan(table).all(axis=1)]
        per_image = np.nanmean(table, axis=1) if table.size else table[:, 0]
        if per_image.size == 0:
            continue
        out[f"{split}/{q}"] = float(per_image.mean())
        out[f"{split}/{q}_se"] = float(per_image.std(ddof=1) / math.sqrt(per_image.size)) if per_image.size > 1 \
            else float("nan")
        out[f"{split}/{q}_num_images"] = float(per_image.size)
    if "bpd_ode" in quantities and store.solves:
        out[f"{split}/nfe"] = float(np.mean(store.solves))
        out[f"{split}/nfe_max"] = float(np.max(store.solves))
    return out


def save_per_example(path: Path, store: PartialResults, n: int, repeats: int, quantities: list[str]) -> Path:
    """``per_example.npz``: ``index [N]`` and ``[N, repeats]`` arrays per quantity (NaN = not computed)."""
    arrays = {"index": np.arange(n)}
    for q in quantities:
        arrays[q] = store.table(q, n, repeats)
    if "bpd_ode" in quantities:
        arrays["nfe"] = store.table("nfe", n, repeats)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path
