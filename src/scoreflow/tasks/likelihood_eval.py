"""Per-image bits/dim over a split: the probability-flow ODE and the bound, resumable and batch-independent.

* The values come from :mod:`scoreflow.lit.per_image`, the function the training run's test phase uses too:
  image ``i``, repeat ``r`` draws its dequantization noise, Hutchinson probe, bound times and noises from
  generators seeded by ``(seed, i, r)`` only.
* :class:`PartialResults` appends the values to ``partial.jsonl`` (one file per process) after every batch, so
  a rerun skips what is there and refuses to mix values of a different protocol; :func:`summarize` and
  :func:`save_per_example` turn them into metrics and ``per_example.npz``.
* :func:`run_likelihoods` shards the batches over processes: batch ``j`` of the pending ones goes to rank
  ``j mod world_size``, with the batches formed as on one process, so every per-image value is identical.
* The solver check re-solves the first images at a 100x tighter tolerance (dopri5 for a fixed grid) with the
  same noise and probes: ``|value - tight value|`` is the ODE solver's own error on the reported digits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from scoreflow.likelihood.ode import FIXED_GRID_METHODS
from scoreflow.lit import per_image
from scoreflow.lit.module import ScoreLitModule
from scoreflow.lit.settings import EvalConfig
from scoreflow.tasks.validate import _ABSENT, _flat  # the flattening the config checks use


class ProtocolMismatchError(RuntimeError):
    """A rerun would mix per-image values computed with different settings."""


def partial_path(folder: Path, rank: int) -> Path:
    """The file process ``rank`` appends to: ``partial.jsonl`` for rank 0 (the one-process name, so folders of
    earlier releases resume), ``partial.rank<k>.jsonl`` for the others."""
    return folder / ("partial.jsonl" if rank == 0 else f"partial.rank{rank}.jsonl")


def partial_files(folder: Path) -> list[Path]:
    """Every partial file in ``folder``, rank 0 first, then by rank (the order in which values are merged)."""
    ranked = sorted(folder.glob("partial.rank*.jsonl"), key=lambda p: int(p.name.split(".")[1][4:] or 0))
    return [p for p in [folder / "partial.jsonl", *ranked] if p.is_file()]


def discard_partial(folder: Path) -> None:
    """Delete every partial file (``resume=false``); one process does this before the others read."""
    for p in partial_files(folder):
        p.unlink()


ODE_KEYS = ("ode", "ode_batch_size")  # the fingerprint's keys the ODE values depend on
BOUND_KEYS = ("bound",)  # ... and the bound's
LEGACY_ABSENT = ("weights_digest", "data_digest", "ode_batch_size", "sde", "model", "scale", "shift")


class PartialResults:
    """Append-only JSON lines of per-image values, so an interrupted evaluation resumes without double counting.

    Each process appends to its own file (:func:`partial_path`) and reads all of them, so a rerun with another
    number of processes skips what any process computed before. Line 1 of a file is ``{"protocol": {...}}``;
    every other line is one batch of one quantity:
    ``{"q": "bpd_ode", "r": repeat, "i": [image indices], "v": [values], "nfe": solver evaluations}``.
    A line is written and ``fsync``-ed in one go; a torn last line (a kill mid-write) is ignored.

    A rerun compares the settings of the quantities it computes (``quantities``) and those every value shares
    (checkpoint, data, seed, ...) with each file's header, so values of other settings are never mixed: a
    bound-only run does not tie the ODE's settings, nor an ODE-only run the bound's.

    Values of the bound and of a fixed-grid ODE do not depend on the batch: the first value of an
    ``(image, repeat)`` counts. An adaptive ODE solver (``batches`` given) solves a batch as one system, so its
    values count only when solved in the batch the current run forms for that image (``batches``: image,
    repeat -> its batch): after ``num_images`` was raised (the last batch was shorter) or lowered (a longer
    one), those images are solved again, and the earlier values are kept in the files but not counted.
    """

    QUANTITIES = ("bpd_ode", "bpd_bound", "bpd_ode_tight", "bpd_bound_mcse")  # the last rides on bpd_bound lines
    BATCHED = ("bpd_ode", "bpd_ode_tight", "nfe")  # their values depend on the batch under an adaptive solver

    def __init__(self, folder: Path, fingerprint: dict[str, Any], rank: int = 0, resume: bool = True,
                 quantities: tuple[str, ...] = ("bpd_ode", "bpd_bound"),
                 batches: dict[str, dict[tuple[int, int], tuple[int, ...]]] | None = None):
        self.path = partial_path(folder, rank)
        self.fingerprint = fingerprint
        self.quantities = tuple(quantities)
        self.batches = batches  # quantity -> (image, repeat) -> the batch this run solves it in; None: any batch
        # quantity -> (image, repeat) -> {batch: value}; batch () for the batch-independent quantities
        self._values: dict[str, dict[tuple[int, int], dict[tuple[int, ...], float]]] = {
            q: {} for q in (*self.QUANTITIES, "nfe")}
        self._solves: dict[tuple[int, tuple[int, ...]], int] = {}  # (repeat, batch) -> NFE of its bpd_ode solve
        self._has_header = False
        folder.mkdir(parents=True, exist_ok=True)
        if resume:
            for p in partial_files(folder):
                self._read(p, own=p == self.path)

    def _compared(self, fp: dict[str, Any]) -> dict[str, Any]:
        """The part of a fingerprint this run's values must share with the stored ones."""
        skip = (() if "bpd_ode" in self.quantities else ODE_KEYS) + (() if "bpd_bound" in self.quantities
                                                                       else BOUND_KEYS)
        return {k: v for k, v in fp.items() if k not in skip}

    def _read(self, path: Path, own: bool) -> None:
        text = path.read_text()
        if text and not text.endswith("\n"):  # torn by an interruption: drop the tail, that batch is recomputed
            text = text[: text.rfind("\n") + 1]
            if own:  # only the owner truncates: another process's file is read, never written
                with open(path, "r+") as f:
                    f.truncate(len(text.encode()))
        lines = text.splitlines()
        if not lines:  # killed before its header was complete: nothing in it
            return
        stored = json.loads(lines[0]).get("protocol")
        now = json.loads(json.dumps(self.fingerprint))
        for key in LEGACY_ABSENT:
            if isinstance(stored, dict) and key not in stored:  # an earlier release's folder: trusted as then
                now.pop(key, None)  # (checkpoint path, step, EMA or raw; the data config; any batch size)
        stored_cmp, now_cmp = self._compared(stored or {}), self._compared(now)
        if not isinstance(stored, dict) or stored_cmp != now_cmp:
            a, b = _flat(stored_cmp), _flat(now_cmp)
            diff = [f"  {k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
                    if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
            shown = diff[:6] + ([f"  ... and {len(diff) - 6} more"] if len(diff) > 6 else [])
            why = ""
            if any(d.startswith("  data_digest:") for d in diff):
                why += "\nThey were computed on other images (data_root / data.root now points at other data)."
            if any(d.startswith("  ode_batch_size:") for d in diff) and stored:
                why += (f"\nThe adaptive ODE solves a batch as one system: rerun with batch_size="
                        f"{stored.get('ode_batch_size')} to continue.")
            raise ProtocolMismatchError(
                f"{path} holds values of other settings (stored -> now):\n" + "\n".join(shown) + why +
                "\nEvaluate in another folder (hydra.run.dir=...), or pass resume=false to discard them."
            )
        self._has_header |= own
        for line in lines[1:]:
            self._add(json.loads(line))

    def _add(self, rec: dict[str, Any]) -> None:
        q, r = rec["q"], int(rec["r"])
        batch = tuple(int(i) for i in rec["i"])
        keys = [(i, r) for i in batch]
        tag = batch if q in self.BATCHED else ()
        for key, v in zip(keys, rec["v"]):
            self._values[q].setdefault(key, {}).setdefault(tag, float(v))
        for key, se in zip(keys, rec.get("se", ())):  # the bound's per-image Monte-Carlo standard errors
            self._values["bpd_bound_mcse"].setdefault(key, {}).setdefault((), float(se))
        if q == "bpd_ode":
            for key in keys:
                self._values["nfe"].setdefault(key, {}).setdefault(batch, float(rec["nfe"]))
            self._solves.setdefault((r, batch), int(rec["nfe"]))

    def value(self, quantity: str, key: tuple[int, int]) -> float | None:
        """The value of ``key`` that counts for this run (None if there is none)."""
        got = self._values[quantity].get(key)
        if not got:
            return None
        want = (self.batches or {}).get("bpd_ode" if quantity == "nfe" else quantity)
        if quantity in self.BATCHED and want is not None:
            return got.get(want.get(key, ()))
        return next(iter(got.values()))

    @property
    def solves(self) -> list[int]:
        """NFE of every ODE solve whose values count (one per batch), in the order they were first written."""
        want = (self.batches or {}).get("bpd_ode")
        if want is None:
            return list(self._solves.values())
        current = {(r, b) for (_, r), b in want.items()}
        return [nfe for rb, nfe in self._solves.items() if rb in current]

    def _write_line(self, rec: dict[str, Any]) -> None:
        if not self._has_header:  # written lazily: a file is never seen half-created by a reading process
            rec_lines = [{"protocol": self.fingerprint}, rec]
            mode, self._has_header = "w", True
        else:
            rec_lines, mode = [rec], "a"
        with open(self.path, mode) as f:
            f.write("".join(json.dumps(r) + "\n" for r in rec_lines))
            f.flush()
            os.fsync(f.fileno())

    def done(self, quantity: str, index: int, repeat: int) -> bool:
        return self.value(quantity, (index, repeat)) is not None

    def append(self, quantity: str, repeat: int, indices: list[int], values: Tensor, nfe: int | None = None,
               se: Tensor | None = None) -> None:
        rec = {"q": quantity, "r": repeat, "i": indices, "v": [float(v) for v in values.double().cpu()]}
        if nfe is not None:
            rec["nfe"] = int(nfe)
        if se is not None:
            rec["se"] = [float(v) for v in se.double().cpu()]
        self._write_line(rec)
        self._add(rec)

    def table(self, quantity: str, n: int, repeats: int) -> np.ndarray:
        """``[n, repeats]`` values, NaN where not computed yet (or computed as NaN: :meth:`computed` tells)."""
        out = np.full((n, repeats), np.nan)
        for (i, r) in self._values[quantity]:
            if i < n and r < repeats and (v := self.value(quantity, (i, r))) is not None:
                out[i, r] = v
        return out

    def computed(self, quantity: str, n: int, repeats: int) -> np.ndarray:
        """``[n, repeats]``: True where a value that counts for this run was computed."""
        out = np.zeros((n, repeats), dtype=bool)
        for (i, r) in self._values[quantity]:
            if i < n and r < repeats and self.value(quantity, (i, r)) is not None:
                out[i, r] = True
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
    solver_check_images: int = 0  # the first N images (repeat 0) re-solved by check_solver(...)


SOLVER_CHECK_TIGHTEN = 100.0


def check_solver(e: EvalConfig) -> dict[str, Any]:
    """The solver check's ODE settings for evaluation settings ``e``: the same adaptive method at ``rtol`` and
    ``atol`` / 100; for a fixed grid (no error control; its ``rtol``/``atol`` unused), dopri5 at ``rtol``, ``atol``
    / 100 (the reference's solver at a tight tolerance)."""
    from scoreflow.likelihood.ode import FIXED_GRID_METHODS

    method = "dopri5" if e.method in FIXED_GRID_METHODS else e.method
    return {"method": method, "rtol": e.rtol / SOLVER_CHECK_TIGHTEN, "atol": e.atol / SOLVER_CHECK_TIGHTEN,
            "steps": None}


def ode_bpd(module: ScoreLitModule, k: Tensor, indices: list[int], r: int, s: LikelihoodSettings,
            solver: dict[str, Any] | None = None) -> tuple[Tensor, int]:
    """Per-image ODE bits/dim ``[B]`` and the NFE of the batch's solve (:func:`scoreflow.lit.per_image.ode_bpd`)."""
    return per_image.ode_bpd(module, k, indices, r, s.seed, solver=solver,
                             ode_truncation_correction=s.ode_truncation_correction)


def bound_bpd(module: ScoreLitModule, k: Tensor, indices: list[int], r: int, s: LikelihoodSettings,
              plan=None) -> tuple[Tensor, Tensor]:
    """Per-image bound bits/dim ``[B]`` and Monte-Carlo standard errors (:func:`scoreflow.lit.per_image.bound_bpd`)."""
    return per_image.bound_bpd(module, k, indices, r, s.seed, chunk_size=s.bound_chunk_size, plan=plan,
                               return_se=True)


def _batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(a, min(a + batch_size, n))) for a in range(0, n, batch_size)]


