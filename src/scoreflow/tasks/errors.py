"""The errors scoreflow anticipates, and how an entry point reports them: one screen, no traceback.

Every anticipated error says what is wrong, names the config key and its value, and says how to fix it.
``exit_code`` 2 is a usage error (a bad value, path or checkpoint: change the command), 1 a runtime failure
(the command was fine but the run failed, e.g. a diverging loss). :func:`classify` also maps the error
types of other modules (data sources, Lightning module, evaluation) onto these codes, by name, so that this
module imports neither torch nor Lightning and an entry point can report a bad value in well under a second.

Only ``HYDRA_FULL_ERROR=1`` shows the traceback of an anticipated error; unexpected errors keep theirs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

USAGE = 2  # the command is wrong: fix a value, a path or a checkpoint
RUNTIME = 1  # the command was fine, the run failed


class ScoreflowError(Exception):
    """Base of the anticipated errors. ``key``/``value`` name the config entry, ``fix`` says what to do."""

    exit_code = RUNTIME

    def __init__(self, message: str, *, key: str | None = None, value: Any = None, fix: str | None = None):
        super().__init__(message)
        self.message, self.key, self.value, self.fix = message, key, value, fix


class UsageError(ScoreflowError):
    exit_code = USAGE


class ConfigError(UsageError, ValueError):
    """An impossible or malformed configuration (the message names the offending choices)."""


class CheckpointError(UsageError):
    """``ckpt_path`` is missing, unreadable, of the wrong kind, or does not fit the requested run."""


class DataError(UsageError):
    """The data are missing, unreadable or corrupt (the message names the file or folder)."""


# Error types defined elsewhere (kept out of this module's imports), by class name -> (exit code, config key).
FOREIGN = {
    "DatasetNotFoundError": (USAGE, "data.root"),
    "DatasetFormatError": (USAGE, "data.root"),
    "DatasetSplitError": (USAGE, "data.val_size"),
    "CheckpointFormatError": (USAGE, "ckpt_path"),
    "CheckpointMismatchError": (USAGE, "model"),  # scoreflow.nets.sp_checkpoint: a .pth of another architecture
    "ProtocolMismatchError": (USAGE, None),
    "MissingInceptionWeightsError": (USAGE, "fid.inception_weights"),
    "NonFiniteLossError": (RUNTIME, "module.optim.lr"),
    "BatchSizeError": (USAGE, "datamodule.batch_size"),  # scoreflow.lit.datamodule: a batch above the split
}


WANDB_FIX = "run `wandb login` once (or set WANDB_API_KEY), or log offline: WANDB_MODE=offline python ..."


def _is_wandb_usage(exc: BaseException) -> bool:
    """wandb's own ``UsageError`` (e.g. "No API key configured"), raised when the logger starts."""
    return any(cls.__name__ == "UsageError" and cls.__module__.startswith("wandb") for cls in type(exc).__mro__)


def foreign_fix(exc: BaseException) -> str | None:
    """The fix of a classified error type defined elsewhere (it has no ``fix`` attribute of ours)."""
    if type(exc).__name__ in ("CheckpointMismatchError", "BatchSizeError", "DatasetShapeError"):  # their own fix
        return getattr(exc, "fix", None)
    if type(exc).__name__ == "DatasetSplitError":
        return "hold out fewer examples: data.val_size=<N> data.test_size=<M> (their sum below the data's size)"
    if _is_wandb_usage(exc):
        return WANDB_FIX if "api key" in str(exc).lower() else "see W&B's message above, or use logger=csv"
    return None


CONF = Path(__file__).resolve().parents[3] / "conf"
_NONE = object()


def options_with_key(key: str, conf: Path = CONF) -> list[str]:
    """``group=option`` for every option file ``conf/<group>/<option>.yaml`` that defines the rest of the dotted
    ``key`` (``sampler.lam`` -> ``["sampler=lambda_family"]``): where a key unknown to the chosen option lives."""
    group, _, rest = key.partition(".")
    folder = conf / group
    if not rest or not group or not folder.is_dir():
        return []
    import yaml

    found = []
    for f in sorted(folder.glob("*.yaml")):
        try:
            node: Any = yaml.safe_load(f.read_text())
        except Exception:  # noqa: BLE001 - an unreadable option file defines nothing
            continue
        for part in rest.split("."):
            node = node.get(part, _NONE) if isinstance(node, dict) else _NONE
        if node is not _NONE:
            found.append(f"{group}={f.stem}")
    return found


def default_groups(config_name: str, conf: Path = CONF) -> set[str]:
    """The config groups ``conf/<config_name>.yaml`` chooses an option of in its defaults list (``sampler: pc``)."""
    import yaml

    try:
        defaults = (yaml.safe_load((conf / f"{config_name}.yaml").read_text()) or {}).get("defaults") or []
    except Exception:  # noqa: BLE001 - no such config: no groups
        return set()
    names = (next(iter(d)) for d in defaults if isinstance(d, dict) and len(d) == 1)
    return {n.removeprefix("override ").removeprefix("optional ").split("@")[0].strip() for n in names}


