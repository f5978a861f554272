"""``sample(cfg)``: draw from a checkpoint, or use it for latents, inpainting, colorization, class guidance.

Modes (``mode=``):

* ``sample``: ``num_samples`` unconditional samples, sample ``i`` from seed ``seed + i`` alone (any batch size);
* ``latent``: encode data images to ``x_T`` with the probability-flow ODE, decode them back (round-trip
  error reported) and decode a spherical interpolation between two codes (Song et al. 2021, App. D.4);
* ``inpaint``: fill in the unknown pixels of data images (``mask=center|half|random|<png>``; App. I.2);
* ``colorize``: RGB images whose grey level is that of data images (App. I.3; needs 3-channel data);
* ``conditional``: class-conditional samples with a time-dependent classifier (``classifier_ckpt``,
  ``guidance_scale``; App. I.1), loaded by ``scoreflow.tasks.checkpoint.load_classifier``.

Everything goes to the run directory: PNG grids, ``.npz`` arrays, optionally one PNG per sample
(``save_pngs=true``, e.g. for external FID tools), ``metrics.json``; a short table is printed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from scoreflow.lit.module import ScoreLitModule
from scoreflow.tasks.build import ConfigError, to_container
from scoreflow.tasks.checkpoint import (
    LoadedModel,
    levels_to_uint8,
    load_model,
    resolve_device,
    task_dir,
    to_data_space,
    to_levels,
)
from scoreflow.tasks.common import write_metrics
from scoreflow.tasks.console import echo
from scoreflow.tasks.fid import draw_samples, sampler_kwargs
from scoreflow.tasks.validate import class_labels
from scoreflow.visualize import levels_to_unit, save_image_grid, save_scatter

log = logging.getLogger(__name__)

Result = tuple[dict[str, float], dict[str, Path]]


# ----------------------------------------------------------------------------- pictures and arrays
def is_image(module: ScoreLitModule) -> bool:
    return len(module.data_shape) == 3


def display(module: ScoreLitModule, x: Tensor) -> Tensor:
    """Data-space ``x`` -> ``[0, 1]`` for viewing: quantized to the K levels (clamped for continuous data)."""
    return levels_to_unit(x.float().cpu(), module.num_levels)


def to_uint8_images(module: ScoreLitModule, x: Tensor) -> Tensor:
    """Data-space images -> 8-bit pixels (levels mapped to 0..255), what external FID tools read."""
    if module.num_levels is None:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return levels_to_uint8(to_levels(module, x), module.num_levels)


def save_pngs(module: ScoreLitModule, x: Tensor, folder: Path, names: list[int]) -> Path:
    """One PNG per image, ``folder/<name:06d>.png`` (grey for 1 channel, RGB for 3)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    imgs = to_uint8_images(module, x).permute(0, 2, 3, 1).numpy()
    for name, img in zip(names, imgs):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{name:06d}.png")
    return folder


def save_batch(module: ScoreLitModule, x: Tensor, path: Path, *, nrow: int | None = None, max_images: int = 0,
               title: str = "") -> Path:
    """A PNG grid of images (or a scatter plot of 2-D points)."""
    if max_images:
        x = x[:max_images]
    if is_image(module):
        return save_image_grid(display(module, x), path, nrow=nrow)
    return save_scatter(x.reshape(x.shape[0], -1), path, title=title)


def save_arrays(module: ScoreLitModule, path: Path, **arrays: Tensor | np.ndarray) -> Path:
    """``.npz`` of float32 data-space arrays; for discrete data also the integer ``<name>_levels``."""
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        if isinstance(a, Tensor) and a.is_floating_point():
            out[name] = a.float().cpu().numpy()
            if module.num_levels is not None and a.shape[1:] == tuple(module.data_shape):
                out[f"{name}_levels"] = to_levels(module, a.float().cpu()).numpy()
        else:
            out[name] = np.asarray(a.cpu() if isinstance(a, Tensor) else a)
    np.savez(path, **out)
    return path


