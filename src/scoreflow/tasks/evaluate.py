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
command line). :func:`load_model` and the helpers above it are shared with :mod:`scoreflow.tasks.sample`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from scoreflow.lit.module import ScoreLitModule
from scoreflow.tasks.build import ConfigError, build_data, build_module, to_container
from scoreflow.tasks.common import module_from_checkpoint, results_table, write_metrics

log = logging.getLogger(__name__)


# ============================================================================ shared with sample.py
def ckpt_tag(ckpt_path: str | None) -> str:
    """A short, stable name for a checkpoint: ``<run>-<stem>-<hash of the absolute path>``."""
    if not ckpt_path:
        return "no-checkpoint"  # load_model then says that ckpt_path is required
    p = Path(str(ckpt_path)).expanduser().absolute()
    name = f"{p.parent.parent.name}-{p.stem}" if p.parent.name == "checkpoints" else p.stem
    return f"{name}-{hashlib.sha1(str(p).encode()).hexdigest()[:6]}"


def run_subdir(ckpt_path: str | None, override_dirname: str | None = "") -> str:
    """``<ckpt tag>/<overrides or 'default'>``: the same command writes to (and resumes in) the same folder."""
    sub = re.sub(r"[/\\]+", "_", str(override_dirname or "")).strip("_") or "default"
    return f"{ckpt_tag(ckpt_path)}/{sub}"


# conf/evaluate.yaml and conf/sample.yaml name their run directory with this (registered on import).
OmegaConf.register_new_resolver("scoreflow_run_subdir", run_subdir, replace=True)


