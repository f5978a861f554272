"""Assembly of every component from a config, in one explicit order.

data source -> SDE -> network -> ScoreModel -> time sampler -> dequantizer -> ScoreLitModule.
Used by training and by evaluate/sample, which rebuild everything from the config stored in a checkpoint.
"""

from __future__ import annotations

from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from scoreflow.lit.datamodule import ScoreDataModule
from scoreflow.lit.dequant_module import DequantLitModule
from scoreflow.lit.module import ScoreLitModule
from scoreflow.nets import ScoreModel
from scoreflow.tasks.errors import ConfigError

__all__ = ["ConfigError", "build_data", "build_datamodule", "build_module", "check_shapes", "to_container"]


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
        raise ConfigError(
            f"model {cfg.model.net._target_.rsplit('.', 1)[-1]} cannot be built for data "
            f"{data_cfg._target_.rsplit('.', 1)[-1]} of shape {list(shape)}: {e.__cause__ or e}"
        ) from e
    score_model = ScoreModel(net, sde, cfg.model.get("parametrization", "eps"), cfg.model.get("time_label", "t999"))
    time_sampler = hydra.utils.instantiate(cfg.weighting, sde=sde, eps=eps)
    deq_cfg = cfg.dequantization
    dequantizer = None
    if deq_cfg.get("_target_") is not None:
        if num_levels is None:
            raise ConfigError(
                f"dequantization={deq_cfg._target_.rsplit('.', 1)[-1]} needs discrete data, but the data "
                f"({data_cfg._target_.rsplit('.', 1)[-1]}) is continuous (num_levels=null): use dequantization=none"
            )
        dequantizer = hydra.utils.instantiate(deq_cfg, **_deq_kwargs(deq_cfg, shape, num_levels))
    elif num_levels is not None:
        raise ConfigError(
            f"dequantization=none cannot be used with discrete data ({data_cfg._target_.rsplit('.', 1)[-1]}, "
            f"num_levels={num_levels}): choose dequantization=uniform or variational"
        )
    mcfg = to_container(cfg.module)
    # a learnable dequantizer must be trained on its own objective (Eq. 13), never through the DSM loss alone
    learnable = dequantizer is not None and any(p.requires_grad for p in dequantizer.parameters())
    if "dequant" in mcfg and not learnable:
        raise ConfigError(
            f"module.dequant (training of the dequantizer) was given with dequantization={type(dequantizer).__name__},"
            " which has nothing to train: use dequantization=variational"
        )
    module_cls = DequantLitModule if learnable else ScoreLitModule
    module = module_cls(
        score_model, time_sampler, dequantizer, num_levels=num_levels, data_shape=shape, seed=int(cfg.seed), **mcfg
    )
    module.config_dict = to_container(cfg)
    return module


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
    return ScoreDataModule(source, seed=int(cfg.seed), **to_container(cfg.datamodule))


def check_shapes(module: ScoreLitModule, source_shape: tuple[int, ...]) -> None:
    """Fail early with a clear message when the data do not fit the model (before any training)."""
    x = torch.zeros(2, *source_shape)
    try:
        with torch.no_grad():
            out = module.score_model(x, torch.full((2,), 0.5))
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise ConfigError(f"the model cannot take data of shape {list(source_shape)}: {e}") from e
    if out.shape != x.shape:
        raise ConfigError(f"the model maps data of shape {list(source_shape)} to {list(out.shape[1:])}")
