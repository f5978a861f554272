"""Cheap checks of a composed config, run before any network, Trainer or data loader is built.

Each check names the key, its value and the fix (:class:`scoreflow.tasks.errors.ConfigError`). Only values
are read here: no Lightning import, torch only to open a checkpoint (and, for a score_sde_pytorch ``.pth``, to
build the requested network on the ``meta`` device: names and shapes, no weights), and a data source is
instantiated only when its ``root`` does not exist (for the source's own message: where it looked, the layout, the
URL).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from scoreflow.tasks.errors import WANDB_FIX, CheckpointError, ConfigError, DataError

_ABSENT = object()


def get(cfg: DictConfig, key: str, default: Any = _ABSENT) -> Any:
    """``cfg[key]`` for a dotted key (resolved); ``default`` when the key is absent."""
    return OmegaConf.select(cfg, key, default=None if default is _ABSENT else default)


def has(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT


def integer(cfg: DictConfig, key: str, *, low: int | None = None, allow_none: bool = False,
            also: Iterable[int] = (), fix: str | None = None) -> None:
    """``key`` must be an int ``>= low`` (or one of ``also``, or null with ``allow_none``)."""
    if not has(cfg, key):
        return
    v = get(cfg, key)
    if v is None and allow_none:
        return
    ok = isinstance(v, int) and not isinstance(v, bool) and (v in also or low is None or v >= low)
    if not ok:
        want = "an integer" + (f" >= {low}" if low is not None else "")
        want += "".join(f" or {a}" for a in also) + (" or null" if allow_none else "")
        raise ConfigError(f"{key} must be {want}, got {v!r}", key=key, value=v, fix=fix or f"set {key}=<{want}>")


def number(cfg: DictConfig, key: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = True, high_open: bool = True, allow_none: bool = False, fix: str | None = None) -> None:
    """``key`` must be a finite number in the interval (``low``, ``high``) (open ends unless told)."""
    if not has(cfg, key):
        return
    v = get(cfg, key)
    if v is None and allow_none:
        return
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        want = "a finite number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")
        raise ConfigError(f"{key} must be {want}, got {v!r}", key=key, value=v, fix=fix or f"set {key}=<{want}>")


def did_you_mean(key: str, value: Any, options: Iterable[str]) -> str | None:
    """``did you mean key=<the closest option>?`` for a misspelt name, or None when no option is close."""
    import difflib

    close = difflib.get_close_matches(str(value), list(options), n=1, cutoff=0.6)
    return f"did you mean {key}={close[0]}?" if close else None


def choice(cfg: DictConfig, key: str, options: Iterable[str], *, allow_none: bool = False) -> None:
    """``key`` must be one of ``options`` (or null with ``allow_none``: it keeps a stored or default value)."""
    if not has(cfg, key):
        return
    v, options = get(cfg, key), list(options)
    if v is None and allow_none:
        return
    if v not in options:
        raise ConfigError(f"{key} must be one of {', '.join(options)}; got {v!r}", key=key, value=v,
                          fix=did_you_mean(key, v, options) or f"set {key}={options[0]}")


def devices(cfg: DictConfig, key: str = "trainer.devices", accelerator_key: str = "trainer.accelerator") -> None:
    """Lightning's ``devices``: a positive int, -1, ``auto``, a list of ids or a string of them."""
    if not has(cfg, key):
        return
    v = get(cfg, key)
    if isinstance(v, bool):
        ok = False
    elif isinstance(v, int):
        ok = v >= 1 or v == -1
    elif isinstance(v, str):
        ok = v == "auto" or all(p.strip().lstrip("-").isdigit() for p in v.split(",") if p.strip())
    else:
        ok = OmegaConf.is_list(v) and len(v) > 0 and all(isinstance(i, int) and i >= 0 for i in v)
    if not ok:
        raise ConfigError(f"{key} must be a number of devices >= 1, -1 (all), auto or a list of ids; got {v!r}",
                          key=key, value=v, fix=f"set {key}=1")
    acc = get(cfg, accelerator_key)
    if acc in ("gpu", "cuda") and not cuda_available():
        several = str(get(cfg, "trainer.strategy") or "").startswith("ddp")  # trainer=ddp: gloo processes on a CPU
        fix = ("use trainer=ddp_cpu (DDP over CPU processes)" if several else "use trainer=cpu") + \
            " (or trainer.accelerator=auto)" if accelerator_key == "trainer.accelerator" else \
            f"{accelerator_key}=cpu (or {accelerator_key}=auto)"
        raise ConfigError(f"{accelerator_key}={acc} but no CUDA device is available", key=accelerator_key,
                          value=acc, fix=fix)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def precision(cfg: DictConfig, key: str = "trainer.precision") -> None:
    """fp16 (``16-mixed``, ``16-true``, ``16``) is refused: its loss scaling would hide from the clip and the NaN
    guard of the manual optimization, and fp16 weights would reach the float32/float64 likelihood."""
    if has(cfg, key) and str(get(cfg, key)).startswith("16"):
        raise ConfigError("fp16 is not supported: it needs loss scaling, under which the gradient clip and the NaN "
                          "guard would see scaled gradients, and fp16 weights would reach the float32/float64 "
                          "likelihood", key=key, value=get(cfg, key),
                          fix="trainer.precision=bf16-mixed (Ampere or newer GPUs) or 32-true")


def data_root(cfg: DictConfig, key: str = "data.root", data_key: str = "data") -> None:
    """A data source with a ``root`` that does not exist or cannot be read fails here, with its own message."""
    root = get(cfg, key)
    if not root:
        embedded_source(cfg, data_key)
        return
    path = Path(str(root)).expanduser()
    import os

    if path.exists() and os.access(path, os.R_OK):
        return
    if path.exists():
        raise DataError(f"{path} is not readable", key=key, value=str(root), fix="fix its permissions")
    message = f"{path} does not exist"
    try:
        import hydra

        source = hydra.utils.instantiate(get(cfg, data_key), _convert_="all")
        source.load()
    except Exception as e:  # noqa: BLE001 - the source's own message says where it looked and what it expects
        _raise_if_keyed(e)
        message = str(e)
    raise DataError(message, key=key, value=str(root), fix=f"point {key}= at the data, or set SCOREFLOW_DATA_DIR")


def embedded_source(cfg: DictConfig, data_key: str = "data") -> None:
    """A data source read from no folder (digits, mnist5k, photos, toy2d) is built here: its constructor checks
    ``data.shape`` and ``data.num_levels`` against the data, which failed after the run folder existed."""
    spec = get(cfg, data_key)
    if not isinstance(spec, DictConfig) or not spec.get("_target_"):
        return
    import hydra

    try:
        hydra.utils.instantiate(spec, _convert_="all")
    except Exception as e:  # noqa: BLE001 - only an error that names its key is reported here; the run reports others
        _raise_if_keyed(e)


def _raise_if_keyed(e: BaseException) -> None:
    """A data source's error that names its own config key and fix (``data.shape``, ``data.num_levels``; through
    Hydra's ``InstantiationException`` when its constructor raised it) as the usage error of that key."""
    cause = e.__cause__ if type(e).__name__ == "InstantiationException" and e.__cause__ is not None else e
    if getattr(cause, "config_key", None):
        raise ConfigError(str(cause), key=cause.config_key, fix=getattr(cause, "fix", None)) from None


def no_adam_settings_beside(optim: Any, target: Any) -> None:
    """A ``module.optimizer`` (``target``) replaces the built-in Adam: refuse Adam's own settings in ``optim``
    (``module.optim``, a mapping or None) beside it, naming both."""
    from scoreflow.lit.settings import OptimConfig, adam_only_settings

    if isinstance(optim, DictConfig):
        optim = OmegaConf.to_container(optim, resolve=True)
    adam_only = adam_only_settings(OptimConfig.from_mapping(optim))
    if adam_only:
        raise ConfigError(f"module.optim {adam_only} configure the built-in Adam, but module.optimizer={target} "
                          "replaces it: set them on module.optimizer", key="module.optimizer", value=str(target),
                          fix=f"drop module.optim.{adam_only[0]}, or add it to module.optimizer")


def common_training(cfg: DictConfig, *, check_data_root: bool = True) -> None:
    """Types and ranges shared by train, train_dequant and train_classifier (``check_data_root=False``: the caller
    checks ``data.root`` itself, after what decides whether the data are wanted at all). Any ``val_subset`` and
    ``test_subset`` works on any number of processes: a rank left without an image runs a padding batch."""
    integer(cfg, "seed")
    for k in ("datamodule.batch_size", "datamodule.eval_batch_size"):
        integer(cfg, k, low=1)
    integer(cfg, "datamodule.val_subset", low=0, allow_none=True)
    integer(cfg, "datamodule.test_subset", low=1, allow_none=True)
    integer(cfg, "datamodule.num_workers", low=0)
    number(cfg, "module.optim.lr", low=0, fix="a learning rate such as module.optim.lr=2e-4")
    number(cfg, "module.optim.eps", low=0)
    number(cfg, "module.optim.weight_decay", low=0, low_open=False)
    integer(cfg, "module.optim.warmup_steps", low=0)
    integer(cfg, "module.optim.accumulate_grad_batches", low=1)
    number(cfg, "module.optim.grad_clip", low=0, low_open=False, allow_none=True)
    spec = get(cfg, "module.optimizer")
    if spec is not None:  # here, before a run folder exists (build calls it again for library callers)
        target = spec.get("_target_") if isinstance(spec, DictConfig) else spec
        no_adam_settings_beside(get(cfg, "module.optim"), target)
    if has(cfg, "module.optim.betas"):
        b = get(cfg, "module.optim.betas")
        ok = OmegaConf.is_list(b) and len(b) == 2 and all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b)
        if not ok:
            raise ConfigError(f"module.optim.betas must be two numbers in [0, 1), got {b!r}", key="module.optim.betas",
                              value=b, fix="module.optim.betas=[0.9,0.999]")
    integer(cfg, "trainer.max_steps", low=1, also=(-1,),
            fix="set trainer.max_steps=<number of steps> (-1 stops at trainer.max_epochs, which Lightning caps at "
                "1000 when unset: add trainer.max_epochs=-1 for no limit)")
    integer(cfg, "trainer.max_epochs", low=1, also=(-1,), allow_none=True)
    integer(cfg, "trainer.log_every_n_steps", low=1)
    integer(cfg, "trainer.num_nodes", low=1)
    for k in ("val_every", "checkpoint_every"):
        integer(cfg, k, low=1)
    integer(cfg, "sample_every", low=0)
    if has(cfg, "data.shape"):
        s = get(cfg, "data.shape")
        if not (OmegaConf.is_list(s) and len(s) > 0 and all(isinstance(i, int) and i > 0 for i in s)):
            raise ConfigError(f"data.shape must be a list of positive integers, got {s!r}", key="data.shape", value=s,
                              fix="e.g. data.shape=[3,32,32]")
    for k in ("data.val_size", "data.test_size"):  # hold-outs: a negative one failed inside the loader
        integer(cfg, k, low=0, fix=f"{k}=<images held out, >= 0>")
    if check_data_root:  # before the hardware: the data are needed on any machine (a Table-2 preset on a laptop
        data_root(cfg)    # said "no CUDA device", then, once on the CPU, "CIFAR-10 not found"; audit)
    devices(cfg)
    precision(cfg)
    wandb_login(cfg)