def work_units(n: int, s: LikelihoodSettings) -> list[tuple[int, list[int], tuple[str, ...]]]:
    """Every ``(repeat, batch of image indices, quantities)`` of the evaluation, in order.

    The batches depend on ``n`` and ``s.batch_size`` only, never on the number of processes: the adaptive ODE
    solver shares its steps across a batch, so equal batches are what makes the values equal on 1 or N ranks.
    The solver check's batches (the first ``s.solver_check_images`` images, repeat 0) come last.
    """
    main = tuple(q for q, on in (("bpd_bound", s.bound), ("bpd_ode", s.ode)) if on)
    units = [(r, b, main) for r in range(s.repeats) for b in _batches(n, s.batch_size)] if main else []
    if s.ode and s.solver_check_images > 0:
        units += [(0, b, ("bpd_ode_tight",)) for b in _batches(min(s.solver_check_images, n), s.batch_size)]
    return units


def solved_whole(q: str, adaptive: bool) -> bool:
    """Whether quantity ``q``'s values depend on the batch they are solved in, which is then solved whole: the
    ODE's under an adaptive solver (``adaptive``; it shares its steps across a batch) and the solver check's (its
    solver is adaptive always); never the bound's (per-image noise, no shared steps)."""
    return q == "bpd_ode_tight" or (q == "bpd_ode" and adaptive)