# ----------------------------------------------------------------------------- data images
def data_images(lm: LoadedModel, cfg: DictConfig) -> tuple[Tensor, Tensor]:
    """Images of ``split`` as ``(x in data space, y in model space)``, bin centres: the first ``num_images``, or
    those at ``image_indices`` when given."""
    module = lm.module
    ds = lm.source.load()[str(cfg.split)]
    indices = cfg.get("image_indices")
    if indices is None:
        indices = range(min(int(cfg.num_images), len(ds)))
    indices = [int(i) for i in indices]
    if not indices:
        raise ConfigError(f"the {cfg.split} split has no images")
    bad = [i for i in indices if not 0 <= i < len(ds)]
    if bad:
        shown = bad[:5] + (["..."] if len(bad) > 5 else [])
        raise ConfigError(f"image_indices {shown} out of range: the {cfg.split} split has {len(ds)} images",
                          key="image_indices", fix=f"indices from 0 to {len(ds) - 1}")
    k = torch.stack([torch.as_tensor(ds[i][0]) for i in indices])
    x = (k.float() + 0.5) / module.num_levels if module.num_levels is not None else k.float()
    return x, (module.scale * x + module.shift).to(module.device)


def make_mask(spec: str, shape: tuple[int, ...], seed: int = 0) -> Tensor:
    """``center`` | ``half`` (right half unknown) | ``random`` (half the pixels) | a PNG path (white = known)."""
    from scoreflow.sampling import center_mask, half_mask, mask_from_png, random_mask

    H, W = shape[-2], shape[-1]
    named: dict[str, Callable[[], Tensor]] = {
        "center": lambda: center_mask((H, W)),
        "half": lambda: half_mask((H, W)),
        "random": lambda: random_mask((H, W), seed=seed),
    }
    if spec in named:
        return named[spec]()
    path = Path(str(spec)).expanduser()
    if not path.is_file():
        raise ConfigError(f"mask must be center, half, random or a PNG file; {spec!r} is none of these")
    return mask_from_png(path, (H, W))


def _pc_kwargs(cfg: DictConfig, mode: str) -> dict[str, Any]:
    kind, kw = sampler_kwargs(cfg.sampler)
    if kind != "pc":
        raise ConfigError(f"mode={mode} runs a predictor-corrector sampler with the known part clamped: use sampler=pc")
    return kw


def _seeds(cfg: DictConfig, n: int, start: int = 0) -> list[int]:
    return [int(cfg.seed) + i for i in range(start, start + n)]


# ----------------------------------------------------------------------------- modes
def run_sample(lm: LoadedModel, cfg: DictConfig, out: Path) -> Result:
    module = lm.module
    seeds = _seeds(cfg, int(cfg.num_samples))
    xs, nfes = [], []
    for _, x, nfe in draw_samples(module, seeds, cfg.sampler, int(cfg.batch_size), progress=bool(cfg.progress)):
        xs.append(x)
        nfes.append(nfe)
    x = torch.cat(xs)
    paths = {"grid": save_batch(module, x, out / "samples.png", max_images=int(cfg.grid_size), title="samples"),
             "arrays": save_arrays(module, out / "samples.npz", samples=x, seeds=np.asarray(seeds))}
    if cfg.save_pngs and is_image(module):
        paths["pngs"] = save_pngs(module, x, out / "pngs", list(range(len(seeds))))
    return {"nfe": float(np.mean(nfes)), "num_samples": float(len(x))}, paths