WANDB_HOST = "api.wandb.ai"


def wandb_login(cfg: DictConfig, key: str = "logger") -> None:
    """A configured ``WandbLogger`` needs credentials, unless it logs offline: refuse before anything is written
    (wandb itself would fail only after the run folder exists). Reads the environment and ``~/.netrc`` only."""
    import os

    loggers = get(cfg, key)
    if not isinstance(loggers, DictConfig):
        return
    wandb = [(name, lg) for name, lg in loggers.items()
             if isinstance(lg, DictConfig) and "WandbLogger" in str(lg.get("_target_", ""))]
    if not wandb or all(bool(lg.get("offline", False)) for _, lg in wandb):
        return
    if os.environ.get("WANDB_MODE", "").strip().lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY", "").strip():
        return
    from urllib.parse import urlparse

    base = os.environ.get("WANDB_BASE_URL", "").strip()
    host = (urlparse(base).hostname if "://" in base else base.split("/")[0]) if base else WANDB_HOST
    if _netrc_has(host or WANDB_HOST):
        return
    raise ConfigError(f"{key}.{wandb[0][0]} logs to W&B ({host}), but no W&B API key is configured: no "
                      f"WANDB_API_KEY, no ~/.netrc entry for {host}, and WANDB_MODE is not offline",
                      key=f"{key}.{wandb[0][0]}", fix=WANDB_FIX)


def _netrc_has(host: str) -> bool:
    import netrc
    import os

    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    if not path.is_file():
        return False
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return True  # unreadable here: let wandb decide (its own error is classified as a usage error too)
    return bool(auth and auth[2])


def train(cfg: DictConfig) -> None:
    """Everything ``train.py`` can check before building anything; also the resume checkpoint."""
    common_training(cfg)
    time_label_fits(cfg)
    eps = get(cfg, "eps")
    if eps is not None:
        T = float(get(cfg, "sde.T", 1.0) or 1.0)
        number(cfg, "eps", low=0, high=T, fix=f"eps in (0, T={T:g}); null for the SDE's default")
    number(cfg, "weighting.truncation", low=0, high=float(get(cfg, "sde.T", 1.0) or 1.0), allow_none=True,
           fix="weighting.truncation=1e-3 (Huang et al. 2021), or null (eps)")
    boolean(cfg, "weighting.normalize")
    ev = "module.evaluation."
    for k in ("val_num_t", "test_num_t", "test_repeats"):
        integer(cfg, ev + k, low=1)
    for k in ("nll_every", "nll_subset"):
        integer(cfg, ev + k, low=0)
    tolerances(cfg, "module.evaluation")
    evaluation_values(cfg, ev)
    choice(cfg, "module.loss", ("dsm", "ism"))
    if get(cfg, "module.loss", "dsm") == "ism" and get(cfg, "module.compile", False):
        raise ConfigError("module.loss=ism cannot be combined with module.compile: the Hutchinson divergence's "
                          "double backward is not supported by torch.compile", key="module.compile",
                          value=get(cfg, "module.compile"), fix="module.compile=false, or module.loss=dsm")
    choice(cfg, "module.train_input", ("dequantized", "levels"))
    if get(cfg, "module.train_input", "dequantized") == "levels":
        target = str(get(cfg, "dequantization._target_", "") or "")
        if not target.endswith("UniformDequantizer"):
            deq = target.rsplit(".", 1)[-1] or "none"
            raise ConfigError(f"module.train_input=levels (k/(K-1) without noise, ScoreFlow's training input) does "
                              f"not fit dequantization={deq}: it needs discrete data evaluated with uniform noise",
                              key="module.train_input", value="levels",
                              fix="dequantization=uniform, or module.train_input=dequantized")
    integer(cfg, "module.max_bad_steps", low=1)
    number(cfg, "callbacks.ema.decay", low=0, high=1, low_open=False)
    integer(cfg, "callbacks.samples.num_samples", low=1)
    grid = get(cfg, "callbacks.samples")
    if isinstance(grid, DictConfig) and grid.get("_target_") and grid.get("sampler") is not None:
        sampler(cfg, "callbacks.samples.sampler")  # drawn hundreds of steps in: its settings checked now
    variational_dequantizer(cfg, get(cfg, "data.shape"))
    if get(cfg, "ckpt_path"):
        resume(cfg)
    evaluation_names(cfg, "module.evaluation.")  # last: it imports torch, which the checks above do not need


def evaluation_values(cfg: DictConfig, prefix: str, base: dict[str, Any] | None = None) -> None:
    """The likelihood settings that otherwise fail inside the first evaluation (after training, or after the model
    is rebuilt): a fixed-grid ODE solver without ``steps``, an odd number of bound times with antithetic pairs, a
    plan fitted on no images. The settings in effect are ``cfg``'s keys under ``prefix`` over ``base`` (the
    checkpoint's, for evaluate.py's overrides; null keeps them)."""
    from scoreflow.likelihood.ode import FIXED_GRID_METHODS

    base = base or {}

    def now(key: str) -> Any:
        v = get(cfg, prefix + key)
        return base.get(key) if v is None else v

    integer(cfg, prefix + "steps", low=1, allow_none=True)
    integer(cfg, prefix + "bound_plan_images", low=1, allow_none=True)
    method, steps = now("method"), now("steps")
    if method in FIXED_GRID_METHODS and steps is None:
        raise ConfigError(f"{prefix}method={method} is a fixed-step ODE solver: it needs {prefix}steps",
                          key=prefix + "steps", value=None,
                          fix=f"{prefix}steps=100 (steps on its grid), or an adaptive solver: {prefix}method=dopri5")
    from scoreflow.likelihood.bound import BOUND_ESTIMATORS

    plan, estimator, sampled = now("bound_plan"), now("bound_estimator"), now("importance_sampling")
    known = estimator is None or estimator in BOUND_ESTIMATORS  # a misspelt one: evaluation_names' "did you mean"
    if plan == "fit" and known and (estimator not in (None, "closed_form") or sampled is False):
        # the fitted plan (control variate, time density, baseline) is the closed-form estimator's under importance
        # sampling: this mix trained to the end, then died in the test phase with a ValueError traceback (audit)
        what = f"{prefix}bound_estimator={estimator}" if estimator not in (None, "closed_form") else \
            f"{prefix}importance_sampling=false"
        raise ConfigError(f"{prefix}bound_plan=fit fits its plan for the closed-form bound estimator "
                          f"under importance sampling; it cannot go with {what}", key=prefix + "bound_plan",
                          value=plan, fix=f"{prefix}bound_plan=none with {what}, or leave {what.split('=')[0]} at "
                                          "its default")
    if now("bound_antithetic") is True:
        for key in ("val_num_t", "test_num_t"):
            n = now(key)
            if isinstance(n, int) and not isinstance(n, bool) and n % 2:
                raise ConfigError(f"{prefix}{key}={n} is odd, but the bound draws its times in antithetic pairs "
                                  f"({prefix}bound_antithetic=true)", key=prefix + key, value=n,
                                  fix=f"{prefix}{key}={n + 1}, or {prefix}bound_antithetic=false")


def evaluation_names(cfg: DictConfig, prefix: str) -> None:
    """The likelihood settings that are names (ODE solver, divergence estimator, ODE dtype, bound estimator and
    plan), from the modules that define them: a misspelt one would otherwise fail at the first validation."""
    from scoreflow.likelihood.bound import BOUND_ESTIMATORS
    from scoreflow.likelihood.divergence import DIVERGENCES
    from scoreflow.likelihood.ode import ODE_DTYPES, UNEQUAL_STEP_UNSAFE, ode_methods

    if (method := get(cfg, prefix + "method")) in UNEQUAL_STEP_UNSAFE:
        raise ConfigError(f"{prefix}method={method}: torchdiffeq's Adams methods weight their steps as if equal, and "
                          "the likelihood's grid is not (short steps near eps): they diverge there",
                          key=prefix + "method", value=method,
                          fix=f"{prefix}method=dopri5 (adaptive, the reference's) or {prefix}method=rk4 "
                              f"{prefix}steps=100")
    for key, names in (("method", ode_methods()), ("divergence", DIVERGENCES), ("ode_dtype", ODE_DTYPES),
                       ("bound_estimator", BOUND_ESTIMATORS), ("bound_plan", ("none", "fit"))):
        choice(cfg, prefix + key, sorted(names), allow_none=True)


IDENTITY_GROUPS = ("sde", "model", "data", "dequantization")
ADDED_SINCE_RELEASES = {"model._target_": "scoreflow.nets.ScoreModel"}  # identity keys configs gained later