def solve_batches(n: int, s: LikelihoodSettings, adaptive: bool) -> dict[str, dict[tuple[int, int], tuple[int, ...]]]:
    """``{quantity: {(image, repeat): its batch}}`` for the quantities whose values depend on the batch they were
    solved in: the ODE's under an adaptive solver (``adaptive``) and the solver check's (always adaptive), with the
    batches of :func:`work_units` (for :class:`PartialResults`)."""
    out: dict[str, dict[tuple[int, int], tuple[int, ...]]] = {}
    for r, b, quantities in work_units(n, s):
        for q in quantities:
            if solved_whole(q, adaptive):
                out.setdefault(q, {}).update({(i, r): tuple(b) for i in b})
    return out


def run_likelihoods(module: ScoreLitModule, dataset, n: int, store: PartialResults, s: LikelihoodSettings,
                    rank: int = 0, world_size: int = 1) -> bool:
    """Evaluate this process's share of images ``0..n-1`` of ``dataset``, ``s.repeats`` times, skipping what
    ``store`` holds (what any process computed before, in any earlier run).

    The pending batches are dealt out in turn: batch ``j`` goes to rank ``j mod world_size``. Every process
    must have read the same ``store`` before any appends to it (the caller's barrier), so they agree on what
    is pending. Nothing here talks to the other processes: each solves at its own pace (an adaptive solver
    takes a different number of steps per batch). Returns ``False`` if ``s.max_batches`` (per process)
    stopped it before its share was done.
    """

    def pending(q: str, r: int, b: list[int]) -> list[int]:
        return [i for i in b if not store.done(q, i, r)]

    todo = [u for u in work_units(n, s) if any(pending(q, u[0], u[1]) for q in u[2])]
    mine = todo[rank::world_size]
    shown = [q for q, on in (("bpd_bound", s.bound), ("bpd_ode", s.ode)) if on]  # running means on the bar
    bar = tqdm(total=len(mine), disable=not s.progress or rank != 0, desc="likelihood", unit="batch",
               dynamic_ncols=True)
    dev = module.device
    adaptive = module.eval_cfg.method not in FIXED_GRID_METHODS  # the check's solver is adaptive always
    plan = per_image.bound_plan(module, dataset, s.seed, limit=n) if s.bound and mine else None  # same on every rank
    try:  # closed on any exit (a signal's stop line must not land inside the bar)
        for done_now, (r, b, quantities) in enumerate(mine):
            if s.max_batches is not None and done_now >= s.max_batches:
                return False
            for q in quantities:
                idx = pending(q, r, b)
                if not idx:
                    continue
                # an adaptive solver solves a batch as one system (shared steps): the whole batch, as an
                # uninterrupted run forms it (values of another batch, from before num_images changed, do not
                # count: PartialResults)
                if solved_whole(q, adaptive):
                    idx = b
                k = torch.stack([torch.as_tensor(dataset[i][0]) for i in idx]).to(dev)
                if q == "bpd_bound":
                    v, mcse = bound_bpd(module, k, idx, r, s, plan)
                    store.append(q, r, idx, v, se=mcse)  # se: for the between-image / Monte-Carlo split
                else:
                    check = check_solver(module.eval_cfg) if q == "bpd_ode_tight" else None
                    v, nfe = ode_bpd(module, k, idx, r, s, check)
                    store.append(q, r, idx, v, nfe if q == "bpd_ode" else None)
            bar.update(1)
            bar.set_postfix({q.removeprefix("bpd_"): f"{np.nanmean(store.table(q, n, s.repeats)):.4f}"
                             for q in shown})
    finally:
        bar.close()
    return True


