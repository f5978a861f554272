"""A quiet, informative console: each log line once, known noise filtered, the config as a tree.

* Lightning's ``lightning`` logger prints through its own handler *and* propagates to the root logger that
  Hydra configures, so every Lightning INFO line appeared twice (plain and timestamped). Its handlers are
  removed and its records go through Hydra's handlers only (console and the run's ``<task>.log``).
* Known noise is dropped: Lightning's litlogger advert, the TPU line, repeated lines of the test-phase
  Trainer (a second "GPU available"), the ``_pytree`` deprecation and the ModelCheckpoint warning about
  manual optimization (scoreflow saves after the optimizer step on purpose: the checkpoint is the state a
  resume continues from), and ModelCheckpoint's note, on ``ckpt_path=`` of another run's checkpoint, that its
  best-k bookkeeping is not reloaded (scoreflow's checkpoints are ``last.ckpt``, written whatever the score).
* :func:`echo` prints a block (results table, errors) and writes it to the run's log file too.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

NOISY_LOG_LINES = (
    "litlogger",
    "TPU available",
    "`weights_only` was not set",
    "LOCAL_RANK:",
    "You are using a CUDA device",
)
NOISY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",
    r"Using ModelCheckpoint with manual optimization.*",
    r".*does not have many workers which may be a bottleneck.*",
    r"The number of training batches .* is smaller than the logging interval.*",
    r".*Checkpoint directory .* exists and is not empty.*",
    r"Converting a tensor with requires_grad=True to a scalar.*",  # float(loss) in the non-finite-loss message
    # ckpt_path= of another run's checkpoint: ModelCheckpoint's best-k bookkeeping (scoreflow keeps last.ckpt only)
    r"The dirpath has changed from .* therefore `best_model_score`, .* won't be reloaded.*",
    # DDP: validation and test values are gathered from every rank before they are logged (ScoreLitModule), so
    # Lightning's advice to reduce them again with sync_dist would average equal numbers
    r"It is recommended to use `self.log\('(val|test)/.*sync_dist=True\)`.*",
)


SPAWN_WARNING_PREFIXES = ("It is recommended to use `self.log('val/", "It is recommended to use `self.log('test/")


class LightningNoise(logging.Filter):
    """Drops known-noise Lightning records and any Lightning line already shown once in this process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("lightning"):
            return True
        msg = record.getMessage()
        if any(n in msg for n in NOISY_LOG_LINES):
            return False
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True



def quiet_console() -> None:
    """Install the filters above (idempotent). Imports Lightning, so call it after the cheap checks."""
    import lightning  # noqa: F401 - its import adds the handler removed below
    import lightning.pytorch  # noqa: F401

    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # processes started by strategy=ddp_spawn are fresh interpreters: they take filters from PYTHONWARNINGS only
    # (a message prefix each, no regex; no ',' or ':' in them)
    spawned = [f"ignore:{prefix}" for prefix in SPAWN_WARNING_PREFIXES]
    have = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    os.environ["PYTHONWARNINGS"] = ",".join(have + [w for w in spawned if w not in have])
    root = logging.getLogger()
    if not root.handlers:  # not under Hydra: nothing prints twice
        return
    for name in [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "lightning"]:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True
    for h in root.handlers:  # one filter per handler: each keeps its own "already shown" set
        if not any(isinstance(f, LightningNoise) for f in h.filters):
            h.addFilter(LightningNoise())


def hydra_config() -> Any:
    """This Hydra job's config (``HydraConfig.get()``: runtime, overrides, mode), or ``None`` when the config was
    composed outside a Hydra job (tests, library callers)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except (ValueError, ImportError):
        return None


def run_folder() -> str | None:
    hc = hydra_config()
    return None if hc is None else hc.runtime.output_dir


def hydra_choices() -> dict[str, str]:
    """The config-group options this Hydra job composed (``hydra.runtime.choices``: ``{"model": "ddpmpp_deep",
    "experiment": "table2/cifar10_vp_lw_is", ...}``; groups left empty omitted); ``{}`` outside a Hydra job."""
    hc = hydra_config()
    choices = {} if hc is None else hc.runtime.choices
    return {str(k): str(v) for k, v in (choices or {}).items() if v is not None and not str(k).startswith("hydra/")}


def is_multirun() -> bool:
    from hydra.types import RunMode

    hc = hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def to_log_file(text: str) -> None:
    """Append ``text`` to the run's log file(s) (Hydra's ``<task>.log``), not to the console."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and h.stream is not None:
            h.acquire()
            try:
                h.stream.write(text.rstrip("\n") + "\n")
                h.flush()
            finally:
                h.release()


def echo(text: str) -> None:
    """Print ``text`` and write it to the run's log file."""
    print(text, flush=True)
    to_log_file(text)


ORDER = ("data", "model", "sde", "weighting", "dequantization", "module", "datamodule", "trainer", "callbacks",
         "logger", "extras", "paths")


def config_tree(cfg: DictConfig) -> str:
    """The resolved config as a tree (one branch per group, YAML leaves), as plain text."""
    from rich.console import Console
    from rich.text import Text
    from rich.tree import Tree

    tree = Tree("config")
    keys = [k for k in ORDER if k in cfg] + [k for k in cfg if k not in ORDER]
    scalars = {}
    for k in keys:
        node = cfg._get_node(k)
        if isinstance(node, DictConfig):
            tree.add(str(k)).add(Text(_yaml(_resolved(node))))
        else:
            scalars[k] = _resolved_value(cfg, k)
    if scalars:
        tree.add("(top level)").add(Text(_yaml(scalars)))
    console = Console(file=None, width=120, force_terminal=False, color_system=None, record=True)
    with console.capture() as cap:
        console.print(tree)
    return cap.get()


def _yaml(d: Any) -> str:
    """Block YAML with short lists on one line (``shape: [1, 8, 8]``)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def flow_list(dumper: yaml.SafeDumper, v: list) -> yaml.Node:
        return dumper.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)

    Dumper.add_representer(list, flow_list)
    return yaml.dump(d, Dumper=Dumper, default_flow_style=False, sort_keys=False, width=1000).rstrip()


def _resolved(node: DictConfig) -> Any:
    try:
        return OmegaConf.to_container(node, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's runtime can resolve: show it unresolved
        return OmegaConf.to_container(node, resolve=False)


def _resolved_value(cfg: DictConfig, key: str) -> Any:
    try:
        v = cfg[key]
        return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    except Exception:  # noqa: BLE001
        return cfg._get_node(key)._value()


def print_config(cfg: DictConfig, out: str | None) -> None:
    """Print the config tree once, and the run folder, at the start of a run; also into the run's log."""
    text = config_tree(cfg)
    sys.stdout.write(text)
    sys.stdout.flush()
    to_log_file(text)
    if out:
        echo(f"[scoreflow] run folder: {Path(out)}")