def read_checkpoint(path_value: Any, key: str = "ckpt_path") -> dict[str, Any]:
    """Open a checkpoint as ``torch.load(weights_only=True)`` would, with a one-line reason when it cannot."""
    if path_value in (None, "", "???"):
        raise CheckpointError(f"{key} is required", key=key,
                              fix=f"{key}=outputs/train/<run>/checkpoints/last.ckpt")
    path = Path(str(path_value)).expanduser()
    if path.is_dir():
        found = sorted(path.glob("**/*.ckpt"), key=lambda p: (len(p.parts), str(p)))
        hint = [p for p in found if p.name == "last.ckpt"][:1] or sorted(found)[:1]
        raise CheckpointError(f"{path} is a folder, not a checkpoint file", key=key, value=str(path_value),
                              fix=f"{key}={hint[0]}" if hint else f"{key}=<run>/checkpoints/last.ckpt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}", key=key, value=str(path_value),
                              fix="give the path of a .ckpt file (e.g. <run>/checkpoints/last.ckpt)")
    import torch

    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) torch file
    except Exception as e:  # noqa: BLE001 - anything torch cannot open is "not a checkpoint"
        with open(path, "rb") as f:
            head = f.read(64)
        what = "a text file" if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not a torch file"
        if head.startswith(b"PK\x03\x04"):  # torch's zip format, cut short (a full disk, an interrupted copy)
            why = str(e).split(". ")[0].splitlines()[0][:120] if str(e) else ""
            raise CheckpointError(f"{path} is a truncated or corrupt PyTorch checkpoint (torch.load: "
                                  f"{type(e).__name__}: {why})", key=key, value=str(path_value),
                                  fix="copy it again, or give another checkpoint (e.g. one of checkpoints/snapshots/)"
                                  ) from e
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({what}; torch.load: {type(e).__name__})",
                              key=key, value=str(path_value),
                              fix="give a .ckpt written by train.py (or a score_sde_pytorch .pth)") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint", key=key, value=str(path_value))
    return ckpt


def checkpoint_kind(ckpt: dict[str, Any]) -> str:
    """``score`` (train.py), ``classifier`` (train_classifier.py), ``score_sde`` (.pth) or ``unknown``."""
    meta = ckpt.get("scoreflow")
    if isinstance(meta, dict) and "state_dict" in ckpt:
        return str(meta.get("kind") or "score")
    if "model" in ckpt and "ema" in ckpt:
        return "score_sde"
    return "unknown"


def a_kind(kind: str) -> str:
    """``a score`` / ``an unknown``: the kind of :func:`checkpoint_kind` with its article."""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


CHECKPOINTS_ACCEPTED = ("a .ckpt written by train.py (<run>/checkpoints/last.ckpt), or a score_sde_pytorch .pth "
                        "(keys model, ema, step) with sde=... model=... data=...")


def not_a_score_model(ckpt: dict[str, Any], key: str, value: Any) -> CheckpointError:
    """The error for a ``key`` checkpoint that holds no score model: its kind (and, when unknown, its keys)."""
    kind = checkpoint_kind(ckpt)
    what = f"{key} is {a_kind(kind)} checkpoint, not a score model"
    if kind == "unknown":
        keys = sorted(map(str, ckpt))
        what += f" (its keys: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''})"
    elif kind == "classifier":
        what += " (a classifier guides sampling: mode=conditional classifier_ckpt=...)"
    return CheckpointError(what, key=key, value=value, fix=f"give {CHECKPOINTS_ACCEPTED}")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def config_differences(stored: dict[str, Any], requested: dict[str, Any],
                       groups: Iterable[str] = IDENTITY_GROUPS, ignore: Iterable[str] = ("data.root",)) -> list[str]:
    """``key: stored -> requested`` for every leaf of ``groups`` that differs (``ignore``: may change). Where a
    ``_target_`` differs (another class), its sibling keys are counted on that line instead of listed."""
    a = _flat({g: stored.get(g) for g in groups})
    for key, value in ADDED_SINCE_RELEASES.items():  # a config written before the key existed meant its value
        if key.split(".", 1)[0] in groups and stored.get(key.split(".", 1)[0]) is not None:
            a.setdefault(key, value)
    b = _flat({g: requested.get(g) for g in groups})
    skip = set(ignore)
    keys = [k for k in sorted(set(a) | set(b)) if k not in skip and a.get(k, _ABSENT) != b.get(k, _ABSENT)]
    classes = [k[: -len("_target_")] for k in keys if k.endswith("._target_")]
    out = []
    for k in keys:
        owner = next((c for c in classes if k.startswith(c)), None)
        if owner is not None and not k.endswith("._target_"):
            continue
        line = f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        if owner is not None:
            n = sum(1 for j in keys if j.startswith(owner) and j != k)
            line += f" (and {n} other key{'s' * (n != 1)} of {owner.rstrip('.')})" if n else ""
        out.append(line)
    return out


def resume(cfg: DictConfig) -> None:
    """``ckpt_path`` must be a train.py checkpoint of the same SDE, model, data and dequantization."""
    ckpt = read_checkpoint(get(cfg, "ckpt_path"))
    kind = checkpoint_kind(ckpt)
    if kind != "score":
        raise CheckpointError(f"ckpt_path is {a_kind(kind)} checkpoint; train.py resumes only its own (score model) "
                              "checkpoints", key="ckpt_path", value=get(cfg, "ckpt_path"),
                              fix="give <run>/checkpoints/last.ckpt of a train.py run")
    stored = ckpt["scoreflow"].get("config") or {}
    if isinstance(stored.get("dequant_run"), dict):  # its state holds a flow train.py's module has no place for
        raise CheckpointError("ckpt_path is a train_dequant.py checkpoint (a dequantization flow trained after a score "
                              "model); train.py resumes only its own checkpoints", key="ckpt_path",
                              value=get(cfg, "ckpt_path"),
                              fix="resume it with python train_dequant.py ckpt_path=..., or give train.py the score "
                                  "model's own checkpoint (its score_ckpt)")
    requested = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [g for g in IDENTITY_GROUPS if g in cfg]),
                                       resolve=True)
    diff = config_differences(stored, requested)
    if diff and not get(cfg, "resume_allow_changes", False):
        shown = diff[:6] + ([f"... and {len(diff) - 6} more"] if len(diff) > 6 else [])
        raise CheckpointError(
            "the checkpoint was trained with another sde/model/data/dequantization (stored -> requested):\n  "
            + "\n  ".join(shown), key="ckpt_path", value=get(cfg, "ckpt_path"),
            fix="resume with the checkpoint's settings, or add resume_allow_changes=true to resume anyway")


def evaluate(cfg: DictConfig) -> None:
    """``evaluate.py``: the checkpoint and every count before the model is rebuilt."""
    ckpt = read_checkpoint(get(cfg, "ckpt_path"))
    kind = checkpoint_kind(ckpt)
    if kind not in ("score", "score_sde"):
        raise not_a_score_model(ckpt, "ckpt_path", get(cfg, "ckpt_path"))
    if kind == "score_sde":
        score_sde_fits(cfg, ckpt)
    choice(cfg, "split", ("test", "val", "train"))
    if get(cfg, "num_images") != "all":
        integer(cfg, "num_images", low=0, allow_none=True, fix="num_images=<N>, all, or null (the test phase's)")
    if get(cfg, "num_images") == 0 and (get(cfg, "ode", True) or get(cfg, "bound", True)):  # found after the run
        # folder was made and the data read, otherwise
        raise ConfigError("num_images=0 leaves no image for the likelihoods (ode / bound are on)", key="num_images",
                          value=0, fix="num_images=<N> or all; for FID alone: ode=false bound=false "
                                       "fid.num_samples=<N>")
    for k in ("repeats", "batch_size", "max_batches"):
        integer(cfg, k, low=1, allow_none=True)
    integer(cfg, "bound_chunk_size", low=1)
    tolerances(cfg, "evaluation")  # overrides of the checkpoint's evaluation settings; null keeps them
    number(cfg, "evaluation.eps", low=0, allow_none=True)
    integer(cfg, "evaluation.test_num_t", low=1, allow_none=True)
    integer(cfg, "seed", allow_none=True, fix="seed=<an integer> (the per-image seed), or null (the checkpoint's)")
    for k in ("ode", "bound", "ode_truncation_correction", "progress", "resume"):
        boolean(cfg, k)
    stored_eval = ((_stored_config(ckpt, cfg).get("module") or {}).get("evaluation") or {})
    evaluation_values(cfg, "evaluation.", {k: v for k, v in stored_eval.items() if k != "val_num_t"})
    integer(cfg, "fid.num_samples", low=0)
    if get(cfg, "fid.num_samples") == 1:  # found after the likelihoods and the sampling otherwise
        raise ConfigError("fid.num_samples=1: FID needs at least 2 samples (their covariance)", key="fid.num_samples",
                          value=1, fix="fid.num_samples=50000 (the papers'), or 0 for no FID")
    if (get(cfg, "fid.num_samples") or 0) > 0 and get(cfg, "fid.ref_stats"):
        ref = Path(str(get(cfg, "fid.ref_stats"))).expanduser()
        if not ref.is_file():
            raise ConfigError(f"fid.ref_stats={ref}: no such file", key="fid.ref_stats", value=str(ref),
                              fix="the .npz an earlier evaluate.py wrote under fid.cache_dir, or fid.ref_stats=null "
                                  "(computed from the training split and cached)")
    if (get(cfg, "fid.num_samples") or 0) > 0:  # found after the likelihoods otherwise (hours, for Table 2)
        from scoreflow.metrics.inception import resolve_inception_weights

        resolve_inception_weights(get(cfg, "fid.inception_weights", None) or None)
    integer(cfg, "fid.batch_size", low=1)
    _device(cfg)
    choice(cfg, "accelerator", ("auto", "cpu", "gpu", "cuda"))
    devices(cfg, "devices", accelerator_key="accelerator")
    integer(cfg, "num_nodes", low=1)
    device = str(get(cfg, "device") or "auto")
    several = get(cfg, "devices") not in (1, "1", None) or get(cfg, "num_nodes") not in (1, None) or \
        str(get(cfg, "accelerator") or "auto") != "auto"
    if device != "auto" and several:
        raise ConfigError(f"device={device} names one device, but accelerator/devices/num_nodes ask for processes",
                          key="device", value=device,
                          fix="leave device=auto and use accelerator=... devices=N num_nodes=M, or drop those three")
    if (get(cfg, "fid.num_samples") or 0) > 0:
        sampler(cfg)
    evaluation_names(cfg, "evaluation.")
    if get(cfg, "data_root"):
        data_root_exists(cfg, _stored_config(ckpt, cfg).get("data"))


