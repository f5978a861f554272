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
    """A checkpoint does not fit the model.

    ``missing`` / ``unexpected`` / ``shapes`` hold every offending key (in our names); the message counts them and
    shows the first :attr:`SHOWN` of each, so that it fits on one screen. Entry points report it as a usage error
    (:mod:`scoreflow.tasks.errors`) with ``note`` (what the checkpoint holds) and ``fix`` (the model to choose),
    which :func:`scoreflow.tasks.validate.explain_sp_mismatch` fills in from the checkpoint's own tensors.
    """

    SHOWN = 3

    def __init__(self, what: str, *, missing: list[str] | None = None, unexpected: list[str] | None = None,
                 shapes: list[str] | None = None, detail: str | None = None):
        super().__init__(what)
        self.what, self.detail = what, detail
        self.missing, self.unexpected, self.shapes = list(missing or []), list(unexpected or []), list(shapes or [])
        self.note: str | None = None
        self.fix: str | None = None
        self.key: str | None = "model"

    def __str__(self) -> str:
        if self.detail is not None:
            head = f"{self.what} {self.detail}"
        else:
            counts = [f"{len(self.missing)} missing", f"{len(self.unexpected)} unexpected",
                      f"{len(self.shapes)} of another shape"]
            head = f"{self.what} does not match the model: keys {', '.join(counts)}"
        lines = [head]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("shape mismatch", self.shapes)):
            if keys:
                more = f", ... ({len(keys) - self.SHOWN} more)" if len(keys) > self.SHOWN else ""
                lines.append(f"  {name}: {', '.join(keys[: self.SHOWN])}{more}")
        if self.note:
            lines.append(f"  {self.note}")
        return "\n".join(lines)


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
        raise CheckpointMismatchError(what, missing=missing, unexpected=unexpected, shapes=shapes)


def check_score_sde_checkpoint(
    ckpt: Mapping[str, Any], model: nn.Module, *, use_ema: bool = True, what: str = "checkpoint"
) -> OrderedDict[str, Tensor]:
    """The state dict (our keys) that :func:`load_score_sde_checkpoint` would load into ``model``, after checking
    every key and shape. ``model`` may live on the ``meta`` device: only names and shapes are compared.

    Raises:
        CheckpointMismatchError: missing / unexpected keys, shape mismatches, or an EMA list of the wrong length.
    """
    net = _net(model)
    ours = net.state_dict()
    state = from_score_sde_state_dict(ckpt["model"], net)
    _check(ours, state, f"{what}['model']")
    if use_ema:
        # SP's shadow list follows model.parameters() filtered by requires_grad: in checkpoint order, the
        # keys that are trainable parameters (the Fourier W is frozen there and a buffer here).
        params = {k for k, p in net.named_parameters() if p.requires_grad}
        trainable = [k for k in state if k in params]
        shadow = list((ckpt.get("ema") or {}).get("shadow_params", []))
        if len(shadow) != len(trainable):
            raise CheckpointMismatchError(
                f"{what}['ema']['shadow_params']",
                detail=f"has {len(shadow)} tensors, the model {len(trainable)} trainable parameters",
            )
        state.update(zip(trainable, shadow))
        _check(ours, state, f"{what}['ema']")
    return state


def load_score_sde_checkpoint(
    path_or_dict: str | os.PathLike | Mapping[str, Any], model: nn.Module, *, use_ema: bool = True
) -> SPCheckpointInfo:
    """Load an SP checkpoint into ``model`` (an NCSNpp or a wrapper with ``.net``), strictly.

    Args:
        path_or_dict: a ``.pth`` path or the loaded dict.
        use_ema: take the weights from ``ema.shadow_params`` (what SP samples and evaluates with).

    Raises:
        CheckpointMismatchError: listing missing / unexpected keys, shape mismatches, or an EMA list of the
            wrong length (:func:`check_score_sde_checkpoint`).
    """
    ckpt = path_or_dict
    if not isinstance(ckpt, Mapping):
        ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
    net = _net(model)
    state = check_score_sde_checkpoint(ckpt, net, use_ema=use_ema)
    net.load_state_dict(state, strict=True)
    ema = ckpt.get("ema") or {}
    return SPCheckpointInfo(
        step=int(ckpt.get("step", 0)),
        ema_decay=ema.get("decay"),
        ema_num_updates=ema.get("num_updates"),
        used_ema=use_ema,
    )