def run_latent(lm: LoadedModel, cfg: DictConfig, out: Path) -> Result:
    from scoreflow.sampling import decode, interpolate, round_trip

    module, lat = lm.module, cfg.latent
    x, y = data_images(lm, cfg)
    kw = dict(eps=lat.get("eps"), method=lat.method, rtol=float(lat.rtol), atol=float(lat.atol), steps=lat.get("steps"))
    dtype = getattr(torch, str(lat.get("dtype", "float32")))
    score_fn = module._score_fn()
    rt = round_trip(score_fn, module.sde, y.to(dtype), **kw)
    x_rec = to_data_space(module, rt.x_rec).cpu()
    err = rt.max_abs_error.double().cpu() / module.scale  # in data units ([0, 1] for images)
    metrics = {"roundtrip_max_abs_error": float(err.max()), "roundtrip_mean_max_abs_error": float(err.mean()),
               "roundtrip_rel_error": float(rt.rel_error.double().mean()), "nfe_encode": float(rt.nfe_encode),
               "nfe_decode": float(rt.nfe_decode), "num_images": float(len(x))}
    paths = {"roundtrip": save_batch(module, torch.cat([x, x_rec]), out / "latent_roundtrip.png", nrow=len(x),
                                     title="data / reconstruction")}
    arrays: dict[str, Any] = {"x": x, "x_rec": x_rec, "z": rt.z.float().cpu(), "max_abs_error": err.float()}
    if len(x) >= 2:
        a, b = (int(i) for i in lat.pair)
        if not (0 <= a < len(x) and 0 <= b < len(x)):  # validate.sample refuses these before the run starts
            raise ConfigError(f"latent.pair={[a, b]} must index the {len(x)} encoded images (0 .. {len(x) - 1})",
                              key="latent.pair", value=[a, b], fix=f"'latent.pair=[0,{len(x) - 1}]'")
        zs = interpolate(rt.z[a], rt.z[b], int(lat.interp_steps))
        xi = to_data_space(module, decode(score_fn, module.sde, zs, **kw)).cpu()
        paths["interpolation"] = save_batch(module, xi, out / "interpolation.png", nrow=len(xi), title="interpolation")
        arrays["interpolation"] = xi
    paths["arrays"] = save_arrays(module, out / "latent.npz", **arrays)
    return metrics, paths


def _known_rows(lm: LoadedModel, cfg: DictConfig, out: Path, name: str, condition: Callable) -> Result:
    """Shared by inpaint and colorize: ``condition(y_batch, seeds) -> (shown input, result, nfe)`` per batch."""
    module = lm.module
    x, y = data_images(lm, cfg)
    bs, shown, results, nfes = int(cfg.batch_size), [], [], []
    for a in range(0, len(y), bs):
        s, r, nfe = condition(y[a : a + bs], _seeds(cfg, len(y[a : a + bs]), a))
        shown.append(s.cpu())
        results.append(to_data_space(module, r).cpu())
        nfes.append(nfe)
    shown_x, result = torch.cat(shown), torch.cat(results)
    grid = torch.cat([x, shown_x, result])  # rows: input, what the sampler sees, result
    paths = {"grid": save_batch(module, grid, out / f"{name}.png", nrow=len(x)),
             "arrays": save_arrays(module, out / f"{name}.npz", input=x, conditioning=shown_x, result=result)}
    return {"nfe": float(np.mean(nfes)), "num_images": float(len(x))}, paths


def run_inpaint(lm: LoadedModel, cfg: DictConfig, out: Path) -> Result:
    from scoreflow.sampling import inpaint

    module = lm.module
    if not is_image(module):
        shape = list(module.data_shape)
        raise ConfigError(f"mode=inpaint needs image data [C, H, W]; the model's data have shape {shape}")
    kw = _pc_kwargs(cfg, "inpaint")
    mask = make_mask(str(cfg.mask), module.data_shape, int(cfg.seed)).to(module.device)
    errors: list[float] = []
    held: list[float] = []

    def condition(y: Tensor, seeds: list[int]):
        res = inpaint(module._score_fn(), module.sde, y, mask, seeds=seeds, **kw)
        errors.append(float(((res.samples - y).abs() * mask).max()) / module.scale)
        held.append(float(res.known_error) / module.scale)
        masked = to_data_space(module, y) * mask + 0.5 * (1 - mask)  # unknown pixels shown grey
        return masked, res.samples, res.nfe

    metrics, paths = _known_rows(lm, cfg, out, "inpaint", condition)
    np.save(out / "inpaint_mask.npy", mask.cpu().numpy())
    # known_pixel_max_error: the result against the input (put back after the last step: rounding only);
    # known_pixel_sampler_error: the sampler's own last state against the input, before that
    metrics |= {"known_pixel_max_error": max(errors), "known_pixel_sampler_error": max(held),
                "known_fraction": float(mask.mean())}
    return metrics, paths