def sample(cfg: DictConfig) -> None:
    """``sample.py``: the checkpoint(s) and every count before the model is rebuilt."""
    ckpt = read_checkpoint(get(cfg, "ckpt_path"))
    if checkpoint_kind(ckpt) not in ("score", "score_sde"):
        raise not_a_score_model(ckpt, "ckpt_path", get(cfg, "ckpt_path"))
    if checkpoint_kind(ckpt) == "score_sde":
        score_sde_fits(cfg, ckpt)
    mode = get(cfg, "mode")
    choice(cfg, "mode", ("sample", "latent", "inpaint", "colorize", "conditional"))
    if mode in ("sample", "conditional"):
        integer(cfg, "num_samples", low=1, fix="num_samples=64")
    else:
        integer(cfg, "num_images", low=1)
    integer(cfg, "batch_size", low=1)
    integer(cfg, "grid_size", low=0)
    integer(cfg, "sampler.steps", low=1, allow_none=True)
    choice(cfg, "split", ("test", "val", "train"))
    _device(cfg)
    if mode != "latent":
        sampler(cfg)
    _sampler_fits_mode(cfg, mode)
    stored = _stored_config(ckpt, cfg)
    shape = (stored.get("data") or {}).get("shape")
    if mode in ("latent", "inpaint", "colorize"):
        _image_selection(cfg)
    if mode == "latent":
        _latent_pair(cfg)
        end_time(cfg, "latent.eps")
        _ode_sampler(cfg, "latent")
        tolerances(cfg, "latent")
    if mode in ("inpaint", "colorize") and isinstance(shape, list) and len(shape) != 3:
        raise ConfigError(f"mode={mode} needs image data [C, H, W]; this checkpoint's data have shape {shape}",
                          key="mode", value=mode, fix="mode=sample or mode=latent")
    if mode == "inpaint":
        _mask(cfg)
    if mode == "colorize" and isinstance(shape, list) and len(shape) == 3 and shape[0] != 3:
        raise ConfigError(f"mode=colorize needs RGB data (3 channels); this checkpoint's data have shape {shape}: "
                          "colorization imputes the two colour channels orthogonal to the grey level",
                          key="mode", value=mode,
                          fix="use a checkpoint trained on RGB data (data=photos, embedded, or cifar10, imagenet32)")
    if mode == "conditional":
        number(cfg, "guidance_scale", low=0, low_open=False, fix="guidance_scale=1 (the exact conditional score; "
                                                                 ">1 sharpens, 0 ignores the classifier)")
        labels = get(cfg, "labels", None)
        labels = OmegaConf.to_container(labels) if OmegaConf.is_list(labels) else labels
        if labels is not None:
            class_labels(labels, 1, 0)  # integers; their range once the classifier's classes are known
        if not get(cfg, "classifier_ckpt"):
            raise ConfigError("mode=conditional needs a classifier", key="classifier_ckpt",
                              fix="classifier_ckpt=outputs/train_classifier/<run>/checkpoints/last.ckpt")
        clf = read_checkpoint(get(cfg, "classifier_ckpt"), "classifier_ckpt")
        kind = checkpoint_kind(clf)
        if kind != "classifier":
            raise CheckpointError(f"classifier_ckpt is {a_kind(kind)} checkpoint, not a classifier",
                                  key="classifier_ckpt", value=get(cfg, "classifier_ckpt"),
                                  fix="train one with train_classifier.py")
        clf_config = clf["scoreflow"].get("config") or {}
        _classifier_fits(cfg, stored, clf_config)
        if labels is not None:  # against the classifier's classes: labels=[12] failed after the run folder existed
            class_labels(labels, 1, int(clf_config.get("num_classes") or 0))
    if get(cfg, "data_root"):
        data_root_exists(cfg, stored.get("data"))


def class_labels(spec: Any, n: int, num_classes: int) -> list[int]:
    """``null``: sample ``i`` gets class ``i % num_classes``; an int: that class; a list: cycled."""
    if spec is None:
        if num_classes < 1:
            raise ConfigError("labels=null needs the number of classes; pass labels=<class> or labels=[...]")
        return [i % num_classes for i in range(n)]
    values = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or (num_classes >= 1 and
                                                                                  not 0 <= v < num_classes)]
    if bad or not values:
        within = f"0 .. {num_classes - 1} (the classifier's {num_classes} classes)" if num_classes >= 1 else \
            "(integers)"
        raise ConfigError(f"labels must be class indices {within}; got {spec!r}", key="labels", value=str(spec),
                          fix="labels=null (sample i gets class i % num_classes), labels=<class> or 'labels=[0,3]'")
    return [int(values[i % len(values)]) for i in range(n)]


def time_label_fits(cfg: DictConfig) -> None:
    """``model.net.embedding_type`` and ``model.time_label`` that do not fit (999 t through Fourier features of
    std 16, log sigma through sinusoidal features) are refused naming both (``ScoreModel`` refuses them too)."""
    from scoreflow.nets.score_model import INCOMPATIBLE_LABELS

    emb, label = get(cfg, "model.net.embedding_type", None), get(cfg, "model.time_label", None)
    if (emb, label) in INCOMPATIBLE_LABELS:
        right = "log_sigma" if emb == "fourier" else "t999"
        why = ("Fourier features (std 16) of 999 t are noise" if emb == "fourier"
               else "log sigma barely moves sinusoidal features")
        raise ConfigError(f"model.net.embedding_type={emb} does not fit model.time_label={label}: {why}",
                          key="model.time_label", value=label,
                          fix=f"model.time_label={right}, or model.net.embedding_type="
                              f"{'positional' if emb == 'fourier' else 'fourier'}")


def sp_score_settings(cfg: DictConfig, embedding: str | None) -> dict[str, str]:
    """The ``model.parametrization`` / ``model.time_label`` that compute score_sde_pytorch's score for the chosen
    SDE (its ``models/utils.get_score_fn``, continuous): VP and subVP ``-net(x, 999 t) / sigma_t``; VE with Fourier
    features ``net(x, sigma_t)`` (log sigma_t inside the net) divided by sigma_t (``scale_by_sigma``, every VE
    config of theirs). Empty when the SDE or embedding is not one of these."""
    target = str(get(cfg, "sde._target_", "") or "")
    if target.endswith(("VPSDE", "SubVPSDE")) and embedding in (None, "positional"):
        return {"parametrization": "eps", "time_label": "t999"}
    if target.endswith("VESDE") and embedding == "fourier":
        return {"parametrization": "score_over_sigma", "time_label": "log_sigma"}
    return {}


def sp_score_function(cfg: DictConfig) -> None:
    """A ``.pth`` whose architecture loads can still compute another score than its authors' (e.g. their VP NCSN++
    under ``model=ncsnpp``: log sigma fed to a net trained on 999 t, score = +net/sigma instead of -net/sigma)."""
    want = sp_score_settings(cfg, get(cfg, "model.net.embedding_type", None))
    now = {k: get(cfg, f"model.{k}", None) for k in want}
    wrong = [k for k in want if now[k] != want[k]]
    if wrong:
        sde = str(get(cfg, "sde._target_")).rsplit(".", 1)[-1]
        raise ConfigError(f"{get(cfg, 'ckpt_path')}: score_sde_pytorch computes its {sde} score with "
                          f"{', '.join(f'{k}={want[k]}' for k in want)}; the model chosen has "
                          f"{', '.join(f'{k}={now[k]}' for k in wrong)}", key=f"model.{wrong[0]}", value=now[wrong[0]],
                          fix=" ".join(f"model.{k}={want[k]}" for k in wrong))


SP_NET_KEYS = ("embedding_type", "nf", "ch_mult", "num_res_blocks", "attn_resolutions", "progressive_input", "fir",
               "progressive", "conditional")  # model.net settings a score_sde_pytorch state dict shows


def score_sde_fits(cfg: DictConfig, ckpt: dict[str, Any]) -> None:
    """A score_sde_pytorch ``.pth`` records no config: ``sde``/``model``/``data`` come from the command line, and the
    network ``model`` builds must have exactly the checkpoint's keys and shapes. Built on the ``meta`` device (no
    memory, no weights): a wrong ``model=`` is refused here, on one screen, naming the model that fits."""
    path = get(cfg, "ckpt_path")
    missing = [g for g in ("sde", "model", "data") if get(cfg, g) is None]
    if missing:
        raise ConfigError(f"{path} is a score_sde_pytorch checkpoint, which does not record its configuration: "
                          f"choose {' '.join(g + '=...' for g in missing)} on the command line", key=missing[0],
                          fix="e.g. sde=vp model=ddpmpp data=cifar10 (VP/subVP) or sde=ve model=ncsnpp (VE)")
    from scoreflow.nets.sp_checkpoint import CheckpointMismatchError, check_score_sde_checkpoint

    target = str(get(cfg, "model.net._target_") or get(cfg, "model._target_") or "?")
    if not target.endswith("NCSNpp"):
        arch = _sp_arch(ckpt)
        raise CheckpointError(f"{path} is a score_sde_pytorch checkpoint, which loads into NCSN++ / DDPM++ "
                              f"(scoreflow.nets.ncsnpp.NCSNpp) only; the model chosen builds "
                              f"{target.rsplit('.', 1)[-1]}"
                              f"\n  the checkpoint holds: {_describe_arch(arch, cfg)}", key="model", value=target,
                              fix=sp_model_fix(cfg, ckpt, arch)[0])
    if not ckpt.get("model"):  # no tensors, no architecture to compare: loading it lists the missing keys
        return
    net = _meta_net(OmegaConf.to_container(get(cfg, "model.net"), resolve=True), get(cfg, "data.shape"))
    if net is None:  # cannot be built for these data: build_module says why, with the model and the data
        return
    try:
        check_score_sde_checkpoint(ckpt, net, use_ema=bool(get(cfg, "use_ema", True)))
    except CheckpointMismatchError as e:
        raise explain_sp_mismatch(e, ckpt, cfg) from None
    sp_score_function(cfg)  # first: it names the whole score function theirs computes
    time_label_fits(cfg)


