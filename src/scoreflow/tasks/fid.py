"""FID of a checkpoint's samples against the Inception statistics of its training split.

Samples are written in chunks (``fid_samples/``) and reused by a rerun of the same protocol; the reference
statistics are computed once and cached. :func:`sampler_kwargs` and :func:`draw_samples` (seeded, batch-independent
sampling) are shared with :mod:`scoreflow.tasks.sample`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from scoreflow.lit.module import ScoreLitModule
from scoreflow.tasks.build import ConfigError, build_data, to_container
from scoreflow.tasks.checkpoint import LoadedModel, levels_to_uint8, to_data_space, to_levels
from scoreflow.tasks.likelihood_eval import ProtocolMismatchError

log = logging.getLogger(__name__)


def make_extractor(weights: str | None, device: torch.device):
    """The TF-Inception pool3 feature extractor (``weights=None``: the first offline weights found)."""
    from scoreflow.metrics import InceptionFeatures

    return InceptionFeatures(weights).to(device)


def sampler_kwargs(sampler_cfg: DictConfig | dict) -> tuple[str, dict[str, Any]]:
    """``conf/sampler/*.yaml`` -> ``(kind, keyword arguments of that sampler)``; an unknown kind is a ConfigError."""
    from scoreflow.sampling import sampler_options

    try:
        return sampler_options(to_container(sampler_cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def draw_samples(module: ScoreLitModule, seeds: list[int], sampler_cfg, batch_size: int, *, progress: bool = False,
                 desc: str = "sampling", score_fn=None) -> Iterator[tuple[list[int], Tensor, int]]:
    """Yield ``(seeds, samples in data space [b, ...], nfe)`` batch by batch; sample ``i`` depends on its seed only."""
    from scoreflow.sampling import sample

    kind, kw = sampler_kwargs(sampler_cfg)
    score_fn = score_fn or module._score_fn()
    shape = tuple(module.data_shape)
    starts = range(0, len(seeds), batch_size)
    steps = bool(progress) and on_terminal()  # the sampler's per-step bar, as the other bars: on a terminal only
    bar = progress and len(starts) > 1  # one batch: its per-step bar says it all
    for a in tqdm(starts, disable=not bar, desc=desc, unit="batch", dynamic_ncols=True):
        sb = seeds[a : a + batch_size]
        res = sample(score_fn, module.sde, (len(sb), *shape), kind=kind, seeds=sb, device=module.device,
                     progress=steps, **kw)
        yield sb, to_data_space(module, res.samples).cpu(), res.nfe


def on_terminal() -> bool:
    """Progress bars redraw in place on a terminal only (in a log file every redraw would be a line)."""
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def fid_fingerprint(info: dict[str, Any], fid_cfg: DictConfig, sampler_cfg, levels: str = "bins"
                    ) -> dict[str, Any]:
    """What the stored samples depend on; ``levels="round"``: the samples of a model trained on levels, mapped back
    by rounding (:func:`~scoreflow.tasks.checkpoint.to_levels`; absent, as in earlier releases, for binning)."""
    fp = {"checkpoint": info["path"], "step": info["step"], "weights": info["weights"],
          "weights_digest": info.get("weights_digest"), "sampler": to_container(sampler_cfg),
          "seed": int(fid_cfg.seed)}
    return fp if levels == "bins" else {**fp, "levels": levels}


def fid_samples(lm: LoadedModel, fid_cfg: DictConfig, sampler_cfg, out: Path, progress: bool) -> tuple[Tensor, float]:
    """``fid_cfg.num_samples`` uint8 samples, reusing the chunks in ``out/fid_samples`` of the same protocol."""
    module = lm.module
    folder = out / "fid_samples"
    folder.mkdir(parents=True, exist_ok=True)
    fp = fid_fingerprint(lm.info, fid_cfg, sampler_cfg,
                         "round" if getattr(module, "train_input", "dequantized") == "levels" else "bins")
    proto = folder / "protocol.json"
    stored = json.loads(proto.read_text()) if proto.exists() else None
    now = json.loads(json.dumps(fp))
    if isinstance(stored, dict) and "weights_digest" not in stored:  # an earlier release's samples: trusted as then
        now.pop("weights_digest", None)
    if isinstance(stored, dict) and isinstance(stored.get("sampler"), dict) and isinstance(now.get("sampler"), dict):
        # sampler keys added since those samples were drawn, left null: the same samples, but for sampler.variance
        # of the ancestral predictor, whose null (auto) changed VP/subVP's noise on 2026-11-28
        for key in [k for k, v in now["sampler"].items() if v is None and k not in stored["sampler"]]:
            if not (key == "variance" and now["sampler"].get("predictor") == "ancestral"):
                now["sampler"].pop(key)
    if stored is not None and stored != now:
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


def reference_stats(lm: LoadedModel, fid_cfg: DictConfig, extractor, progress: bool = False):
    """Inception statistics of the training split, from ``fid.ref_stats`` or the cache (computed on a miss). The
    split is the whole of it: the images a run held out of training for its validation bound (``data.val_size``)
    are training images too, and FID's reference is every one of them (CIFAR-10: all 50000, as ScoreFlow and every
    published FID), whatever the hold-out of the run that made the checkpoint. Not where the test split is carved
    from the same pool (``data.test_size``: digits, mnist5k): there the run's own training split is the reference,
    as in earlier releases (whose FID numbers it keeps)."""
    from scoreflow.metrics import FeatureStats, load_or_compute_ref_stats, ref_stats_path

    if fid_cfg.get("ref_stats"):
        return FeatureStats.load(Path(str(fid_cfg.ref_stats)).expanduser())
    source, K, data_cfg = lm.source, lm.module.num_levels, lm.cfg.data
    if int(data_cfg.get("val_size") or 0) > 0 and not int(data_cfg.get("test_size") or 0):
        data_cfg = OmegaConf.merge(data_cfg, {"val_size": 0})
        source = build_data(OmegaConf.create({"data": data_cfg}))
    train = source.load()["train"]
    limit = fid_cfg.get("ref_num_images")
    n = len(train) if limit is None else min(int(limit), len(train))
    # the images themselves name the cache, not only their config: an image folder's files replaced or added
    # under the same root get their own statistics (about 0.5 s for CIFAR-10's 50000 training images)
    data_id = hashlib.sha1((json.dumps(to_container(data_cfg), sort_keys=True) + train.digest()).encode()).hexdigest()
    name = f"{source.name}-{data_id[:12]}" + ("" if n == len(train) else f"-first{n}")
    path = ref_stats_path(Path(str(fid_cfg.cache_dir)).expanduser(), name, "train")

    def images():
        with tqdm(total=n, disable=not progress, desc="FID reference", unit="img", dynamic_ncols=True) as bar:
            for a in range(0, n, 256):
                k = torch.stack([torch.as_tensor(train[i][0]) for i in range(a, min(a + 256, n))])
                yield levels_to_uint8(k, K)
                bar.update(len(k))  # after the consumer's features of this block

    log.info("FID reference statistics: %s", path)
    return load_or_compute_ref_stats(path, images, extractor, batch_size=int(fid_cfg.feature_batch_size),
                                     num_images=n)


def run_fid(lm: LoadedModel, fid_cfg: DictConfig, sampler_cfg, out: Path, progress: bool) -> dict[str, float]:
    from scoreflow.metrics import fid_from_samples

    module = lm.module
    if module.num_levels is None or len(module.data_shape) != 3 or module.data_shape[0] not in (1, 3):
        raise ConfigError(f"FID needs image data ([1|3, H, W] levels); this model's data have shape "
                          f"{list(module.data_shape)}: set fid.num_samples=0")
    # the network and the reference first: a missing weights or ref_stats file is reported before hours of sampling
    extractor = make_extractor(fid_cfg.get("inception_weights"), module.device)
    ref = reference_stats(lm, fid_cfg, extractor, progress)
    images, nfe = fid_samples(lm, fid_cfg, sampler_cfg, out, progress)
    fid = fid_from_samples(images, ref, extractor, batch_size=int(fid_cfg.feature_batch_size))
    return {"fid": fid, "fid_nfe": nfe, "fid_num_samples": float(len(images)), "fid_ref_num_images": float(ref.n)}
