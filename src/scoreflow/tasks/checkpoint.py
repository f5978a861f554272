"""Finding and loading a checkpoint, and converting between model space, data space and levels.

* :func:`ckpt_tag` / :func:`run_subdir` name the run directory of ``evaluate.py`` and ``sample.py`` (the
  ``scoreflow_run_subdir`` resolver used by ``conf/evaluate.yaml`` and ``conf/sample.yaml`` is registered on import);
* :func:`task_dir` is the run folder of every task;
* :func:`module_from_checkpoint` rebuilds the module (score model or classifier) from the config stored in a
  scoreflow checkpoint, :func:`load_classifier` the frozen classifier that guides sampling;
* :func:`load_model` rebuilds a module from a scoreflow (Lightning) or score_sde_pytorch ``.pth`` checkpoint;
* :func:`image_seed` / :func:`seeded_generator` (from :mod:`scoreflow.lit.per_image`) give every image its own
  random numbers, whatever its batch.

Shared by every task and the benchmarks.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from scoreflow.lit.classifier_module import ClassifierLitModule
from scoreflow.lit.ema import ema_state_dict
from scoreflow.lit.module import ScoreLitModule
from scoreflow.lit.per_image import image_seed, seeded_generator  # noqa: F401 (re-exported)
from scoreflow.nets.classifier import NoiseConditionalClassifier
from scoreflow.sde import SDE
from scoreflow.tasks.build import ConfigError, build_classifier_module, build_data, build_module, to_container
from scoreflow.tasks.console import hydra_config
from scoreflow.tasks.errors import CheckpointError
from scoreflow.utils import tensors_digest

log = logging.getLogger(__name__)


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
    hc = hydra_config()
    out = Path(hc.runtime.output_dir) if hc is not None else Path(cfg.get("run_dir") or f"outputs/{task}")
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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict at ``path`` on the CPU (``weights_only``), or a clear error for anything else."""
    path = Path(path)
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
    """``"scoreflow"`` (a Lightning checkpoint written by train.py) or ``"score_sde"`` (score_sde_pytorch .pth):
    :func:`~scoreflow.tasks.validate.checkpoint_kind`'s kinds, with the error for an unknown one."""
    from scoreflow.tasks.validate import checkpoint_kind

    kind = checkpoint_kind(ckpt)
    if kind == "score_sde":
        return "score_sde"
    if kind != "unknown":
        return "scoreflow"
    if "state_dict" in ckpt:
        raise CheckpointFormatError(
            f"{path} is a Lightning checkpoint without scoreflow's stored config (was it written by train.py?)"
        )
    raise CheckpointFormatError(
        f"{path} is neither a scoreflow checkpoint (keys 'state_dict', 'scoreflow') nor a score_sde_pytorch one "
        f"(keys 'model', 'ema', 'step'); it has keys {sorted(map(str, ckpt))[:10]}"
    )


def checkpoint_config(ckpt: dict[str, Any]) -> DictConfig:
    cfg = (ckpt.get("scoreflow") or {}).get("config")
    if cfg is None:
        raise KeyError("this checkpoint carries no scoreflow config (was it written by scoreflow's train.py?)")
    return OmegaConf.create(cfg)


_TRAINED_BY = {"score": "train.py", "classifier": "train_classifier.py"}


def module_from_checkpoint(
    path: str | Path, *, use_ema: bool = True, overrides: dict[str, Any] | None = None, kind: str = "score",
    loaded: dict[str, Any] | None = None,
) -> tuple[ScoreLitModule | ClassifierLitModule, DictConfig, dict[str, Any]]:
    """Rebuild the module of a ``kind`` (``score`` or ``classifier``) checkpoint from the config stored in it and
    load its (EMA) weights strictly.

    ``overrides`` are merged into the stored config first (e.g. ``{"module": {"evaluation": {...}}}``). A classifier
    trained without the EMA callback (``callbacks=none``) has only its raw weights, which are then used.
    ``loaded``: the checkpoint of ``path`` already read (it is not read again).
    """
    ckpt = load_checkpoint(path) if loaded is None else loaded
    stored = (ckpt.get("scoreflow") or {}).get("kind") or "score"
    if stored != kind:
        raise ValueError(f"{path} is not a {kind} checkpoint (kind={stored!r}); train one with {_TRAINED_BY[kind]}")
    cfg = checkpoint_config(ckpt)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
    module = build_classifier_module(cfg) if kind == "classifier" else build_module(cfg)
    with_ema = use_ema and (kind == "score" or "ema" in ckpt)  # score: no EMA state is an error (ema_state_dict)
    if with_ema and ckpt.get("ema") is None:
        raise CheckpointError(f"{path} holds no EMA weights: it was trained without the EMA callback "
                              "(~callbacks.ema or callbacks=none)", key="use_ema", value=True,
                              fix="use_ema=false (its raw weights)")
    missing, unexpected = module.load_state_dict(ema_state_dict(ckpt) if with_ema else ckpt["state_dict"],
                                                 strict=False)
    missing = [k for k in missing if not k.startswith(("val_", "test_"))]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing={missing}, unexpected={unexpected}")
    module.batches_seen = ckpt["scoreflow"].get("batches_seen", 0)
    return module, cfg, ckpt