def _sp_arch(ckpt: dict[str, Any]) -> dict[str, Any]:
    from scoreflow.nets.sp_checkpoint import sp_architecture

    state = ckpt.get("model")
    return sp_architecture(state) if isinstance(state, dict) else {}


def _describe_arch(arch: dict[str, Any], cfg: DictConfig) -> str:
    from scoreflow.nets.sp_checkpoint import describe_sp_architecture

    shape = get(cfg, "data.shape")
    height = int(shape[1]) if OmegaConf.is_list(shape) and len(shape) == 3 else None
    return describe_sp_architecture(arch, height)


def _meta_net(net_cfg: dict[str, Any], shape: Any) -> Any:
    """``model.net`` instantiated on the ``meta`` device (shapes only), or None when it cannot be built."""
    import hydra
    import torch

    try:
        with torch.device("meta"):
            return hydra.utils.instantiate(net_cfg, shape=tuple(int(s) for s in shape), _convert_="all")
    except Exception:  # noqa: BLE001 - e.g. an image size the net cannot take: reported when the model is built
        return None


def _model_options() -> dict[str, dict[str, Any]]:
    """The ``conf/model`` options whose network is an NCSNpp, by name."""
    import yaml

    out = {}
    for f in sorted((Path(__file__).resolve().parents[3] / "conf" / "model").glob("*.yaml")):
        try:
            d = yaml.safe_load(f.read_text())
        except Exception:  # noqa: BLE001 - an unreadable option file is no candidate
            continue
        if isinstance(d, dict) and str((d.get("net") or {}).get("_target_", "")).endswith("NCSNpp"):
            out[f.stem] = d
    return out