def is_complete(store: PartialResults, n: int, s: LikelihoodSettings) -> bool:
    """Whether every value of :func:`work_units` is in ``store``."""
    return all(store.done(q, i, r) for r, b, qs in work_units(n, s) for q in qs for i in b)


def summarize(store: PartialResults, split: str, n: int, repeats: int, quantities: list[str],
              solver_check_images: int = 0) -> dict[str, float]:
    """Mean and standard error over images of the per-image mean over its repeats, and the solver check.

    A partial evaluation averages the repeats each image has so far (images with none are left out).
    ``{split}/ode_solver_error_max`` / ``_mean`` are over the first ``solver_check_images`` images.
    """
    out: dict[str, float] = {}
    for q in quantities:
        table, computed = store.table(q, n, repeats), store.computed(q, n, repeats)
        mean, se, count = per_image.mean_se_over_images(table, computed)
        if count == 0:
            continue
        out[f"{split}/{q}"], out[f"{split}/{q}_se"], out[f"{split}/{q}_num_images"] = mean, se, float(count)
        if bad := per_image.nonfinite_images(table, computed):  # kept in the mean (a NaN was read as "not computed")
            out[f"{split}/{q}_num_nonfinite"] = float(bad)
    if "bpd_ode" in quantities and store.solves:
        out[f"{split}/nfe"] = float(np.mean(store.solves))
        out[f"{split}/nfe_max"] = float(np.max(store.solves))
    if "bpd_bound" in quantities:
        out |= mc_split(store, split, n, repeats)
    err = solver_error(store, min(n, solver_check_images))
    if "bpd_ode" in quantities and err.size:
        out[f"{split}/ode_solver_error_max"] = float(err.max())
        out[f"{split}/ode_solver_error_mean"] = float(err.mean())
        out[f"{split}/ode_solver_error_num_images"] = float(err.size)
    return out