def run_colorize(lm: LoadedModel, cfg: DictConfig, out: Path) -> Result:
    from scoreflow.sampling import colorize

    module = lm.module
    shape = list(module.data_shape)
    if len(shape) != 3 or shape[0] != 3:
        raise ConfigError(
            f"mode=colorize needs RGB data (3 channels); this checkpoint's data ({lm.source.name}) have shape {shape}. "
            "Colorization imputes the two colour channels orthogonal to the grey level, which 1-channel data lack."
        )
    kw = _pc_kwargs(cfg, "colorize")
    errors: list[float] = []
    held: list[float] = []

    def condition(y: Tensor, seeds: list[int]):
        gray = y.mean(dim=1, keepdim=True)
        res = colorize(module._score_fn(), module.sde, gray, seeds=seeds, **kw)
        errors.append(float((res.samples.mean(dim=1, keepdim=True) - gray).abs().max()) / module.scale)
        held.append(float(res.known_error) / module.scale)
        return to_data_space(module, gray).expand(-1, 3, -1, -1), res.samples, res.nfe

    metrics, paths = _known_rows(lm, cfg, out, "colorize", condition)
    return metrics | {"gray_max_error": max(errors), "gray_sampler_error": max(held)}, paths


def load_classifier_from(path: str, module: ScoreLitModule):
    """The classifier of ``path`` (``scoreflow.tasks.checkpoint.load_classifier``): ``classifier(x, t) -> logits``.

    The score model's SDE, data scaling and shape are passed, so that a classifier trained for another SDE or
    scaling is refused instead of giving silently wrong gradients.
    """
    from scoreflow.tasks.checkpoint import load_classifier  # looked up at call time (tests replace it)

    if not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"classifier checkpoint not found: {path}")
    clf = load_classifier(str(Path(path).expanduser()), device=module.device, sde=module.sde, scale=module.scale,
                          shift=module.shift, data_shape=tuple(module.data_shape) or None,
                          train_input=module.train_input)
    if isinstance(clf, torch.nn.Module):
        clf = clf.to(module.device).eval()
    return clf


def sampler_end_time(module: ScoreLitModule, sampler_cfg: Any) -> float | None:
    """The last time the configured sampler evaluates the (guided) score at: its ``eps``, else the SDE's default."""
    _, kw = sampler_kwargs(sampler_cfg)  # checked before the run (a bad one ends there, with its own message)
    eps = kw.get("eps")
    return float(module.sde.default_sample_eps if eps is None else eps)


def run_conditional(lm: LoadedModel, cfg: DictConfig, out: Path) -> Result:
    from scoreflow.sampling import classifier_guided_score

    module = lm.module
    if not cfg.get("classifier_ckpt"):
        raise ConfigError("mode=conditional needs classifier_ckpt=<path of a time-dependent classifier>")
    clf = load_classifier_from(str(cfg.classifier_ckpt), module)
    train_eps, end = getattr(clf, "train_eps", None), sampler_end_time(module, cfg.sampler)
    if train_eps is not None and end is not None and end < float(train_eps):
        log.warning("the classifier was trained on t >= %g; the sampler goes down to t = %g, where its gradients "
                    "are extrapolated (train it with eps=%g, or sample with sampler.eps=%g)", train_eps, end,
                    end, train_eps)
    num_classes = int(getattr(clf, "num_classes", 0) or getattr(lm.source, "num_classes", 0) or 0)
    labels = class_labels(cfg.get("labels"), int(cfg.num_samples), num_classes)
    seeds = _seeds(cfg, len(labels))
    xs, nfes, clf_nfes = [], [], []
    bs = int(cfg.batch_size)
    calls = [0]

    def counted(x: Tensor, t: Tensor) -> Tensor:  # each call is one classifier gradient (forward + backward)
        calls[0] += 1
        return clf(x, t)

    for a in range(0, len(seeds), bs):
        y = torch.tensor(labels[a : a + bs], device=module.device)
        score_fn = classifier_guided_score(module._score_fn(), counted, y, float(cfg.guidance_scale))
        for _, x, nfe in draw_samples(module, seeds[a : a + bs], cfg.sampler, bs, score_fn=score_fn,
                                      progress=bool(cfg.progress)):
            xs.append(x)
            nfes.append(nfe)
            clf_nfes.append(calls[0])
            calls[0] = 0
    x = torch.cat(xs)
    nrow = max(1, min(len(set(labels)), 16))
    paths = {"grid": save_batch(module, x, out / "conditional.png", nrow=nrow, max_images=int(cfg.grid_size)),
             "arrays": save_arrays(module, out / "conditional.npz", samples=x, labels=np.asarray(labels),
                                   seeds=np.asarray(seeds))}
    if cfg.save_pngs and is_image(module):
        paths["pngs"] = save_pngs(module, x, out / "pngs", list(range(len(seeds))))
    # nfe: score-model evaluations per sample; classifier_nfe: classifier gradients (forward + backward) per sample,
    # one per guided score evaluation, each about as costly as a score-model call
    metrics = {"nfe": float(np.mean(nfes)), "classifier_nfe": float(np.mean(clf_nfes)), "num_samples": float(len(x)),
               "guidance_scale": float(cfg.guidance_scale)}
    return metrics, paths