def task_dir(cfg: DictConfig, task: str) -> Path:
    """The Hydra run directory (or ``cfg.run_dir`` / ``outputs/<task>`` when composed outside ``@hydra.main``)."""
    try:
        out = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        out = Path(cfg.get("run_dir") or f"outputs/{task}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def resolve_device(name: str | None) -> torch.device:
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available: use device=cpu or device=auto")
    return torch.device(name)


class CheckpointFormatError(ValueError):
    """A file that is not a scoreflow or score_sde_pytorch checkpoint."""


@dataclass
class LoadedModel:
    """A module rebuilt from a checkpoint, the config it was built from, its data source and provenance."""

    module: ScoreLitModule
    cfg: DictConfig
    source: Any
    info: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        i = self.info
        return f"{i['format']} checkpoint {i['path']} (step {i['step']}, {i['weights']} weights)"


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise CheckpointFormatError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise CheckpointFormatError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def detect_format(ckpt: dict[str, Any], path: Path) -> str:
    """``"scoreflow"`` (a Lightning checkpoint written by train.py) or ``"score_sde"`` (score_sde_pytorch .pth)."""
    if "state_dict" in ckpt and "scoreflow" in ckpt:
        return "scoreflow"
    if "model" in ckpt and "ema" in ckpt:
        return "score_sde"
    if "state_dict" in ckpt:
        raise CheckpointFormatError(
            f"{path} is a Lightning checkpoint without scoreflow's stored config (was it written by train.py?)"
        )
    raise CheckpointFormatError(
        f"{path} is neither a scoreflow checkpoint (keys 'state_dict', 'scoreflow') nor a score_sde_pytorch one "
        f"(keys 'model', 'ema', 'step'); it has keys {sorted(map(str, ckpt))[:10]}"
    )


def _not_null(d: DictConfig | dict | None) -> dict[str, Any]:
    return {k: v for k, v in (to_container(d) if d is not None else {}).items() if v is not None}


def load_model(cfg: DictConfig, *, device: torch.device | None = None) -> LoadedModel:
    """Rebuild the model of ``cfg.ckpt_path`` (EMA weights unless ``cfg.use_ema`` is false) on ``device``.

    scoreflow checkpoints carry their whole config; ``cfg.evaluation`` (non-null entries) overrides the stored
    ``module.evaluation`` and ``cfg.data_root`` the data folder. score_sde_pytorch checkpoints are rebuilt from
    the ``sde`` / ``model`` / ``data`` / ``dequantization`` / ``weighting`` groups of ``cfg`` and ``cfg.module``.
    """
    if cfg.get("ckpt_path") in (None, "", "???"):
        raise ConfigError("ckpt_path is required, e.g. ckpt_path=outputs/train/<run>/checkpoints/last.ckpt")
    path = Path(str(cfg.ckpt_path)).expanduser()
    use_ema = bool(cfg.get("use_ema", True))
    ckpt = _read_checkpoint(path)
    fmt = str(cfg.get("ckpt_format", "auto"))
    detected = detect_format(ckpt, path)
    if fmt not in ("auto", "scoreflow", "score_sde"):
        raise ConfigError(f"ckpt_format must be auto, scoreflow or score_sde, got {fmt!r}")
    if fmt != "auto" and fmt != detected:
        raise CheckpointFormatError(f"ckpt_format={fmt} but {path} is a {detected} checkpoint")
    eval_over = _not_null(cfg.get("evaluation"))
    if detected == "scoreflow":
        step = int(ckpt.get("global_step", 0))
        del ckpt
        if any(cfg.get(g) is not None for g in ("sde", "model", "data")):
            log.warning("sde/model/data groups are ignored for scoreflow checkpoints (they carry their config)")
        overrides: dict[str, Any] = {"module": {"evaluation": eval_over}} if eval_over else {}
        if cfg.get("data_root"):
            overrides["data"] = {"root": str(cfg.data_root)}
        module, mcfg, _ = module_from_checkpoint(path, use_ema=use_ema, overrides=overrides)
    else:
        missing = [g for g in ("sde", "model", "data") if cfg.get(g) is None]
        if missing:
            raise ConfigError(
                f"{path} is a score_sde_pytorch checkpoint, which does not record its configuration: choose "
                f"{' '.join(g + '=...' for g in missing)} on the command line (e.g. sde=vp model=ddpmpp data=cifar10)"
            )
        mcfg = OmegaConf.create({
            g: to_container(cfg[g]) for g in ("sde", "model", "data", "dequantization", "weighting")
        })
        mcfg.eps, mcfg.seed = cfg.get("eps"), int(cfg.get("seed", 0))
        mcfg.module = {**_not_null(cfg.get("module")), "evaluation": eval_over}
        centered = mcfg.model.net.get("centered", True)
        if centered is False and float(mcfg.module.get("scale", 2.0)) != 1.0:
            raise ConfigError(
                "model.net.centered=false (a score_sde_pytorch model trained on [0, 1] data) needs "
                "module.scale=1 module.shift=0"
            )
        module = build_module(mcfg)
        from scoreflow.nets.sp_checkpoint import load_score_sde_checkpoint

        step = load_score_sde_checkpoint(ckpt, module.score_model, use_ema=use_ema).step
        del ckpt
    module.eval()
    if device is not None:
        module.to(device)
    source = build_data(mcfg)
    info = {"path": str(path.absolute()), "format": detected, "step": step, "weights": "EMA" if use_ema else "raw"}
    return LoadedModel(module, mcfg, source, info)


def to_data_space(module: ScoreLitModule, y: Tensor) -> Tensor:
    """Model space ``y = scale x + shift`` -> data space ``x`` (``[0, 1]`` for images)."""
    return (y.float() - module.shift) / module.scale


def to_levels(module: ScoreLitModule, x: Tensor) -> Tensor:
    """Data-space samples ``x`` -> levels ``floor(K x)`` clipped to ``0..K-1`` (the inverse of dequantization)."""
    K = module.num_levels
    return (x * K).floor().clamp(0, K - 1).to(torch.uint8 if K <= 256 else torch.int32)


def levels_to_uint8(k: Tensor, num_levels: int) -> Tensor:
    """Levels ``0..K-1`` -> 8-bit pixels ``round(255 k / (K - 1))`` (the identity for K = 256)."""
    if num_levels == 256:
        return k.to(torch.uint8)
    return (k.double() * (255.0 / (num_levels - 1))).round().clamp(0, 255).to(torch.uint8)


# ============================================================================ per-image likelihoods
def image_seed(seed: int, index: int, repeat: int, purpose: str) -> int:
    """A 63-bit seed for one image, one repeat and one purpose (dequantization, probe, bound, ...)."""
    h = hashlib.blake2b(f"{seed}/{index}/{repeat}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


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
            y, lq = module.to_model_space(k[j : j + 1], _gen(k.device, image_seed(seed, i, r, "dequantization")))
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
        gens = [_gen(dev, image_seed(s.seed, i, r, "probe")) for i in indices]
        probe = torch.cat([draw_probe(e["divergence"], y[j : j + 1], generator=g) for j, g in enumerate(gens)])
    corr = torch.zeros(len(indices), dtype=dtype, device=dev)
    if s.ode_truncation_correction:  # SPEC §4.4: start from x_eps ~ p_0eps(.|x) and add the decoder term
        with torch.no_grad():
            parts = [truncation_correction(score_fn, module.sde, y[j : j + 1], module.eps,
                                           generator=_gen(dev, image_seed(s.seed, i, r, "ode_eps")))
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
                generator=_gen(dev, image_seed(s.seed, i, r, "bound")), chunk_size=s.bound_chunk_size,
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


# ============================================================================ FID
def make_extractor(weights: str | None, device: torch.device):
    """The TF-Inception pool3 feature extractor (``weights=None``: the first offline weights found)."""
    from scoreflow.metrics import InceptionFeatures

    return InceptionFeatures(weights).to(device)


def sampler_kwargs(sampler_cfg: DictConfig | dict) -> tuple[str, dict[str, Any]]:
    """``conf/sampler/*.yaml`` -> ``(kind, keyword arguments of ode_sample / pc_sample)``."""
    kw = dict(to_container(sampler_cfg))
    kind = kw.pop("kind", None)
    if kind not in ("ode", "pc"):
        raise ConfigError(f"sampler.kind must be 'ode' or 'pc', got {kind!r} (choose sampler=ode or sampler=pc)")
    return kind, kw


def draw_samples(module: ScoreLitModule, seeds: list[int], sampler_cfg, batch_size: int, *, progress: bool = False,
                 desc: str = "sampling", score_fn=None) -> Iterator[tuple[list[int], Tensor, int]]:
    """Yield ``(seeds, samples in data space [b, ...], nfe)`` batch by batch; sample ``i`` depends on its seed only."""
    from scoreflow.lit.callbacks import sample

    kind, kw = sampler_kwargs(sampler_cfg)
    score_fn = score_fn or module._score_fn()
    shape = tuple(module.data_shape)
    for a in tqdm(range(0, len(seeds), batch_size), disable=not progress, desc=desc, unit="batch", dynamic_ncols=True):
        sb = seeds[a : a + batch_size]
        res = sample(score_fn, module.sde, (len(sb), *shape), kind=kind, seeds=sb, device=module.device, **kw)
        yield sb, to_data_space(module, res.samples).cpu(), res.nfe


def fid_fingerprint(info: dict[str, Any], fid_cfg: DictConfig, sampler_cfg) -> dict[str, Any]:
    return {"checkpoint": info["path"], "step": info["step"], "weights": info["weights"],
            "sampler": to_container(sampler_cfg), "seed": int(fid_cfg.seed)}


def fid_samples(lm: LoadedModel, fid_cfg: DictConfig, sampler_cfg, out: Path, progress: bool) -> tuple[Tensor, float]:
    """``fid_cfg.num_samples`` uint8 samples, reusing the chunks in ``out/fid_samples`` of the same protocol."""
    module = lm.module
    folder = out / "fid_samples"
    folder.mkdir(parents=True, exist_ok=True)
    fp = fid_fingerprint(lm.info, fid_cfg, sampler_cfg)
    proto = folder / "protocol.json"
    if proto.exists() and json.loads(proto.read_text()) != json.loads(json.dumps(fp)):
        raise ProtocolMismatchError(f"{folder} holds samples of another sampler/checkpoint; remove it or change dirs")
    proto.write_text(json.dumps(fp, indent=1))
    have: dict[int, Tensor] = {}
    nfes: list[int] = []
    for f in sorted(folder.glob("chunk_*.npz")):
        with np.load(f) as z:
            have.update(zip(z["seeds"].tolist(), torch.from_numpy(z["images"])))
            nfes.append(int(z["nfe"]))
    n, base = int(fid_cfg.num_samples), int(fid_cfg.seed)
    missing = [base + i for i in range(n) if base + i not in have]
    for sb, x, nfe in draw_samples(module, missing, sampler_cfg, int(fid_cfg.batch_size), progress=progress,
                                   desc="FID samples"):
        imgs = levels_to_uint8(to_levels(module, x), module.num_levels)
        tmp = folder / f".chunk_{sb[0]:08d}.tmp.npz"
        np.savez(tmp, seeds=np.asarray(sb), images=imgs.numpy(), nfe=np.int64(nfe))
        os.replace(tmp, folder / f"chunk_{sb[0]:08d}_{len(sb)}.npz")
        have.update(zip(sb, imgs))
        nfes.append(nfe)
    images = torch.stack([have[base + i] for i in range(n)])
    return images, float(np.mean(nfes)) if nfes else float("nan")


def reference_stats(lm: LoadedModel, fid_cfg: DictConfig, extractor):
    """Inception statistics of the training split, from ``fid.ref_stats`` or the cache (computed on a miss)."""
    from scoreflow.metrics import FeatureStats, load_or_compute_ref_stats, ref_stats_path

    if fid_cfg.get("ref_stats"):
        return FeatureStats.load(Path(str(fid_cfg.ref_stats)).expanduser())
    source, K = lm.source, lm.module.num_levels
    train = source.load()["train"]
    limit = fid_cfg.get("ref_num_images")
    n = len(train) if limit is None else min(int(limit), len(train))
    data_id = hashlib.sha1(json.dumps(to_container(lm.cfg.data), sort_keys=True).encode()).hexdigest()[:8]
    name = f"{source.name}-{data_id}" + ("" if n == len(train) else f"-first{n}")
    path = ref_stats_path(Path(str(fid_cfg.cache_dir)).expanduser(), name, "train")

    def images():
        for a in range(0, n, 256):
            k = torch.stack([torch.as_tensor(train[i][0]) for i in range(a, min(a + 256, n))])
            yield levels_to_uint8(k, K)

    log.info("FID reference statistics: %s", path)
    return load_or_compute_ref_stats(path, images, extractor, batch_size=int(fid_cfg.feature_batch_size))


def run_fid(lm: LoadedModel, fid_cfg: DictConfig, sampler_cfg, out: Path, progress: bool) -> dict[str, float]:
    from scoreflow.metrics import fid_from_samples

    module = lm.module
    if module.num_levels is None or len(module.data_shape) != 3 or module.data_shape[0] not in (1, 3):
        raise ConfigError(f"FID needs image data ([1|3, H, W] levels); this model's data have shape "
                          f"{list(module.data_shape)}: set fid.num_samples=0")
    images, nfe = fid_samples(lm, fid_cfg, sampler_cfg, out, progress)
    extractor = make_extractor(fid_cfg.get("inception_weights"), module.device)
    ref = reference_stats(lm, fid_cfg, extractor)
    fid = fid_from_samples(images, ref, extractor, batch_size=int(fid_cfg.feature_batch_size))
    return {"fid": fid, "fid_nfe": nfe, "fid_num_samples": float(len(images)), "fid_ref_num_images": float(ref.n)}


# ============================================================================ the task
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
