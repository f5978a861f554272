"""Read and write score_sde_pytorch (SP) checkpoints for :class:`~scoreflow.nets.ncsnpp.NCSNpp`, strictly.

SP saves ``{"model": state_dict, "ema": {"decay", "num_updates", "shadow_params"}, "optimizer", "step"}``
with model keys ``module.all_modules.{i}.{rest}`` (a ``DataParallel`` wrapper around a flat module list)
plus the buffer ``module.sigmas``; ``shadow_params`` is a list over the parameters that require grad, in
the model's parameter order. SP loads with ``strict=False``, which silently keeps random weights for any
key it does not find (docs/reference.md §6). Here every missing or unexpected key and every shape mismatch is an error.

Key mapping: ``all_modules.{i}`` -> ``model.sp_module_names[i]``; ``{rest}`` is identical because the
blocks use SP's attribute names. ``sigmas`` (SP's discrete noise table, unused by continuous models) is
dropped on load and not written.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

SP_ONLY_KEYS = ("sigmas",)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model; the message lists every offending key."""


@dataclass
class SPCheckpointInfo:
    step: int
    ema_decay: float | None
    ema_num_updates: int | None
    used_ema: bool


def _net(model: nn.Module) -> nn.Module:
    """Accept the NCSNpp itself or a wrapper (e.g. ScoreModel) holding it as ``.net``."""
    if hasattr(model, "sp_module_names"):
        return model
    if hasattr(model, "net") and hasattr(model.net, "sp_module_names"):
        return model.net
    raise TypeError(f"{type(model).__name__} has no score_sde_pytorch key map (expected NCSNpp)")


def to_score_sde_state_dict(model: nn.Module) -> OrderedDict[str, Tensor]:
    """Our state dict under SP's keys (``module.all_modules.{i}.*``), in SP's order."""
    net = _net(model)
    out: OrderedDict[str, Tensor] = OrderedDict()
    for i, name in enumerate(net.sp_module_names):
        for k, v in net.get_submodule(name).state_dict().items():
            out[f"module.all_modules.{i}.{k}"] = v
    return out


def sp_key_to_ours(key: str, names: tuple[str, ...]) -> str | None:
    """``module.all_modules.{i}.{rest}`` -> ``{names[i]}.{rest}``; None for SP-only keys; others unchanged."""
    k = key.removeprefix("module.")
    if k in SP_ONLY_KEYS:
        return None
    head, _, rest = k.partition(".")
    idx, _, rest = rest.partition(".")
    if head == "all_modules" and idx.isdigit() and int(idx) < len(names):
        return f"{names[int(idx)]}.{rest}"
    return k


def from_score_sde_state_dict(state: Mapping[str, Tensor], model: nn.Module) -> OrderedDict[str, Tensor]:
    """SP keys -> our keys, keeping the checkpoint's order; keys that do not parse are kept as they are."""
    names = _net(model).sp_module_names
    mapped = ((sp_key_to_ours(k, names), v) for k, v in state.items())
    return OrderedDict((k, v) for k, v in mapped if k is not None)


def _check(ours: Mapping[str, Tensor], theirs: Mapping[str, Tensor], what: str) -> None:
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}"
        for k, v in theirs.items()
        if k in ours and v.shape != ours[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            f"{what} does not match the model:\n  missing: {missing}\n  unexpected: {unexpected}\n"
            f"  shape mismatch: {shapes}"
        )


def load_score_sde_checkpoint(
    path_or_dict: str | os.PathLike | Mapping[str, Any], model: nn.Module, *, use_ema: bool = True
) -> SPCheckpointInfo:
    """Load an SP checkpoint into ``model`` (an NCSNpp or a wrapper with ``.net``), strictly.

    Args:
        path_or_dict: a ``.pth`` path or the loaded dict.
        use_ema: take the weights from ``ema.shadow_params`` (what SP samples and evaluates with).

    Raises:
        CheckpointMismatchError: listing missing / unexpected keys, shape mismatches, or an EMA list of the
            wrong length.
    """
    ckpt = path_or_dict
    if not isinstance(ckpt, Mapping):
        ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
    net = _net(model)
    ours = net.state_dict()
    state = from_score_sde_state_dict(ckpt["model"], net)
    _check(ours, state, "checkpoint['model']")
    ema = ckpt.get("ema") or {}
    if use_ema:
        # SP's shadow list follows model.parameters() filtered by requires_grad: in checkpoint order, the
        # keys that are trainable parameters (the Fourier W is frozen there and a buffer here).
        params = {k for k, p in net.named_parameters() if p.requires_grad}
        trainable = [k for k in state if k in params]
        shadow = list(ema.get("shadow_params", []))
        if len(shadow) != len(trainable):
            raise CheckpointMismatchError(
                f"checkpoint['ema']['shadow_params'] has {len(shadow)} tensors, the model {len(trainable)} "
                "trainable parameters"
            )
        state.update(zip(trainable, shadow))
        _check(ours, state, "checkpoint['ema']")
    net.load_state_dict(state, strict=True)
    return SPCheckpointInfo(
        step=int(ckpt.get("step", 0)),
        ema_decay=ema.get("decay"),
        ema_num_updates=ema.get("num_updates"),
        used_ema=use_ema,
    )


def save_score_sde_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    ema_model: nn.Module | None = None,
    ema_decay: float = 0.9999,
    num_updates: int = 0,
    optimizer_state: Mapping[str, Any] | None = None,
    step: int = 0,
) -> dict[str, Any]:
    """Write ``model`` (and the EMA copy ``ema_model``, default ``model``) in SP's checkpoint format.

    Without ``optimizer_state`` an empty Adam state over SP's parameter list is written, so SP's
    ``restore_checkpoint`` (which loads the optimizer too) accepts the file. Returns the saved dict.
    """
    net = _net(model)
    sp_state = to_score_sde_state_dict(net)
    ema_state = to_score_sde_state_dict(ema_model if ema_model is not None else net)
    params = {k for k, p in net.named_parameters() if p.requires_grad}
    shadow = [v.detach().clone() for k, v in ema_state.items() if sp_key_to_ours(k, net.sp_module_names) in params]
    if optimizer_state is None:
        # In SP every state entry but `sigmas` is a parameter (the Fourier W too) and all are in Adam's group.
        dummies = [nn.Parameter(torch.zeros(())) for _ in sp_state]
        optimizer_state = torch.optim.Adam(dummies, lr=2e-4, betas=(0.9, 0.999), eps=1e-8).state_dict()
    saved = {
        "optimizer": dict(optimizer_state),
        "model": OrderedDict((k, v.detach().clone()) for k, v in sp_state.items()),
        "ema": {"decay": ema_decay, "num_updates": num_updates, "shadow_params": shadow},
        "step": step,
    }
    torch.save(saved, path)
    return saved