def _override(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"'{key}=[{','.join(str(v) for v in value)}]'"
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


def sp_model_fix(cfg: DictConfig, ckpt: dict[str, Any], arch: dict[str, Any] | None = None) -> tuple[str, bool]:
    """``(fix, exact)``: the ``conf/model`` option closest to the checkpoint's architecture (read from its
    tensors: :func:`scoreflow.nets.sp_checkpoint.sp_architecture`) plus the ``model.net.*`` overrides that make it
    the checkpoint's; ``exact`` when that network, built on the ``meta`` device, has exactly the checkpoint's keys
    and shapes."""
    arch = _sp_arch(ckpt) if arch is None else arch
    shape = get(cfg, "data.shape")
    shape = [int(s) for s in shape] if OmegaConf.is_list(shape) else None
    want = {k: arch[k] for k in SP_NET_KEYS if k in arch}
    if "attn_levels" in arch and shape and len(shape) == 3:
        want["attn_resolutions"] = sorted({shape[1] // 2**i for i in arch["attn_levels"]}, reverse=True)
    options = _model_options()
    if not want or not options:
        return ("choose the model=... (and model.net.*) the checkpoint was trained with (model=ddpmpp for VP/subVP, "
                "model=ncsnpp for VE)", False)

    sizes = {shape[1] // 2**i for i in range(len(arch.get("ch_mult", [])))} if shape and len(shape) == 3 else None

    def value(net: dict[str, Any], k: str) -> Any:
        v = net.get(k)
        if k == "attn_resolutions" and sizes is not None:  # resolutions the data do not have change nothing
            return sorted(set(v or []) & sizes, reverse=True)
        return list(v) if isinstance(v, (list, tuple)) else v

    def diffs(name: str) -> list[str]:
        return [k for k in want if value(options[name]["net"], k) != want[k]]

    best = min(options, key=lambda n: (len(diffs(n)), len(n), n))  # ties: the plain option before its _deep
    score = sp_score_settings(cfg, want.get("embedding_type", options[best]["net"].get("embedding_type")))
    score = {k: v for k, v in score.items() if options[best].get(k) != v}  # e.g. their VP NCSN++: eps, 999 t
    fix = " ".join([f"model={best}", *(_override(f"model.net.{k}", want[k]) for k in diffs(best)),
                    *(_override(f"model.{k}", v) for k, v in score.items())])
    exact = False
    if shape is not None:
        from scoreflow.nets.sp_checkpoint import CheckpointMismatchError, check_score_sde_checkpoint

        net = _meta_net({**options[best]["net"], **{k: want[k] for k in diffs(best)}}, shape)
        try:
            exact = net is not None and bool(check_score_sde_checkpoint(ckpt, net, use_ema=False))
        except CheckpointMismatchError:
            exact = False
    channels = arch.get("channels")
    if channels is not None and shape is not None and len(shape) == 3 and channels != shape[0]:
        fix += f", with data of {channels} channels (data.shape[0]={shape[0]} here)"
    elif not exact:
        fix += " (the closest option; other model.net settings differ too)"
    return fix, exact


def explain_sp_mismatch(err: Any, ckpt: dict[str, Any], cfg: DictConfig) -> Any:
    """``err`` (a :class:`~scoreflow.nets.sp_checkpoint.CheckpointMismatchError`) named after the checkpoint file,
    with what the checkpoint holds and the ``model=`` that fits it: a one-screen usage error
    (:mod:`scoreflow.tasks.errors`) wherever a ``.pth`` is loaded (validation and ``load_model``)."""
    arch = _sp_arch(ckpt)
    err.what = f"{get(cfg, 'ckpt_path')}: {err.what}"
    err.note = f"the checkpoint holds: {_describe_arch(arch, cfg)}"
    err.fix, _ = sp_model_fix(cfg, ckpt, arch)
    err.key = "model"
    return err


def _stored_config(ckpt: dict[str, Any], cfg: DictConfig) -> dict[str, Any]:
    """The score model's config: stored in a scoreflow checkpoint; from the command line for a score_sde .pth."""
    if checkpoint_kind(ckpt) == "score":
        return ckpt["scoreflow"].get("config") or {}
    out: dict[str, Any] = {}
    for k in ("sde", "data", "module"):
        v = get(cfg, k)
        if isinstance(v, DictConfig):
            out[k] = OmegaConf.to_container(v, resolve=True)
    out["module"] = {"train_input": "levels", **(out.get("module") or {})}  # as load_model builds it (k / 255)
    return out


def _sampler_fits_mode(cfg: DictConfig, mode: str) -> None:
    """``inpaint``/``colorize`` clamp the known part inside a predictor-corrector sampler (refused after the run
    folder was made, otherwise); ``latent`` runs the probability-flow ODE of ``latent.*`` both ways, so a
    ``sampler`` given on the command line would be ignored (``mode=latent sampler=pc sampler.steps=10`` used
    dopri5 without a word)."""
    if mode in ("inpaint", "colorize") and isinstance(get(cfg, "sampler"), DictConfig):
        from scoreflow.sampling import sampler_options

        kind, _ = sampler_options(OmegaConf.to_container(get(cfg, "sampler"), resolve=True))
        if kind != "pc":
            raise ConfigError(f"mode={mode} clamps the known part inside a predictor-corrector sampler; sampler= is "
                              f"the {kind} sampler", key="sampler", value=kind, fix="sampler=pc")
    if mode == "latent":
        from scoreflow.tasks.console import hydra_config

        hc = hydra_config()  # not in a Hydra job: the preflight checks the command line (entry.preflight)
        if hc is not None:  # (its ConfigError was swallowed here with the "not in a Hydra job" ValueError)
            unused_sampler(cfg, list(hc.overrides.task))


def unused_sampler(cfg: DictConfig, overrides: list[str]) -> None:
    """``sample.py mode=latent`` with ``sampler`` overrides, which it would not use (its ODE is ``latent.*``)."""
    given = [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] == "sampler"]
    if get(cfg, "mode") == "latent" and given:
        raise ConfigError("mode=latent encodes and decodes with the probability-flow ODE of latent.* (latent.method, "
                          f"latent.rtol, latent.steps); {' '.join(given)} would not be used", key="sampler",
                          fix="drop the sampler overrides; e.g. latent.method=rk4 latent.steps=100")


def _sampler_settings(key: str, kind: str, options: dict[str, Any]) -> None:
    """Every setting of a sampler config is a parameter of its function. A ``_target_`` switched to another family
    kept the other's keys (``callbacks.samples.sampler._target_=scoreflow.sampling.pc_sample`` kept ``method: rk4``)
    and the first sample grid, hundreds of steps in, died of a TypeError (audit)."""
    import inspect

    from scoreflow.sampling.registry import SAMPLERS

    fn = SAMPLERS[kind].fn
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    settable = [n for n in params if n not in ("score_fn", "sde", "shape", "shape_or_z", "generator", "seeds",
                                               "device", "progress")]
    for name in options:
        if name not in params:
            close = did_you_mean(f"{key}.{name}", name, settable)
            raise ConfigError(f"{key}.{name} is not a setting of the {kind} sampler ({fn.__module__}.{fn.__name__}; "
                              f"its settings: {', '.join(settable)})", key=f"{key}.{name}", value=options[name],
                              fix=close or f"drop it: ~{key}.{name}")


def sampler(cfg: DictConfig, key: str = "sampler") -> None:
    """The sampler config names a registered family; a PC sampler's predictor and corrector are known names
    (:data:`scoreflow.sampling.PREDICTORS` / ``CORRECTORS``) and ``lam`` fits its predictor."""
    s = get(cfg, key)
    if not isinstance(s, DictConfig):
        return
    from scoreflow.sampling import CORRECTORS, PREDICTORS, sampler_options
    from scoreflow.sampling.predictors import PARAMETRIZED

    try:
        kind, options = sampler_options(OmegaConf.to_container(s, resolve=True))
    except ValueError as e:
        raise ConfigError(str(e), key=key, fix=f"choose {key}=<a file of conf/sampler>") from None
    _sampler_settings(key, kind, options)
    end_time(cfg, f"{key}.eps")
    boolean(cfg, f"{key}.denoise")
    if kind == "ode":
        _ode_sampler(cfg, key)
    if kind != "pc":
        tolerances(cfg, key)
        return
    for part, known in (("predictor", PREDICTORS), ("corrector", CORRECTORS)):
        name = options.get(part)
        name = "none" if name is None else name
        if name not in known:
            fix = did_you_mean(f"{key}.{part}", name, known) or f"set {key}.{part}=<one of the names above>"
            raise ConfigError(f"unknown {part} {name!r}; choose from {', '.join(sorted(known))}", key=f"{key}.{part}",
                              value=name, fix=fix)
    norm = options.get("corrector_norm")
    if norm is not None:
        from scoreflow.sampling.correctors import LANGEVIN_NORMS

        if norm not in LANGEVIN_NORMS:
            raise ConfigError(f"unknown corrector_norm {norm!r}; choose from {', '.join(LANGEVIN_NORMS)}",
                              key=f"{key}.corrector_norm", value=norm,
                              fix=did_you_mean(f"{key}.corrector_norm", str(norm), LANGEVIN_NORMS)
                              or f"{key}.corrector_norm=auto")
    lam = options.get("lam")
    if lam is not None:
        pred = "none" if options.get("predictor") is None else options["predictor"]
        if "lam" not in PARAMETRIZED.get(pred, ()):
            users = [p for p, args in PARAMETRIZED.items() if "lam" in args]
            raise ConfigError(f"{key}.lam is only used by {key}.predictor={' or '.join(users)}, not {pred!r}",
                              key=f"{key}.lam", value=lam, fix=f"{key}.predictor={users[0]}, or {key}.lam=null")
        number(cfg, f"{key}.lam", high=1, high_open=False,
               fix=f"{key}.lam <= 1 (Huang et al. 2021, Eq. 27): 0 the reverse SDE, 1 the probability-flow ODE")
    variance = options.get("variance")
    if variance is not None:
        from scoreflow.sampling.predictors import ANCESTRAL_VARIANCES

        pred = "none" if options.get("predictor") is None else options["predictor"]
        if "variance" not in PARAMETRIZED.get(pred, ()):
            raise ConfigError(f"{key}.variance is only used by {key}.predictor=ancestral, not {pred!r}",
                              key=f"{key}.variance", value=variance,
                              fix=f"{key}.predictor=ancestral, or {key}.variance=null")
        if variance not in ANCESTRAL_VARIANCES:
            raise ConfigError(f"unknown ancestral variance {variance!r}; choose from {', '.join(ANCESTRAL_VARIANCES)}",
                              key=f"{key}.variance", value=variance,
                              fix=did_you_mean(f"{key}.variance", str(variance), ANCESTRAL_VARIANCES)
                              or f"{key}.variance=auto")
    number(cfg, f"{key}.snr", low=0, fix=f"{key}.snr=0.16 (the Langevin step's signal-to-noise ratio; no corrector: "
                                         f"{key}.corrector=none)")
    integer(cfg, f"{key}.n_steps", low=0)


def end_time(cfg: DictConfig, key: str) -> None:
    """A sampler's end time ``eps`` (null: the SDE's default) lies in (0, T = 1)."""
    number(cfg, key, low=0, high=1, allow_none=True, fix=f"{key}=1e-3, or {key}=null (the SDE's default)")


def boolean(cfg: DictConfig, key: str) -> None:
    """``key`` is true or false (a string such as ``no`` or ``off`` would be read as true)."""
    if has(cfg, key) and not isinstance(get(cfg, key), bool):
        v = get(cfg, key)
        raise ConfigError(f"{key} must be true or false, got {v!r}", key=key, value=v,
                          fix=f"{key}={'false' if str(v).lower() in ('no', 'off', '0', 'n') else 'true'}")


def _ode_sampler(cfg: DictConfig, key: str) -> None:
    """An ODE sampler's ``method`` is one of :mod:`scoreflow.sampling.ode`'s, and ``steps`` goes with a fixed-step
    one: an adaptive method ignored it (``sampler.steps=100`` drew dopri5's own steps; audit)."""
    from scoreflow.sampling.ode import ADAPTIVE, FIXED_STEP

    choice(cfg, f"{key}.method", sorted((*ADAPTIVE, *FIXED_STEP)), allow_none=True)
    method, steps = get(cfg, f"{key}.method", None) or "dopri5", get(cfg, f"{key}.steps", None)
    if method in ADAPTIVE and steps is not None:
        raise ConfigError(f"{key}.steps={steps} is the number of steps of a fixed-step method "
                          f"({', '.join(FIXED_STEP)}); {key}.method={method} is adaptive: rtol and atol set its steps",
                          key=f"{key}.steps", value=steps,
                          fix=f"{key}.steps=null, or {key}.method=rk4 {key}.steps={steps}")


def tolerances(cfg: DictConfig, key: str) -> None:
    """An adaptive ODE solver's ``rtol`` and ``atol``: finite, >= 0, not both 0 (null keeps the default)."""
    for k in ("rtol", "atol"):
        number(cfg, f"{key}.{k}", low=0, low_open=False, allow_none=True)
    if has(cfg, f"{key}.rtol") and get(cfg, f"{key}.rtol") == 0 and get(cfg, f"{key}.atol", None) == 0:
        raise ConfigError(f"{key}.rtol and {key}.atol are both 0: the adaptive solver cannot meet that",
                          key=f"{key}.rtol", value=0, fix=f"{key}.rtol=1e-5 {key}.atol=1e-5")


def _image_selection(cfg: DictConfig) -> None:
    idx = get(cfg, "image_indices")
    if idx is None:
        return
    ok = OmegaConf.is_list(idx) and len(idx) > 0 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                         for i in idx)
    if not ok:
        raise ConfigError(f"image_indices must be a non-empty list of indices >= 0, got {idx!r}", key="image_indices",
                          value=idx, fix="'image_indices=[0,40,80]' (quoted), or image_indices=null")


def _latent_pair(cfg: DictConfig) -> None:
    """``latent.pair`` indexes the encoded images: both must be below their number (image 0 with itself otherwise)."""
    pair = get(cfg, "latent.pair")
    idx = get(cfg, "image_indices")
    n = len(idx) if idx is not None else get(cfg, "num_images")
    if not isinstance(n, int) or n < 2:  # one image: no interpolation is drawn
        return
    ok = OmegaConf.is_list(pair) and len(pair) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                            for i in pair)
    if not ok or not all(0 <= i < n for i in pair):
        what = "image_indices" if idx is not None else f"num_images={n}"
        raise ConfigError(f"latent.pair must be two indices into the {n} encoded images ({what}): 0 .. {n - 1}; "
                          f"got {pair!r}", key="latent.pair", value=pair,
                          fix=f"'latent.pair=[0,{n - 1}]' (quoted), or encode more images (num_images)")


def _mask(cfg: DictConfig) -> None:
    spec = str(get(cfg, "mask"))
    if spec in ("center", "half", "random"):
        return
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".png" and path.is_file():
        return
    what = "does not exist" if path.suffix.lower() == ".png" else "is none of these"
    fix = did_you_mean("mask", spec, ("center", "half", "random")) or "mask=center, or mask=<an existing .png>"
    raise ConfigError(f"mask must be center, half, random or the path of a .png (white = known); {spec!r} {what}",
                      key="mask", value=spec, fix=fix)


def _sde_option(sde: dict[str, Any]) -> str:
    """The ``conf/sde`` option whose file equals ``sde`` (else the class name)."""
    import yaml

    for f in sorted((Path(__file__).resolve().parents[3] / "conf" / "sde").glob("*.yaml")):
        try:
            if yaml.safe_load(f.read_text()) == sde:
                return f.stem
        except Exception:  # noqa: BLE001 - an unreadable option file is no match
            continue
    return str(sde.get("_target_", "?")).rsplit(".", 1)[-1]


def _classifier_fits(cfg: DictConfig, score: dict[str, Any], clf: dict[str, Any]) -> None:
    """The classifier must have been trained on the score model's SDE and data scaling (its gradients are those
    of ``p_t(y | x_t)`` for that SDE only)."""
    a, b = score.get("sde"), clf.get("sde")
    if isinstance(a, dict) and isinstance(b, dict) and a != b:
        diff = config_differences({"sde": b}, {"sde": a}, groups=("sde",))
        shown = diff[:3] + ([f"... and {len(diff) - 3} more"] if len(diff) > 3 else [])
        raise CheckpointError("the classifier was trained with another SDE than the score model (classifier -> score "
                              "model):\n  " + "\n  ".join(shown), key="classifier_ckpt",
                              value=get(cfg, "classifier_ckpt"),
                              fix=f"retrain the classifier with sde={_sde_option(a)} (python train_classifier.py "
                                  f"sde={_sde_option(a)} ...), or give a classifier of that SDE")
    a, b = (score.get("data") or {}), (clf.get("data") or {})
    if a.get("shape") and b.get("shape") and list(a["shape"]) != list(b["shape"]):
        name = str(b.get("_target_", "?")).rsplit(".", 1)[-1]
        raise CheckpointError(f"the classifier was trained on data of shape {list(b['shape'])} ({name}), the score "
                              f"model on {list(a['shape'])}: its gradients would guide with another data set's "
                              "classes", key="classifier_ckpt", value=get(cfg, "classifier_ckpt"),
                              fix="train a classifier on the score model's data (python train_classifier.py "
                                  "data=...), or give one trained on them")
    if a.get("_target_") and b.get("_target_") and a["_target_"] != b["_target_"]:
        mine, theirs = (str(d["_target_"]).rsplit(".", 1)[-1] for d in (a, b))
        raise CheckpointError(f"the classifier was trained on {theirs} data, the score model on {mine}: its gradients "
                              "would guide towards another data set's classes", key="classifier_ckpt",
                              value=get(cfg, "classifier_ckpt"),
                              fix="train a classifier on the score model's data (python train_classifier.py "
                                  "data=...), or give one trained on them")
    for name, default in (("scale", 2.0), ("shift", -1.0)):
        have = (clf.get("module") or {}).get(name, default)
        want = (score.get("module") or {}).get(name, default)
        if have is not None and want is not None and float(have) != float(want):
            raise CheckpointError(f"the classifier saw data with module.{name}={have}, the score model uses {want}",
                                  key="classifier_ckpt", value=get(cfg, "classifier_ckpt"),
                                  fix=f"retrain the classifier with module.{name}={want}")
    have = (clf.get("module") or {}).get("train_input") or "dequantized"
    want = (score.get("module") or {}).get("train_input") or "dequantized"
    if have != want:  # guidance from inputs it never saw: (k + u) / K against k / (K - 1), a 1/K offset
        raise CheckpointError(f"the classifier was trained on module.train_input={have} inputs, the score model on "
                              f"{want}", key="classifier_ckpt", value=get(cfg, "classifier_ckpt"),
                              fix=f"retrain the classifier with module.train_input={want} (python "
                                  f"train_classifier.py module.train_input={want} ...)")


def data_root_exists(cfg: DictConfig, data: dict[str, Any] | None = None) -> None:
    """``data_root`` exists, and the checkpoint's data (``data``, its config) are read from a folder at all."""
    if isinstance(data, dict) and "root" not in data:
        name = str(data.get("_target_", "?")).rsplit(".", 1)[-1]
        raise ConfigError(f"data_root does not apply: this checkpoint's data ({name}) ship inside an installed "
                          "package and are read from no folder", key="data_root", value=get(cfg, "data_root"),
                          fix="drop data_root=")
    p = Path(str(get(cfg, "data_root"))).expanduser()
    if not p.exists():
        raise DataError(f"data_root {p} does not exist", key="data_root", value=get(cfg, "data_root"),
                        fix="point data_root= at the folder that holds the data now")


def _device(cfg: DictConfig) -> None:
    d = str(get(cfg, "device") or "auto")
    if not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {d!r}", key="device", value=d,
                          fix="device=auto")
    if d.startswith("cuda") and not cuda_available():
        raise ConfigError(f"device={d} but no CUDA device is available", key="device", value=d,
                          fix="use device=cpu (or device=auto)")