def classifier_module_from_checkpoint(
    path: str | Path, *, use_ema: bool = True
) -> tuple[ClassifierLitModule, DictConfig, dict[str, Any]]:
    """:func:`module_from_checkpoint` of a ``train_classifier`` checkpoint."""
    return module_from_checkpoint(path, use_ema=use_ema, kind="classifier")


def load_classifier(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    use_ema: bool = True,
    sde: SDE | None = None,
    scale: float | None = None,
    shift: float | None = None,
    data_shape: tuple[int, ...] | list[int] | None = None,
    train_input: str | None = None,
) -> NoiseConditionalClassifier:
    """The trained ``classifier(x_t, t) -> logits`` of a ``train_classifier`` checkpoint, in eval mode, frozen.

    The SDE it was trained with is ``.sde``. Passing the guided score model's ``sde`` / ``scale`` / ``shift`` /
    ``data_shape`` (one example's, e.g. ``(1, 8, 8)``) / ``train_input`` checks that they equal the classifier's
    (guidance with a classifier of another SDE, data scaling, data set or input space silently gives wrong
    gradients, or fails deep inside the network), raising a ``ConfigError`` that names both otherwise.
    """
    module, cfg, _ = classifier_module_from_checkpoint(path, use_ema=use_ema)
    clf = module.classifier
    have_shape = (cfg.get("data") or {}).get("shape")
    if data_shape is not None and have_shape is not None and list(have_shape) != list(data_shape):
        raise ConfigError(f"the classifier {path} was trained on data of shape {list(have_shape)}, but the score "
                          f"model's data have shape {list(data_shape)}")
    if sde is not None and not (type(sde) is type(clf.sde) and vars(sde) == vars(clf.sde)):
        raise ConfigError(f"the classifier {path} was trained with {clf.sde!r}, but the score model uses {sde!r}")
    for name, want in (("scale", scale), ("shift", shift)):
        have = float(cfg.module.get(name, 2.0 if name == "scale" else -1.0))
        if want is not None and float(want) != have:
            raise ConfigError(
                f"the classifier {path} saw data with {name}={have}, but the score model uses {name}={want}"
            )
    have_input = str(cfg.module.get("train_input") or "dequantized")
    if train_input is not None and train_input != have_input:
        raise ConfigError(f"the classifier {path} was trained on module.train_input={have_input} inputs, but the "
                          f"score model on {train_input}", key="classifier_ckpt", value=str(path),
                          fix=f"retrain the classifier with module.train_input={train_input}")
    clf.requires_grad_(False)  # guidance differentiates w.r.t. x only
    clf.train_eps = float(module.eps)  # the smallest time it was trained on (sampling below it extrapolates)
    return clf.eval().to(device)


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
    ckpt = load_checkpoint(path)
    fmt = str(cfg.get("ckpt_format", "auto"))
    detected = detect_format(ckpt, path)
    if fmt not in ("auto", "scoreflow", "score_sde"):
        raise ConfigError(f"ckpt_format must be auto, scoreflow or score_sde, got {fmt!r}")
    if fmt != "auto" and fmt != detected:
        raise CheckpointFormatError(f"ckpt_format={fmt} but {path} is a {detected} checkpoint")
    eval_over = _not_null(cfg.get("evaluation"))
    if detected == "scoreflow":
        step = int(ckpt.get("global_step", 0))
        if any(cfg.get(g) is not None for g in ("sde", "model", "data")):
            log.warning("sde/model/data groups are ignored for scoreflow checkpoints (they carry their config)")
        overrides: dict[str, Any] = {"module": {"evaluation": eval_over}} if eval_over else {}
        if cfg.get("data_root"):
            overrides["data"] = {"root": str(cfg.data_root)}
        module, mcfg, _ = module_from_checkpoint(path, use_ema=use_ema, overrides=overrides, loaded=ckpt)
        del ckpt  # the weights are in the module (read once: it was read twice)
    else:
        missing = [g for g in ("sde", "model", "data") if cfg.get(g) is None]
        if missing:
            raise ConfigError(
                f"{path} is a score_sde_pytorch checkpoint, which does not record its configuration: choose "
                f"{' '.join(g + '=...' for g in missing)} on the command line (e.g. sde=vp model=ddpmpp data=cifar10)",
                key=missing[0], fix="e.g. sde=vp model=ddpmpp data=cifar10 (VP/subVP) or sde=ve model=ncsnpp (VE)"
            )
        mcfg = OmegaConf.create({
            g: to_container(cfg[g]) for g in ("sde", "model", "data", "dequantization", "weighting")
        })
        if cfg.get("data_root") and "root" in mcfg.data:  # where the data live now, as for scoreflow checkpoints
            mcfg.data.root = str(cfg.data_root)
        mcfg.eps, mcfg.seed = cfg.get("eps"), int(cfg.get("seed") or 0)
        # score_sde_pytorch trains on k / 255 without dequantization noise: its samples map back by rounding
        mcfg.module = {"train_input": "levels", **_not_null(cfg.get("module")), "evaluation": eval_over}
        centered = mcfg.model.net.get("centered", True)
        if centered is False and float(mcfg.module.get("scale", 2.0)) != 1.0:
            raise ConfigError(
                "model.net.centered=false (a score_sde_pytorch model trained on [0, 1] data) needs "
                "module.scale=1 module.shift=0"
            )
        if centered is not False and str(mcfg.sde.get("_target_", "")).endswith("VESDE"):
            log.warning("%s: score_sde_pytorch's VE configs train on [0, 1] data (data.centered=False); this model "
                        "sees [-1, 1] data. For one of their VE checkpoints add model.net.centered=false "
                        "module.scale=1 module.shift=0", path.name)
        module = build_module(mcfg)
        from scoreflow.nets.sp_checkpoint import CheckpointMismatchError, load_score_sde_checkpoint
        from scoreflow.tasks.validate import explain_sp_mismatch

        try:
            step = load_score_sde_checkpoint(ckpt, module.score_model, use_ema=use_ema).step
        except CheckpointMismatchError as e:  # the one screen of validate.score_sde_fits: counts, keys, the fix
            raise explain_sp_mismatch(e, ckpt, cfg) from None
        del ckpt
    module.eval()
    digest = weights_digest(module)  # before the move: the same bytes whatever the device
    if device is not None:
        module.to(device)
    source = build_data(mcfg)
    info = {"path": str(path.absolute()), "format": detected, "step": step, "weights": "EMA" if use_ema else "raw",
            "weights_digest": digest}
    return LoadedModel(module, mcfg, source, info)


