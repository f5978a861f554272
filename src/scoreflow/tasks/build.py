"""Assembly of every component from a config, in one explicit order.

Score model: data source -> SDE -> network -> ScoreModel -> time sampler -> dequantizer -> ScoreLitModule.
Classifier (App. I.1): data source -> SDE -> network -> NoiseConditionalClassifier -> dequantizer ->
ClassifierLitModule. Used by training and by evaluate/sample, which rebuild everything from the config stored in
a checkpoint; the checks that data, dequantizer and network fit together live here, once for both.
"""

from __future__ import annotations

from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict

from scoreflow.dequantization import Dequantizer
from scoreflow.lit.classifier_module import ClassifierLitModule
from scoreflow.lit.datamodule import ScoreDataModule
from scoreflow.lit.dequant_module import DequantLitModule
from scoreflow.lit.module import ScoreLitModule
from scoreflow.nets import ScoreModel
from scoreflow.nets.classifier import NoiseConditionalClassifier
from scoreflow.tasks.errors import ConfigError
from scoreflow.tasks.validate import no_adam_settings_beside

__all__ = ["ConfigError", "build_classifier", "build_classifier_module", "build_data", "build_datamodule",
           "build_dequantizer", "build_module", "check_shapes", "to_container"]


def to_container(cfg: DictConfig | dict) -> dict[str, Any]:
    """A plain, fully resolved dict (checkpoints must not hold DictConfigs: ``weights_only`` loading)."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    return cfg


def build_data(cfg: DictConfig):
    """The data source. Training flips images inside the LightningModule with its per-step generator
    (so resume is exact), so the source's own random flip is switched off here."""
    kw = {"hflip": False} if "hflip" in cfg.data else {}
    return hydra.utils.instantiate(cfg.data, _convert_="all", **kw)


def build_module(cfg: DictConfig) -> ScoreLitModule:
    """Instantiate the SDE, network, weighting and dequantizer and wrap them in a ScoreLitModule."""
    data_cfg = cfg.data
    shape = tuple(int(s) for s in data_cfg.shape)
    num_levels = data_cfg.get("num_levels")
    sde = hydra.utils.instantiate(cfg.sde)
    eps = cfg.get("eps")
    if eps is not None and not (0.0 < float(eps) < sde.T):
        raise ConfigError(f"eps={eps} is outside (0, T={sde.T}) for sde={type(sde).__name__}")
    try:
        net = hydra.utils.instantiate(cfg.model.net, shape=shape, _convert_="all")
    except InstantiationException as e:
        cause = str(e.__cause__ or e)
        fix = None
        if "is not divisible by 2^" in cause and len(shape) == 3:  # a U-Net halves the image at each ch_mult level
            side = min(int(shape[1]), int(shape[2]))
            levels = next(k for k in range(8, 0, -1) if side % 2 ** (k - 1) == 0)
            fix = (f"model.net.ch_mult with at most {levels} levels (e.g. {[1, *[2] * (levels - 1)]}): "
                   f"{shape[1]}x{shape[2]} halves {levels - 1} times; or a data.shape divisible by a higher power "
                   "of 2 (image folders are resized to it)")
        raise ConfigError(
            f"model {cfg.model.net._target_.rsplit('.', 1)[-1]} cannot be built for data "
            f"{data_cfg._target_.rsplit('.', 1)[-1]} of shape {list(shape)}: {cause}", key="model.net.ch_mult",
            fix=fix,
        ) from e
    score_model = _wrap(cfg.model, ScoreModel, net, sde)
    time_sampler = hydra.utils.instantiate(cfg.weighting, sde=sde, eps=eps)
    dequantizer = build_dequantizer(cfg, fix="choose dequantization=uniform or variational")
    mcfg = to_container(cfg.module)
    # a learnable dequantizer must be trained on its own objective (Eq. 13), never through the DSM loss alone
    learnable = dequantizer is not None and any(p.requires_grad for p in dequantizer.parameters())
    if "dequant" in mcfg and not learnable:
        raise ConfigError(
            f"module.dequant (training of the dequantizer) was given with dequantization={type(dequantizer).__name__},"
            " which has nothing to train: use dequantization=variational"
        )
    # module._target_ names the LightningModule (a subclass of ours works); configs of earlier releases have none
    target = mcfg.pop("_target_", None) or (DequantLitModule if learnable else ScoreLitModule)
    module_cls = hydra.utils.get_class(target) if isinstance(target, str) else target
    if not issubclass(module_cls, ScoreLitModule):
        raise ConfigError(f"module._target_={target} is not a ScoreLitModule (scoreflow.lit.module)")
    if learnable != issubclass(module_cls, DequantLitModule):
        need = "scoreflow.lit.dequant_module.DequantLitModule" if learnable else "scoreflow.lit.module.ScoreLitModule"
        raise ConfigError(f"module._target_={module_cls.__name__} does not fit dequantization="
                          f"{type(dequantizer).__name__}: that needs module._target_={need}")
    module = _construct(module_cls, score_model, time_sampler, dequantizer, num_levels=num_levels, data_shape=shape,
                        seed=int(cfg.seed), **_with_optimizer(mcfg))
    module.config_dict = to_container(cfg)
    return module