def train_dequant(cfg: DictConfig) -> None:
    """``score_ckpt`` must be a train.py score model: not a classifier, a .pth, nor a train_dequant.py checkpoint (a
    score model whose flow is already trained after it: a second flow on top would be trained silently). The
    sde/model/data the command line sets must be the score model's (:func:`score_model_settings`), a Table-2
    flow step must be the one for the score model's data (:func:`table2_flow_step`), the flow's sizes must be
    usable (:func:`variational_dequantizer`), and ``ckpt_path`` must be a flow trained after the same score
    model (:func:`flow_resume`)."""
    common_training(cfg, check_data_root=False)
    path = get(cfg, "score_ckpt")
    ckpt = read_checkpoint(path, "score_ckpt")
    kind = checkpoint_kind(ckpt)
    if kind != "score":
        raise CheckpointError(f"score_ckpt is {a_kind(kind)} checkpoint, not a train.py score model", key="score_ckpt",
                              value=path, fix="score_ckpt=outputs/train/<run>/checkpoints/last.ckpt (a train.py run)")
    stored = ckpt["scoreflow"].get("config") or {}
    named = ckpt["scoreflow"].get("choices") or {}
    not_a_flow_checkpoint(stored, path)
    score_model_settings(cfg, stored, path, named)
    table2_flow_step(cfg, stored, path, named)
    data_root(cfg)  # after the checks above: data the score model never saw are refused whether found or not
    variational_dequantizer(cfg, (stored.get("data") or {}).get("shape"))
    if get(cfg, "ckpt_path"):
        flow_resume(cfg)


SCORE_GROUPS = ("sde", "model", "data")  # train_dequant.py takes these from the score checkpoint
_WHERE_NOT_WHAT = ("data.root", "data.path")  # where the same data are read from: may change


def _option_of(group: str, value: dict[str, Any]) -> str | None:
    """The ``conf/<group>`` option ``value`` is: the file equal to it, else the only one of its class (a model's
    network class), or None."""
    import yaml

    def target(d: Any) -> Any:
        d = d.get("net") if group == "model" and isinstance(d, dict) else d
        return d.get("_target_") if isinstance(d, dict) else None

    same_class = []
    for f in sorted((Path(__file__).resolve().parents[3] / "conf" / group).glob("*.yaml")):
        try:
            d = yaml.safe_load(f.read_text())
        except Exception:  # noqa: BLE001 - an unreadable option file is no match
            continue
        if d == value:
            return f.stem
        if target(value) and target(d) == target(value):
            same_class.append(f.stem)
    return same_class[0] if len(same_class) == 1 else None


def _choices() -> dict[str, str]:
    from scoreflow.tasks.console import hydra_choices

    return hydra_choices()


def score_model_settings(cfg: DictConfig, stored: dict[str, Any], path: Any,
                         named: dict[str, str] | None = None) -> None:
    """train_dequant.py trains the flow on the score checkpoint's sde, network and data (``flow_run_config`` merges
    what the command line sets over them): a setting of those groups that changes them (``+data=mnist5k`` on a
    digits model: a flow for data the score model never saw) is refused, naming both. ``data.root`` / ``data.path``
    (where the same data are read from) may change. ``named``: the options the score run was composed of (stored in
    its checkpoints since 2026-11-29); earlier checkpoints' options are found by their values in ``conf/``."""
    named, mine_named = named or {}, _choices()
    for group in SCORE_GROUPS:
        mine, theirs = get(cfg, group), stored.get(group)
        if mine is None or not isinstance(theirs, dict):
            continue
        requested = OmegaConf.to_container(mine, resolve=True) if isinstance(mine, DictConfig) else mine
        if isinstance(requested, dict):  # what flow_run_config will build: the command's keys over the score run's
            requested = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(theirs), OmegaConf.create(requested)),
                                               resolve=True)
        diff = config_differences({group: theirs}, {group: requested}, groups=(group,), ignore=_WHERE_NOT_WHAT)
        if not diff:
            continue
        shown = diff[:4] + ([f"... and {len(diff) - 4} more"] if len(diff) > 4 else [])
        have = named.get(group) or _option_of(group, theirs)
        want = mine_named.get(group) or (_option_of(group, requested) if isinstance(requested, dict) else None)
        fix = (f"drop the {group} override(s) ({group}=... / {group}.<key>=...): the flow is trained with the score "
               f"model's {group}" + (f" ({group}={have})" if have else ""))
        if group == "data":
            fix += (", or give a score model trained on these data (python train.py "
                    f"data={want or '...'} ..., then score_ckpt=<its checkpoint>)")
        other = "other data" if group == "data" else f"another {group}"
        raise ConfigError(f"score_ckpt {path} was trained with {other} than this command sets: the flow is "
                          f"trained after the score model, on its {group} (score model -> command line):\n  "
                          + "\n  ".join(shown), key=group,
                          value=want or (requested.get("_target_") if isinstance(requested, dict) else requested),
                          fix=fix)


def _flow_preset(cfg: DictConfig) -> str | None:
    """The dataset of the ``conf/dequantization/variational_<dataset>.yaml`` flow preset whose every setting the
    composed ``dequantization`` has (``cifar10``, ``imagenet32``), or None. Named by the Hydra option the run chose
    (``dequantization=variational_<dataset>``, its sizes overridden or not); outside a Hydra job, by its values."""
    import yaml

    deq = get(cfg, "dequantization")
    if not isinstance(deq, DictConfig):
        return None
    option = _choices().get("dequantization", "")
    if option.startswith("variational_") and str(deq.get("_target_", "")).endswith("VariationalDequantizer"):
        return option.removeprefix("variational_")
    have = OmegaConf.to_container(deq, resolve=True)
    for f in sorted((Path(__file__).resolve().parents[3] / "conf" / "dequantization").glob("variational_*.yaml")):
        try:
            preset = (yaml.safe_load(f.read_text()) or {}).get("dequantization") or {}
        except Exception:  # noqa: BLE001 - an unreadable option file is no match
            continue
        if preset and all(have.get(k, _ABSENT) == v for k, v in preset.items()):
            return f.stem.removeprefix("variational_")
    return None


def _score_dataset(stored: dict[str, Any], named: dict[str, str] | None = None) -> str:
    """The score model's data set: its Table-2 row's ``table2.dataset``, else its ``data`` option (``named``, stored
    since 2026-11-29, else the ``conf/data`` file equal to its data; else their class name)."""
    row = stored.get("table2")
    if isinstance(row, dict) and row.get("dataset"):
        return str(row["dataset"])
    data = stored.get("data") if isinstance(stored.get("data"), dict) else {}
    return (named or {}).get("data") or _option_of("data", data) or str(data.get("_target_", "?")).rsplit(".", 1)[-1]


def table2_flow_step(cfg: DictConfig, stored: dict[str, Any], path: Any, named: dict[str, str] | None = None) -> None:
    """``+experiment=table2/dequant_<dataset>`` (task ``table2_dequant``) is Table 2's flow step for the score models
    of that data set (its flow preset ``variational_<dataset>``; a Table-2 row records it as ``table2.dequantization``):
    refused on a score model of other data."""
    if get(cfg, "task_name") != "table2_dequant":
        return
    flow = _flow_preset(cfg)
    row = stored.get("table2") if isinstance(stored.get("table2"), dict) else {}
    want = str(row.get("dequantization") or "").removeprefix("variational_") or _score_dataset(stored, named)
    if flow is None or flow == want:
        return
    conf = Path(__file__).resolve().parents[3] / "conf" / "experiment" / "table2"
    data = stored.get("data") if isinstance(stored.get("data"), dict) else {}
    shape = f" {list(data['shape'])}" if data.get("shape") else ""
    fix = (f"+experiment=table2/dequant_{want} (the flow step for the score model's data)"
           if (conf / f"dequant_{want}.yaml").is_file() else
           f"drop +experiment=table2/dequant_{flow} (for ScoreFlow's {flow} flow on other data: "
           f"dequantization=variational_{flow})")
    raise ConfigError(f"+experiment=table2/dequant_{flow} is Table 2's flow step for {flow} score models "
                      f"(dequantization=variational_{flow}), but score_ckpt {path} was trained on {want}{shape}",
                      key="experiment", value=f"table2/dequant_{flow}", fix=fix)