def sp_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The NCSNpp settings an SP state dict (``checkpoint["model"]``) was written with, read from its tensors.

    Returns what can be read (absent keys could not): ``channels`` (data channels), ``nf``, ``ch_mult``,
    ``num_res_blocks``, ``attn_levels`` (indices of the resolutions with attention, 0 = full size),
    ``embedding_type``, ``conditional``, ``progressive_input``, ``fir`` (only where an input-pyramid conv shows it)
    and ``progressive`` (``none`` only). Used to tell a user which ``model=`` fits a checkpoint.
    """
    modules: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, v in state.items():
        k = key.removeprefix("module.")
        head, _, rest = k.partition(".")
        idx, _, name = rest.partition(".")
        if head == "all_modules" and idx.isdigit() and name and hasattr(v, "shape"):
            modules.setdefault(int(idx), {})[name] = tuple(v.shape)
    kinds: list[tuple[str, dict[str, tuple[int, ...]]]] = []
    for i in sorted(modules):
        m = modules[i]
        if set(m) == {"W"}:
            kind = "fourier"
        elif set(m) == {"weight", "bias"}:
            kind = {1: "norm", 2: "dense", 4: "conv"}.get(len(m["weight"]), "other")
        elif "Conv_1.weight" in m and "Conv_0.weight" in m:
            kind = "res"
        elif "NIN_0.W" in m:
            kind = "attn"
        elif "Conv2d_0.weight" in m:
            kind = "pyramid_fir"
        elif set(m) == {"Conv_0.weight", "Conv_0.bias"}:
            kind = "pyramid_conv" if m["Conv_0.weight"][-1] == 3 else "combine"
        else:
            kind = "other"
        kinds.append((kind, m))
    out: dict[str, Any] = {}
    if not kinds:
        return out
    out["embedding_type"] = "fourier" if kinds[0][0] == "fourier" else "positional"
    first_conv = next((j for j, (k, _) in enumerate(kinds) if k == "conv"), None)
    if first_conv is None:
        return out
    out["conditional"] = any(k == "dense" for k, _ in kinds[:first_conv])
    out["nf"], out["channels"] = kinds[first_conv][1]["weight"][0], kinds[first_conv][1]["weight"][1]
    res = [j for j, (k, _) in enumerate(kinds) if k == "res"]
    shape = {j: kinds[j][1]["Conv_0.weight"] for j in res}
    resample = [j for j in res if "Conv_2.weight" in kinds[j][1] and shape[j][0] == shape[j][1]]
    if len(resample) % 2:
        return out
    levels = len(resample) // 2 + 1
    nrb = res.index(resample[0]) if resample else (len(res) - 3) // 2
    if nrb < 1 or len(res) != 2 * levels * nrb + 3 * levels:  # encoder, 2 mid blocks, decoder (one more each)
        return out
    first = [res[i * (nrb + 1)] for i in range(levels)]  # the first res block of each encoder level
    nf = out["nf"]
    if any(shape[j][0] % nf for j in first):
        return out
    out["num_res_blocks"] = nrb
    out["ch_mult"] = [shape[j][0] // nf for j in first]
    out["attn_levels"] = [i for i, j in enumerate(first) if j + 1 < len(kinds) and kinds[j + 1][0] == "attn"]
    after = [kinds[j + 1][0] if j + 1 < len(kinds) else "" for j in resample[: levels - 1]]  # encoder resamples
    if after and all(a == "pyramid_fir" for a in after):
        out["progressive_input"], out["fir"] = "residual", True
    elif after and all(a == "pyramid_conv" for a in after):
        out["progressive_input"], out["fir"] = "residual", False
    elif after and all(a == "combine" for a in after):
        out["progressive_input"] = "input_skip"
    elif all(a in ("res", "attn") for a in after):
        out["progressive_input"] = "none"
    if sum(k == "norm" for k, _ in kinds) == 1:  # only norm_out: no output pyramid
        out["progressive"] = "none"
    return out


def describe_sp_architecture(arch: Mapping[str, Any], height: int | None = None) -> str:
    """:func:`sp_architecture` in words, e.g. ``NCSN++-style (Fourier features), nf=16, ch_mult=[1, 2], ...``."""
    if not arch:
        return "an architecture not recognised as NCSN++ / DDPM++"
    parts = ["NCSN++-style (Fourier features)" if arch.get("embedding_type") == "fourier"
             else "DDPM++-style (positional embedding)"]
    for k in ("nf", "ch_mult", "num_res_blocks"):
        if k in arch:
            parts.append(f"{k}={arch[k]}")
    if "attn_levels" in arch:
        res = [height // 2**i for i in arch["attn_levels"]] if height else None
        parts.append(f"attn_resolutions={res}" if res is not None else f"attention at levels {arch['attn_levels']}")
    if arch.get("progressive_input") not in (None, "none"):
        parts.append(f"progressive_input={arch['progressive_input']}")
    if "channels" in arch:
        parts.append(f"{arch['channels']} input channel{'s' * (arch['channels'] != 1)}")
    return ", ".join(parts)


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