def mc_split(store: PartialResults, split: str, n: int, repeats: int) -> dict[str, float]:
    """The bound's standard error over images split into its between-image and Monte-Carlo parts
    (:func:`scoreflow.likelihood.split_standard_error`), over the images that have every repeat's value and
    Monte-Carlo standard error. Empty if fewer than two such images."""
    from scoreflow.likelihood import split_standard_error

    v, se = store.table("bpd_bound", n, repeats), store.table("bpd_bound_mcse", n, repeats)
    ok = ~np.isnan(v).any(axis=1) & ~np.isnan(se).any(axis=1)
    if ok.sum() < 2:
        return {}
    mc_var = (se[ok] ** 2).mean(axis=1) / repeats  # of each image's mean over its repeats
    sp = split_standard_error(v[ok].mean(axis=1), mc_var=mc_var)
    return {f"{split}/bpd_bound_se_between": sp.se_between, f"{split}/bpd_bound_se_mc": sp.se_mc,
            f"{split}/bpd_bound_mc_excess": sp.mc_excess, f"{split}/bpd_bound_mc_num_images": float(sp.num_images)}


def solver_error(store: PartialResults, n_check: int) -> np.ndarray:
    """``|bpd_ode - bpd_ode_tight|`` of repeat 0 for the checked images ``< n_check`` that have both values."""
    ode, tight = store.table("bpd_ode", n_check, 1)[:, 0], store.table("bpd_ode_tight", n_check, 1)[:, 0]
    both = ~np.isnan(ode) & ~np.isnan(tight)
    return np.abs(ode[both] - tight[both])