def variational_dequantizer(cfg: DictConfig, shape: Any = None) -> None:
    """The sizes of a ``VariationalDequantizer`` (conf/dequantization/variational*.yaml) and of its objective
    (``module.dequant``): ``num_components=0`` would give NaN losses that the NaN guard blames on the learning rate,
    a width of 0 fails inside a convolution. ``shape``: the data's, for the attention heads (images only)."""
    if not str(get(cfg, "dequantization._target_", "") or "").endswith("VariationalDequantizer"):
        return
    d = "dequantization."
    integer(cfg, d + "num_components", low=1,
            fix=f"{d}num_components=8 (logistics per element; the cifar10/imagenet32 presets: 32)")
    for key in ("width", "context_width"):
        integer(cfg, d + key, low=1)
    for key in ("num_couplings", "num_blocks", "context_blocks", "attn_heads"):
        integer(cfg, d + key, low=0)
    integer(cfg, d + "bisection_iters", low=1, fix=f"{d}bisection_iters=40")
    number(cfg, d + "dropout", low=0, high=1, low_open=False)
    number(cfg, d + "init_scale", low=0, low_open=False)
    choice(cfg, d + "base", ("gaussian", "logistic"))
    for key in ("context_attention", "pointwise", "output_nonlinearity"):
        boolean(cfg, d + key)
    heads = get(cfg, d + "attn_heads", 0)
    if isinstance(shape, (list, tuple)) or OmegaConf.is_list(shape):
        spatial = len(shape) == 3
    else:
        spatial = True  # unknown: images, the data a dequantizer is for
    if spatial and isinstance(heads, int) and heads > 0:
        for key, on in (("width", True), ("context_width", bool(get(cfg, d + "context_attention", False)))):
            width = get(cfg, d + key)
            if on and isinstance(width, int) and width % heads:
                raise ConfigError(f"{d}{key}={width} is not divisible by {d}attn_heads={heads}", key=d + "attn_heads",
                                  value=heads, fix=f"{d}attn_heads=<a divisor of {width}>, or 0 (no attention)")
    m = "module.dequant."
    integer(cfg, m + "num_t", low=1)
    if get(cfg, m + "truncation_correction", True) is not False:  # the ε-correction's draws (likelihood/bound.py)
        integer(cfg, m + "num_eps_samples", low=1)
    number(cfg, m + "weight", low=0, low_open=False)


def other_score_model(flow: dict[str, Any], score_path: Any) -> str | None:
    """``"<stored score_ckpt> -> <score_path>"`` (and why) when the train_dequant.py checkpoint ``flow`` was trained
    after another score model than ``score_path``; None when it is the same one, or cannot be told.

    The score weights decide, not the path (a score checkpoint moved or copied elsewhere is the same model): the
    digest of the EMA score weights stored in the flow run's ``dequant_run.score_digest``, against that of
    ``score_path`` (:func:`score_digest`). A flow checkpoint written before the digest was stored is compared by its
    own frozen score weights (the same values); checkpoints without weights by the path."""
    run = ((flow.get("scoreflow") or {}).get("config") or {}).get("dequant_run")
    if not isinstance(run, dict) or score_path in (None, "", "???"):
        return None
    before = run.get("score_ckpt")
    try:
        requested = score_digest(score_path)
    except CheckpointError:
        return None  # an unreadable score_ckpt is reported by its own check
    stored = run.get("score_digest") or score_weights_digest(flow)  # older flows: their frozen score weights
    same = stored == requested if stored and requested else str(before) == str(score_path)
    if same:
        return None
    how = f" (score weights {stored[:12]} -> {requested[:12]})" if stored and requested else ""
    return f"{before} -> {score_path}{how}"


def flow_resume(cfg: DictConfig) -> None:
    """``ckpt_path`` of train_dequant.py must be a train_dequant.py checkpoint, trained after the score model of
    ``score_ckpt`` (unless ``resume_allow_changes``): Lightning's restore puts the checkpoint's score weights back,
    so another ``score_ckpt`` would be recorded as the run's score model while the old one is used."""
    path = get(cfg, "ckpt_path")
    flow = read_checkpoint(path)
    stored = (flow.get("scoreflow") or {}).get("config") if isinstance(flow.get("scoreflow"), dict) else None
    if not isinstance((stored or {}).get("dequant_run"), dict):
        raise CheckpointError(f"ckpt_path is {a_kind(checkpoint_kind(flow))} checkpoint, not a train_dequant.py one: "
                              "train_dequant.py resumes only its own (flow) checkpoints", key="ckpt_path", value=path,
                              fix="give <run>/checkpoints/last.ckpt of a train_dequant.py run, or drop ckpt_path")
    if get(cfg, "resume_allow_changes", False):
        return
    change = other_score_model(flow, get(cfg, "score_ckpt"))
    if change:
        before = stored["dequant_run"].get("score_ckpt")
        raise CheckpointError(f"ckpt_path {path} is a flow trained after another score model (stored -> score_ckpt): "
                              f"{change}; resuming would put the old score weights back under the new score_ckpt",
                              key="ckpt_path", value=path,
                              fix=f"score_ckpt={before} (the score model it was trained after), drop ckpt_path to "
                                  "train a new flow, or resume_allow_changes=true to resume it with its own score "
                                  "model")


_DIGESTS: dict[tuple[str, int, int], str | None] = {}


def score_digest(path: Any) -> str | None:
    """:func:`score_weights_digest` of the checkpoint at ``path`` (cached while the file is unchanged)."""
    p = Path(str(path)).expanduser()
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _DIGESTS:
        return _DIGESTS[key]
    digest = score_weights_digest(read_checkpoint(path, "score_ckpt"))
    if key is not None:
        _DIGESTS[key] = digest
    return digest


def score_weights_digest(ckpt: dict[str, Any]) -> str | None:
    """SHA-256 of the score network's weights a flow trained after ``ckpt`` uses: the ``score_model.*`` entries of
    its state dict with the EMA shadow substituted (a train.py checkpoint: its EMA weights; a train_dequant.py one:
    its frozen score weights, which the flow's EMA does not track). None when it holds no score weights."""
    import torch

    from scoreflow.utils import tensors_digest

    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        return None
    weights = {k: v for k, v in state.items() if str(k).startswith("score_model.")}
    ema = ckpt.get("ema")
    shadow = ema.get("shadow") if isinstance(ema, dict) else None
    if isinstance(shadow, dict):
        weights.update({k: v for k, v in shadow.items() if str(k).startswith("score_model.")})
    weights = {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}
    if not weights:
        return None
    return tensors_digest(weights, "sha256", sep="|")


def not_a_flow_checkpoint(stored: dict[str, Any], path: Any) -> None:
    """``score_ckpt`` (stored config ``stored``) must not be a train_dequant.py checkpoint (its config records the
    ``dequant_run``): train_dequant.py trains a flow after a train.py score model, not a second flow on top."""
    run = stored.get("dequant_run")
    if isinstance(run, dict):
        source = run.get("score_ckpt")
        raise CheckpointError("score_ckpt is a train_dequant.py checkpoint (a frozen score model and the variational "
                              "dequantizer trained after it), not a train.py score model", key="score_ckpt",
                              value=path, fix=f"score_ckpt={source} (the score model it was trained from)" if source
                              else "score_ckpt=outputs/train/<run>/checkpoints/last.ckpt (a train.py run)")


def train_classifier(cfg: DictConfig) -> None:
    common_training(cfg)
    integer(cfg, "num_classes", low=2, allow_none=True, fix="num_classes=null (the data source's)")
    choice(cfg, "module.train_input", ("dequantized", "levels"))
    if get(cfg, "module.train_input", "dequantized") == "levels" and get(cfg, "data.num_levels", None) is None:
        raise ConfigError("module.train_input=levels (k / (K - 1), the input of a score model trained on levels) "
                          "needs discrete data; these data are continuous", key="module.train_input", value="levels",
                          fix="module.train_input=dequantized")
    times = get(cfg, "module.eval_times", None)
    if times is not None:
        values = list(times) if OmegaConf.is_list(times) else [times]
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))
               or not math.isfinite(v) or not 0 < v <= 1]
        if bad or not OmegaConf.is_list(times):
            raise ConfigError(f"module.eval_times must be a list of times in (0, T] (T = 1 for every SDE here), got "
                              f"{times!r}", key="module.eval_times", value=str(times),
                              fix="'module.eval_times=[0.01,0.1,0.5,0.9]'")
    shape = get(cfg, "data.shape")
    if OmegaConf.is_list(shape) and len(shape) != 3:
        clf = str(get(cfg, "classifier.net._target_") or get(cfg, "classifier._target_") or "the classifier")
        raise ConfigError(f"the classifier ({clf.rsplit('.', 1)[-1]}) needs image data [C, H, W]; data "
                          f"{get(cfg, 'data._target_', '?').rsplit('.', 1)[-1]} has shape {list(shape)}",
                          key="data", value=get(cfg, "data._target_"),
                          fix="an image data set (data=digits, mnist, cifar10, ...)")
    path = get(cfg, "ckpt_path")
    if path:
        kind = checkpoint_kind(read_checkpoint(path))
        if kind != "classifier":
            raise CheckpointError(f"ckpt_path is {a_kind(kind)} checkpoint; train_classifier.py resumes only its own "
                                  "(classifier) checkpoints", key="ckpt_path", value=path,
                                  fix="give <run>/checkpoints/last.ckpt of a train_classifier.py run, or drop "
                                      "ckpt_path")