def weights_digest(module: torch.nn.Module) -> str:
    """A BLAKE2b digest of every tensor of ``module``'s state (names, dtypes, shapes, bytes) in key order: which
    weights a result belongs to, so that a checkpoint retrained at the same path, or at the same step, is not
    taken for the one an evaluation folder was made with (about 0.3 s for DDPM++'s 62 M parameters on a CPU)."""
    return tensors_digest(module.state_dict(), "blake2b", sep=":")


def to_data_space(module: ScoreLitModule, y: Tensor) -> Tensor:
    """Model space ``y = scale x + shift`` -> data space ``x`` (``[0, 1]`` for images)."""
    return (y.float() - module.shift) / module.scale


def to_levels(module: ScoreLitModule, x: Tensor) -> Tensor:
    """Data-space samples ``x`` -> levels ``0..K-1``, the inverse of what the model was trained on: ``floor(K x)``
    for dequantized data ``(k + u) / K`` (the default), ``round((K - 1) x)`` for levels ``k / (K - 1)``
    (``module.train_input=levels``, ScoreFlow's JAX code, and score_sde_pytorch checkpoints), whose samples sit
    on the levels rather than inside their bins; clipped to ``0..K-1``."""
    K = module.num_levels
    k = (x * (K - 1)).round() if getattr(module, "train_input", "dequantized") == "levels" else (x * K).floor()
    return k.clamp(0, K - 1).to(torch.uint8 if K <= 256 else torch.int32)


def levels_to_uint8(k: Tensor, num_levels: int) -> Tensor:
    """Levels ``0..K-1`` -> 8-bit pixels ``round(255 k / (K - 1))`` (the identity for K = 256)."""
    if num_levels == 256:
        return k.to(torch.uint8)
    return (k.double() * (255.0 / (num_levels - 1))).round().clamp(0, 255).to(torch.uint8)