def unknown_key_fix(key: str, value: Any = None, config_name: str | None = None) -> str | None:
    """The fix of an unknown ``key`` that another option of its config group has: choose that option
    (``sampler=pc sampler.lam=0.5`` -> ``sampler=lambda_family sampler.lam=0.5``); None when no option has it, or
    when ``config_name`` (``sample`` for sample.py) has no such group to choose from."""
    group, _, rest = key.partition(".")
    if config_name is not None and group not in default_groups(config_name):
        return None
    options = options_with_key(key)
    if not options:
        return None
    shown = " or ".join(options[:3]) + (" or ..." if len(options) > 3 else "")
    return (f"{rest} is a key of {shown}, not of the {group} chosen: "
            f"{options[0]} {key}={'<value>' if value is None else value}")


def from_instantiation(exc: BaseException, command: str = "train.py") -> ConfigError | None:
    """Hydra's ``InstantiationException`` around a ``ValueError`` or ``TypeError`` of a scoreflow class's constructor:
    a config value it refuses (``data.name=checkerboad``), or a key it does not take (``+module.foo=1``), as the
    usage error it is, naming the config key (Hydra's ``full_key``) instead of Hydra's "Error executing job" with
    exit code 1. ``None`` for anything else."""
    cause = exc.__cause__
    text = str(exc)
    if type(exc).__name__ != "InstantiationException" or not isinstance(cause, (ValueError, TypeError)):
        return None
    target = re.search(r"target '([\w.]+)'", text)
    if target is None:
        return None
    full_key = re.search(r"full_key: (\S+)", text)
    key = full_key.group(1) if full_key else None
    extra = re.search(r"unexpected keyword argument '(\w+)'", str(cause)) if isinstance(cause, TypeError) else None
    if not extra and not target.group(1).startswith("scoreflow."):
        return None  # another library's value error may be a bug of ours: its traceback stays
    if extra:  # any class (+trainer.foo=1: Lightning's Trainer)
        name = f"{key}.{extra.group(1)}" if key else extra.group(1)
        return ConfigError(f"{name}: not a setting of {target.group(1).rsplit('.', 1)[-1]}", key=name,
                           fix=f"remove {name} (python {command} --cfg job lists the settings)")
    if isinstance(cause, TypeError):
        return None  # a bug rather than a value: keep its traceback
    own_key = getattr(cause, "config_key", None)  # a constructor's error that names its key (data.shape) and fix
    if own_key:
        return ConfigError(str(cause), key=own_key, fix=getattr(cause, "fix", None))
    return ConfigError(f"{key or target.group(1)}: {cause}", key=key)


def classify(exc: BaseException) -> tuple[int, str | None] | None:
    """``(exit code, config key)`` of an anticipated error, or ``None`` for an unexpected one."""
    if isinstance(exc, ScoreflowError):
        return exc.exit_code, exc.key
    if _is_wandb_usage(exc):
        return USAGE, "logger"
    for cls in type(exc).__mro__:
        if cls.__name__ in FOREIGN:
            code, key = FOREIGN[cls.__name__]
            return code, getattr(exc, "config_key", None) or key  # the raising source may name its own key
    return None


def full_error() -> bool:
    """``HYDRA_FULL_ERROR=1`` (or ``SCOREFLOW_FULL_ERROR=1``): show tracebacks instead of one screen."""
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HYDRA_FULL_ERROR", "SCOREFLOW_FULL_ERROR"))


def format_error(exc: BaseException, command: str, run_dir: str | None = None) -> str:
    """The one screen an anticipated error prints (at most ~12 lines for any message of ours)."""
    code, key = classify(exc) or (RUNTIME, None)
    kind = "usage error" if code == USAGE else "run failed"
    message = exc.message if isinstance(exc, ScoreflowError) else str(exc)
    lines = [f"[scoreflow] {command}: {kind}: {_first_lines(message, 8)}"]
    if key is not None:
        value = getattr(exc, "value", None)
        lines.append(f"  config key: {key}" + (f" = {value!r}" if value is not None else ""))
    fix = getattr(exc, "fix", None) if isinstance(exc, ScoreflowError) else foreign_fix(exc)
    if isinstance(exc, ConfigError) and exc.message.startswith("unknown config key") and exc.key:
        # an unknown key under a config group (entry.explain_composition's error): the option that has it, rather
        # than a close spelling (`sampler.lam` is close to `sampler`, which would not help)
        fix = unknown_key_fix(exc.key, exc.value, Path(command).stem) or fix
    if fix:
        lines.append(f"  fix: {fix}")
    if run_dir:
        lines.append(f"  run folder: {run_dir}")
    lines.append("  (HYDRA_FULL_ERROR=1 shows the traceback)")
    return "\n".join(lines)


def _first_lines(text: str, n: int) -> str:
    lines = [ln if len(ln) <= 400 else ln[:400] + " ..." for ln in str(text).strip().splitlines()] or [""]
    if len(lines) > n:
        lines = [*lines[: n - 1], f"... ({len(lines) - n + 1} more lines)"]
    return "\n".join(lines)
