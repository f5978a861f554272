"""Parameters and forward FLOPs of a model config: ``python -m scoreflow.nets.summary model=ddpmpp data=cifar10``.

Arguments are ``key=value``: ``model`` (a ``conf/model`` name), and either ``data`` (a ``conf/data`` name whose
``shape`` is used) or ``shape=C,H,W`` (default 3,32,32); ``batch`` (default 1) and ``conf_dir``. FLOPs are
counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add; convolutions, matmuls, attention).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:  # Hydra is imported inside the functions that compose configs: scoreflow.nets stays Hydra-free
    from omegaconf import DictConfig

DEFAULT_CONF = Path(__file__).resolve().parents[3] / "conf"


def config_dir(conf_dir: str | Path | None = None) -> Path:
    """``conf_dir``, else the repository's ``conf/`` (an editable install), else ``./conf``."""
    return Path(conf_dir) if conf_dir else DEFAULT_CONF if DEFAULT_CONF.is_dir() else Path.cwd() / "conf"


def compose_model_config(model: str, data: str | None = None, conf_dir: str | Path | None = None) -> DictConfig:
    """Compose ``{model: conf/model/<model>.yaml, data: conf/data/<data>.yaml}`` with Hydra's compose API."""
    from hydra import compose, initialize_config_dir

    conf = config_dir(conf_dir)
    overrides = [f"+model={model}"] + ([f"+data={data}"] if data else [])
    with initialize_config_dir(config_dir=str(conf.resolve()), version_base=None):
        return compose(overrides=overrides)


def build_net(model_cfg: DictConfig, shape: tuple[int, ...]) -> nn.Module:
    """Instantiate ``model_cfg.net`` for one example of ``shape``, as the training task does."""
    import hydra

    return hydra.utils.instantiate(model_cfg.net, shape=tuple(shape))


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def forward_flops(net: nn.Module, shape: tuple[int, ...], batch: int = 1, backward: bool = False) -> int:
    """FLOPs of one forward (and backward) pass on a batch of ``batch`` examples of ``shape``."""
    x = torch.randn(batch, *shape, requires_grad=backward)
    label = torch.full((batch,), 500.0)
    with FlopCounterMode(display=False) as counter:
        out = net(x, label)
        if backward:
            out.square().sum().backward()
    return counter.get_total_flops()


USAGE = ("usage: python -m scoreflow.nets.summary model=NAME [data=NAME | shape=C,H,W] [batch=N] [conf_dir=DIR]\n"
         "  e.g. model=ddpmpp data=cifar10: parameters and forward GFLOPs per image (conf/model, conf/data names)")


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(args) - {"model", "data", "shape", "batch", "conf_dir"})
    if bad or unknown or "model" not in args:
        what = f"not key=value: {bad}" if bad else f"unknown keys: {unknown}" if unknown else "model= is required"
        raise SystemExit(f"{USAGE}\n{what}")
    conf = config_dir(args.get("conf_dir"))
    for group in ("model", "data"):
        options = sorted(p.stem for p in (conf / group).glob("*.yaml"))
        if group in args and args[group] not in options:
            raise SystemExit(f"{USAGE}\n{group}={args[group]} is not in {conf / group}: {', '.join(options)}")
    cfg = compose_model_config(args["model"], args.get("data"), args.get("conf_dir"))
    if "shape" in args:
        shape = tuple(int(s) for s in args["shape"].split(","))
    elif "data" in cfg and "shape" in cfg.data:
        shape = tuple(int(s) for s in cfg.data.shape)
    else:
        shape = (3, 32, 32)
    batch = int(args.get("batch", 1))
    torch.manual_seed(0)
    net = build_net(cfg.model, shape).eval()
    n = count_params(net)
    with torch.no_grad():
        flops = forward_flops(net, shape, batch) / batch
    print(f"model: {args['model']} ({cfg.model.net._target_})  shape: {list(shape)}")
    from omegaconf import OmegaConf

    print(f"config: {OmegaConf.to_container(cfg.model.net)}")
    print(f"params: {n}")
    print(f"params (M): {n / 1e6:.2f}")
    print(f"forward GFLOPs per image: {flops / 1e9:.4f}")
    return {"params": n, "gflops": flops / 1e9}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