def per_example_meta(protocol: dict[str, Any], repeats: int) -> dict[str, Any]:
    """What per-image values were measured on, stored with them (``meta`` in ``per_example.npz``) so that runs
    are paired only like with like (``bench/compare_runs.py``): ``data`` (the data config without ``root``),
    ``split``, ``seed`` (the per-image seed) and ``protocol`` (everything else a value depends on: eps,
    dequantization, ODE and bound settings, repeats; not the checkpoint). ``protocol`` is the evaluation's
    fingerprint or the ``protocol`` entry of its ``metrics.json`` (a superset), which give the same dict."""
    return {"data": protocol.get("data"), "split": protocol.get("split"), "seed": protocol.get("seed"),
            **({"data_digest": protocol["data_digest"]} if protocol.get("data_digest") else {}),
            "protocol": {**{k: protocol[k] for k in ("eps", "dequantization", "ode", "bound") if k in protocol},
                         "repeats": repeats}}


def save_per_example(path: Path, store: PartialResults, n: int, repeats: int, quantities: list[str],
                     solver_check_images: int = 0) -> Path:
    """``per_example.npz``: ``index [N]`` and ``[N, repeats]`` arrays per quantity (NaN = not computed), the
    bound's per-image Monte-Carlo standard errors ``bpd_bound_mcse [N, repeats]``, ``bpd_ode_tight [M]``:
    repeat 0 of the first ``M`` images re-solved at the 100x tighter tolerance, and ``meta``: the JSON string of
    :func:`per_example_meta` (files of earlier releases have none; readers must not require it)."""
    arrays = {"index": np.arange(n), "meta": np.asarray(json.dumps(per_example_meta(store.fingerprint, repeats)))}
    for q in quantities:
        arrays[q] = store.table(q, n, repeats)
    if "bpd_bound" in quantities:
        arrays["bpd_bound_mcse"] = store.table("bpd_bound_mcse", n, repeats)
    if "bpd_ode" in quantities:
        arrays["nfe"] = store.table("nfe", n, repeats)
        if solver_check_images > 0:
            arrays["bpd_ode_tight"] = store.table("bpd_ode_tight", min(n, solver_check_images), 1)[:, 0]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path