def _construct(module_cls: type, *args: Any, group: str = "module", **settings: Any) -> Any:
    """``module_cls(*args, **settings)``, ``settings`` from the ``group`` config node: a key its constructor does not
    take (``+module.foo=1``, a train.py key given to train_classifier.py, ``+datamodule.foo=1``) is a usage error
    naming it, not a ``TypeError`` traceback."""
    import inspect

    params = inspect.signature(module_cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(k for k in settings if k not in params)
        if unknown:
            # the constructor's keywords that the module group sets (the rest come from other groups)
            skip = ("num_levels", "data_shape", "seed", "eps")
            known = ", ".join(k for k in list(params)[len(args):] if k not in skip)
            names = [f"{group}.{k}" for k in unknown]
            raise ConfigError(f"{', '.join(names)}: not a setting of {module_cls.__name__} (its settings: {known})",
                              key=names[0], fix=f"remove {' '.join(names)}")
    return module_cls(*args, **settings)


def _with_optimizer(mcfg: dict[str, Any]) -> dict[str, Any]:
    """``module.optimizer`` (a ``_partial_`` optimizer such as ``{_target_: torch.optim.AdamW, _partial_: true,
    weight_decay: 0.01}``) instantiated; null or absent: the built-in Adam of ``module.optim``."""
    spec = mcfg.get("optimizer")
    if spec is None:
        mcfg.pop("optimizer", None)
        return mcfg
    if not (isinstance(spec, dict) and spec.get("_target_") and spec.get("_partial_")):
        raise ConfigError(f"module.optimizer must be a Hydra partial object ({{_target_: torch.optim.AdamW, "
                          f"_partial_: true, ...}}), got {spec!r}")
    no_adam_settings_beside(mcfg.get("optim"), spec["_target_"])
    try:
        factory = hydra.utils.instantiate(spec)
    except InstantiationException as e:
        raise ConfigError(f"module.optimizer={spec.get('_target_')} cannot be built: {e.__cause__ or e}") from e
    return {**mcfg, "optimizer": factory}


def _name(target: str) -> str:
    return str(target).rsplit(".", 1)[-1]


def build_dequantizer(cfg: DictConfig, *, fix: str) -> Dequantizer | None:
    """``cfg.dequantization`` for the data of ``cfg.data``: ``None`` for ``dequantization=none``. Discrete data
    (``num_levels`` set) need a dequantizer and continuous data must have none; ``fix`` is the advice given when
    discrete data come without one."""
    data_cfg, deq_cfg = cfg.data, cfg.dequantization
    num_levels = data_cfg.get("num_levels")
    if deq_cfg.get("_target_") is None:
        if num_levels is not None:
            raise ConfigError(f"dequantization=none cannot be used with discrete data ({_name(data_cfg._target_)}, "
                              f"num_levels={num_levels}): {fix}")
        return None
    if num_levels is None:
        raise ConfigError(
            f"dequantization={_name(deq_cfg._target_)} needs discrete data, but the data "
            f"({_name(data_cfg._target_)}) is continuous (num_levels=null): use dequantization=none"
        )
    shape = tuple(int(s) for s in data_cfg.shape)
    return hydra.utils.instantiate(deq_cfg, **_deq_kwargs(deq_cfg, shape, num_levels))


def _deq_kwargs(deq_cfg: DictConfig, shape: tuple[int, ...], num_levels: int) -> dict[str, Any]:
    """Dequantizers that learn (variational) take the data shape and K; the uniform one takes nothing."""
    target = hydra.utils.get_class(deq_cfg._target_)
    import inspect

    params = inspect.signature(target.__init__).parameters
    kw: dict[str, Any] = {}
    if "shape" in params:
        kw["shape"] = shape
    if "num_levels" in params and "num_levels" not in deq_cfg:
        kw["num_levels"] = num_levels
    return kw


def build_datamodule(cfg: DictConfig, source) -> ScoreDataModule:
    return _construct(ScoreDataModule, source, group="datamodule", seed=int(cfg.seed), **to_container(cfg.datamodule))


def check_shapes(module: ScoreLitModule | ClassifierLitModule, shape: tuple[int, ...]) -> None:
    """Fail early with a clear message when the data do not fit the network (before any training): a score model
    maps data to data, a classifier maps data to one logit a class."""
    if isinstance(module, ClassifierLitModule):
        name, net, want, what = "classifier", module.classifier, (module.classifier.num_classes,), ", not logits"
    else:
        name, net, want, what = "model", module.score_model, tuple(shape), ""
    x = torch.zeros(2, *shape)
    try:
        with torch.no_grad():
            out = net(x, torch.full((2,), 0.5))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ConfigError(f"the {name} cannot take data of shape {list(shape)}: {e}") from e
    if tuple(out.shape[1:]) != want:
        raise ConfigError(f"the {name} maps data of shape {list(shape)} to {list(out.shape[1:])}{what}")


# ----------------------------------------------------------------------------- the classifier (App. I.1)
def build_classifier(cfg: DictConfig) -> NoiseConditionalClassifier:
    """SDE and network from ``cfg.sde``, ``cfg.classifier`` and ``cfg.data.shape``; ``cfg.num_classes`` must be set."""
    if cfg.get("num_classes") is None:
        raise ConfigError("num_classes is not set and no data source was given to read it from")
    shape = tuple(int(s) for s in cfg.data.shape)
    sde = hydra.utils.instantiate(cfg.sde)
    net = hydra.utils.instantiate(cfg.classifier.net, shape=shape, num_classes=int(cfg.num_classes), _convert_="all")
    return _wrap(cfg.classifier, NoiseConditionalClassifier, net, sde)


def _wrap(node: DictConfig, base: type, net: torch.nn.Module, sde) -> Any:
    """The wrapper object of ``node`` (``model``: a ScoreModel; ``classifier``: a NoiseConditionalClassifier) around
    the built ``net``: ``node._target_`` (``base`` or a subclass; configs of earlier releases have none: ``base``)
    with the node's other keys; the class's signature holds the defaults."""
    kw = {k: v for k, v in to_container(node).items() if k not in ("_target_", "net")}
    target = node.get("_target_")
    cls = hydra.utils.get_class(target) if target else base
    if not issubclass(cls, base):
        raise ConfigError(f"{node._key()}._target_={target} is not a {base.__name__}")
    return cls(net, sde, **kw)


def build_classifier_module(cfg: DictConfig, source=None) -> ClassifierLitModule:
    """The LightningModule; ``num_classes: null`` is read from ``source`` and written back into the stored config."""
    if cfg.get("num_classes") is None and source is not None:
        n = int(getattr(source, "num_classes", 0))
        if n < 2:
            raise ConfigError(f"data={_name(cfg.data._target_)} has no class labels (num_classes={n}): "
                              "a classifier needs labelled data")
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.num_classes = n
    elif source is not None and int(getattr(source, "num_classes", 0)) > int(cfg.num_classes):
        n = int(source.num_classes)  # a label >= num_classes fails inside the loss, far from the cause
        raise ConfigError(f"num_classes={cfg.num_classes}, but data={_name(cfg.data._target_)} has {n} classes "
                          f"(labels 0 .. {n - 1})", key="num_classes", value=cfg.num_classes,
                          fix=f"num_classes=null (the data's {n}) or num_classes={n}")
    classifier = build_classifier(cfg)
    dequantizer = build_dequantizer(cfg, fix="use dequantization=uniform")
    if dequantizer is not None and any(True for _ in dequantizer.parameters()):
        # a learned q(u|x) is part of a likelihood model; the classifier must see the score model's x_0
        raise ConfigError(f"dequantization={_name(cfg.dequantization._target_)} has parameters; "
                          "train classifiers with dequantization=uniform")
    mcfg = to_container(cfg.module)
    target = mcfg.pop("_target_", None) or ClassifierLitModule
    module_cls = hydra.utils.get_class(target) if isinstance(target, str) else target
    if not issubclass(module_cls, ClassifierLitModule):
        raise ConfigError(f"module._target_={target} is not a ClassifierLitModule (scoreflow.lit.classifier_module)")
    module = _construct(module_cls, classifier, dequantizer, num_levels=cfg.data.get("num_levels"), eps=cfg.get("eps"),
                        seed=int(cfg.seed), **_with_optimizer(mcfg))
    module.config_dict = to_container(cfg)
    return module
