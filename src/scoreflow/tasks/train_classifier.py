"""``train_classifier(cfg)``: fit a time-dependent classifier ``p_t(y | x_t)`` for class guidance (App. I.1).

Assembly order: data source -> SDE -> network -> NoiseConditionalClassifier -> dequantizer -> ClassifierLitModule.
The checkpoint stores the resolved config (SDE, data scaling, network, number of classes), so
:func:`load_classifier` rebuilds the classifier from it alone, and can check it against the score model
it is meant to guide: a classifier is only valid for the SDE and data scaling it was trained on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, open_dict

from scoreflow.lit.classifier_module import ClassifierLitModule, fixed_time_key
from scoreflow.lit.ema import ema_state_dict
from scoreflow.nets.classifier import NoiseConditionalClassifier
from scoreflow.sde import SDE
from scoreflow.tasks.build import ConfigError, build_data, build_datamodule, to_container
from scoreflow.tasks.common import checkpoint_config, load_checkpoint, make_trainer, scalar_metrics, write_metrics
from scoreflow.tasks.train import fit, run_dir

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- assembly
def build_classifier(cfg: DictConfig) -> NoiseConditionalClassifier:
    """SDE and network from ``cfg.sde``, ``cfg.classifier`` and ``cfg.data.shape``; ``cfg.num_classes`` must be set."""
    if cfg.get("num_classes") is None:
        raise ConfigError("num_classes is not set and no data source was given to read it from")
    shape = tuple(int(s) for s in cfg.data.shape)
    sde = hydra.utils.instantiate(cfg.sde)
    net = hydra.utils.instantiate(cfg.classifier.net, shape=shape, num_classes=int(cfg.num_classes), _convert_="all")
    return NoiseConditionalClassifier(
        net, sde, cfg.classifier.get("time_label", "log_sigma"), cfg.classifier.get("normalize_input", True)
    )


def build_classifier_module(cfg: DictConfig, source=None) -> ClassifierLitModule:
    """The LightningModule; ``num_classes: null`` is read from ``source`` and written back into the stored config."""
    if cfg.get("num_classes") is None and source is not None:
        n = int(getattr(source, "num_classes", 0))
        if n < 2:
            raise ConfigError(f"data={cfg.data._target_.rsplit('.', 1)[-1]} has no class labels (num_classes={n}): "
                              "a classifier needs labelled data")
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.num_classes = n
    classifier = build_classifier(cfg)
    num_levels = cfg.data.get("num_levels")
    deq_cfg = cfg.dequantization
    dequantizer = None
    if deq_cfg.get("_target_") is not None:
        if num_levels is None:
            raise ConfigError("dequantization needs discrete data, but the data is continuous (num_levels=null): "
                              "use dequantization=none")
        dequantizer = hydra.utils.instantiate(deq_cfg)
        if any(True for _ in dequantizer.parameters()):
            # a learned q(u|x) is part of a likelihood model; the classifier must see the score model's x_0
            raise ConfigError(f"dequantization={deq_cfg._target_.rsplit('.', 1)[-1]} has parameters; "
                              "train classifiers with dequantization=uniform")
    elif num_levels is not None:
        raise ConfigError(f"dequantization=none cannot be used with discrete data (num_levels={num_levels}): "
                          "use dequantization=uniform")
    module = ClassifierLitModule(classifier, dequantizer, num_levels=num_levels, eps=cfg.get("eps"),
                                 seed=int(cfg.seed), **to_container(cfg.module))
    module.config_dict = to_container(cfg)
    return module


def check_shapes(module: ClassifierLitModule, shape: tuple[int, ...]) -> None:
    """Fail early with a clear message when the data do not fit the network (before any training)."""
    x = torch.zeros(2, *shape)
    try:
        with torch.no_grad():
            out = module.classifier(x, torch.full((2,), 0.5))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ConfigError(f"the classifier cannot take data of shape {list(shape)}: {e}") from e
    if tuple(out.shape) != (2, module.classifier.num_classes):
        raise ConfigError(f"the classifier maps data of shape {list(shape)} to {list(out.shape[1:])}, not logits")


# ----------------------------------------------------------------------------- checkpoints
def classifier_module_from_checkpoint(
    path: str | Path, *, use_ema: bool = True
) -> tuple[ClassifierLitModule, DictConfig, dict[str, Any]]:
    """Rebuild the module from the config stored in the checkpoint and load its (EMA) weights strictly."""
    ckpt = load_checkpoint(path)
    kind = (ckpt.get("scoreflow") or {}).get("kind")
    if kind != "classifier":
        raise ValueError(f"{path} is not a classifier checkpoint (kind={kind!r}); train one with train_classifier.py")
    cfg = checkpoint_config(ckpt)
    module = build_classifier_module(cfg)
    state = ema_state_dict(ckpt) if use_ema and "ema" in ckpt else ckpt["state_dict"]
    module.load_state_dict(state, strict=True)
    module.batches_seen = ckpt["scoreflow"].get("batches_seen", 0)
    return module, cfg, ckpt


def _same_sde(a: SDE, b: SDE) -> bool:
    return type(a) is type(b) and vars(a) == vars(b)


def load_classifier(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    use_ema: bool = True,
    sde: SDE | None = None,
    scale: float | None = None,
    shift: float | None = None,
) -> NoiseConditionalClassifier:
    """The trained ``classifier(x_t, t) -> logits`` of a ``train_classifier`` checkpoint, in eval mode, frozen.

    The SDE it was trained with is ``.sde``. Passing the guided score model's ``sde`` / ``scale`` / ``shift``
    checks that they equal the classifier's (guidance with a classifier of another SDE or data scaling
    silently gives wrong gradients), raising a ``ConfigError`` that names both otherwise.
    """
    module, cfg, _ = classifier_module_from_checkpoint(path, use_ema=use_ema)
    clf = module.classifier
    if sde is not None and not _same_sde(sde, clf.sde):
        raise ConfigError(f"the classifier {path} was trained with {clf.sde!r}, but the score model uses {sde!r}")
    for name, want in (("scale", scale), ("shift", shift)):
        have = float(cfg.module.get(name, 2.0 if name == "scale" else -1.0))
        if want is not None and float(want) != have:
            raise ConfigError(
                f"the classifier {path} saw data with {name}={have}, but the score model uses {name}={want}"
            )
    clf.requires_grad_(False)  # guidance differentiates w.r.t. x only
    return clf.eval().to(device)


# ----------------------------------------------------------------------------- task
def train_classifier(cfg: DictConfig) -> dict[str, float]:
    """Train, write ``checkpoints/last.ckpt`` and ``metrics.json``, print accuracy per noise level; return metrics."""
    t0 = time.time()
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    source = build_data(cfg)
    module = build_classifier_module(cfg, source)
    check_shapes(module, tuple(cfg.data.shape))
    dm = build_datamodule(cfg, source)

    trainer, loggers = fit(cfg, module, dm, out, module.config_dict)
    train_time = time.time() - t0

    metrics: dict[str, float] = {"train/steps": float(trainer.global_step), "train/wall_time_s": train_time}
    metrics.update({k: v for k, v in scalar_metrics(trainer.callback_metrics).items() if k.startswith("val/")})
    if cfg.get("test", True):
        ckpt = out / "checkpoints" / "last.ckpt"
        test_module, _, _ = classifier_module_from_checkpoint(ckpt, use_ema=bool(cfg.get("use_ema", True)))
        tester = make_trainer(cfg.trainer, logger=loggers or False, enable_checkpointing=False)
        res = tester.test(test_module, datamodule=build_datamodule(cfg, source), verbose=False)
        metrics.update(scalar_metrics(res[0] if res else tester.callback_metrics))
    metrics["wall_time_s"] = time.time() - t0
    write_metrics(out / "metrics.json", metrics)
    print(accuracy_table(metrics, module, title=f"noise-conditional classifier ({out})"))
    return metrics


def accuracy_table(metrics: dict[str, float], module: ClassifierLitModule, title: str) -> str:
    """Accuracy and cross-entropy at each fixed ``t`` (test split if evaluated, else validation)."""
    split = "test" if any(k.startswith("test/") for k in metrics) else "val"
    sde = module.sde
    rows = [f"== {title} ==", f"  {split} split ({'EMA' if split == 'test' else 'raw'} weights), "
            f"{type(sde).__name__}, chance = {1 / module.classifier.num_classes:.3f}",
            f"  {'t':>6}  {'sigma_t':>8}  {'alpha_t':>8}  {'accuracy':>8}  {'CE (nats)':>9}"]
    for t in module.eval_times:
        alpha, sigma = (float(v) for v in sde.marginal(torch.tensor([t])))
        acc, ce = metrics.get(fixed_time_key(split, "acc", t)), metrics.get(fixed_time_key(split, "loss", t))
        acc_s = f"{acc:8.3f}" if acc is not None else f"{'-':>8}"
        ce_s = f"{ce:9.3f}" if ce is not None else f"{'-':>9}"
        rows.append(f"  {t:6g}  {sigma:8.4f}  {alpha:8.4f}  {acc_s}  {ce_s}")
    if f"{split}/acc" in metrics:
        rows.append(f"  t ~ U[eps, T]: accuracy {metrics[f'{split}/acc']:.3f}, CE {metrics[f'{split}/loss']:.3f} nats")
    rows.append(f"  steps {int(metrics['train/steps'])}, training {metrics['train/wall_time_s']:.0f} s, "
                f"total {metrics['wall_time_s']:.0f} s")
    return "\n".join(rows)