MODES: dict[str, Callable[[LoadedModel, DictConfig, Path], Result]] = {
    "sample": run_sample,
    "latent": run_latent,
    "inpaint": run_inpaint,
    "colorize": run_colorize,
    "conditional": run_conditional,
}


# ----------------------------------------------------------------------------- the task
def sampler_text(cfg: DictConfig) -> str:
    from scoreflow.sampling import describe_sampler, ode_text

    if cfg.mode == "latent":  # the probability-flow ODE both ways, set by cfg.latent
        return f"{ode_text(to_container(cfg.latent))}, encode + decode"
    kind, options = sampler_kwargs(cfg.sampler)
    if kind == "pc":
        return pc_text(options)
    return describe_sampler(kind, options)


def pc_text(o: dict[str, Any]) -> str:
    """A PC sampler in one line: λ of the lambda family, and corrector settings only where a corrector runs."""
    pred = o.get("predictor") or "none"
    if o.get("lam") is not None:
        pred += f" (λ={float(o['lam']):g})"
    corr = o.get("corrector") or "none"
    if corr != "none" and int(o.get("n_steps") or 0) > 0:
        corr += f" (snr={o.get('snr')}, n_steps={o.get('n_steps')})"
    elif corr != "none":
        corr += " (n_steps=0: off)"
    return f"PC {pred} + {corr}, steps={o.get('steps') or 'N'}, denoise={o.get('denoise')}"


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.mode`` on ``cfg.ckpt_path``; write outputs and ``metrics.json`` to the run directory."""
    t0 = time.time()
    mode = str(cfg.get("mode", "sample"))
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    out = task_dir(cfg, "sample")
    device = resolve_device(cfg.get("device"))
    lm = load_model(cfg, device=device)
    echo(f"[scoreflow] {mode}: {lm.describe()} on {device}; outputs in {out}")
    with torch.no_grad():
        result, paths = MODES[mode](lm, cfg, out)
    elapsed = time.time() - t0
    metrics: dict[str, Any] = {f"{mode}/{k}": v for k, v in result.items()}
    metrics |= {f"{mode}/time_s": elapsed, "sampler": sampler_text(cfg), "checkpoint": lm.info,
                "outputs": {k: str(v) for k, v in paths.items()}}
    write_metrics(out / "metrics.json", metrics)
    echo(format_table(mode, result, paths, cfg, elapsed))  # console and run log
    return metrics


def format_table(mode: str, result: dict[str, float], paths: dict[str, Path], cfg: DictConfig, elapsed: float) -> str:
    rows = [("mode", mode), ("sampler", sampler_text(cfg))]
    for k, v in result.items():
        unit = " (data units: [0, 1] for images)" if k.endswith("_error") and k != "roundtrip_rel_error" else ""
        rows.append((k.replace("_", " "), (f"{v:.0f}" if float(v).is_integer() else f"{v:.4g}") + unit))
    rows.append(("time", f"{elapsed:.1f} s"))
    rows += [(f"output ({k})", str(p)) for k, p in paths.items()]
    w = max(len(a) for a, _ in rows)
    return "\n".join([f"== {mode} ==", *(f"  {a:<{w}}  {b}" for a, b in rows)])
