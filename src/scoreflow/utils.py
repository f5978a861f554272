"""Small tensor helpers shared by the whole library."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor

# ``score_fn(x [B, ...], t [B]) -> [B, ...]``: the one signature of a score model throughout the library.
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def _dims(shape: torch.Size | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(n)) for n in shape) + "]"


def _describe(v: object) -> str:
    """``"[64, 2] float64"`` for a tensor, the type's name otherwise."""
    if not isinstance(v, Tensor):
        return type(v).__name__
    return f"{_dims(v.shape)} {str(v.dtype).removeprefix('torch.')}"


class ScoreShapeError(ValueError):
    """A score function returned a tensor not shaped like its ``x`` (:func:`check_score_shape`)."""


def check_score_shape(out: Tensor, x: Tensor, name: str = "score_fn") -> Tensor:
    """``out`` itself if it is shaped like ``x``, else a ``ValueError`` (:class:`ScoreShapeError`) naming both shapes.

    A score of the wrong shape (``[B, 1]`` or ``[1, D]`` for ``x [B, D]``) would broadcast silently through
    ``sigma * s + z`` or the ODE's drift into wrong numbers. ``torch.Size`` holds Python ints: the check never
    touches the device, and costs well under a microsecond.
    """
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return a tensor shaped like x, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ScoreShapeError(f"{name} returned shape {_dims(out.shape)} for x of shape {_dims(x.shape)}: "
                         "it must return a tensor shaped like x")
    return out


def call_score(score_fn: ScoreFn, x: Tensor, t: Tensor, name: str = "score_fn") -> Tensor:
    """``score_fn(x, t)``, checked by :func:`check_score_shape`.

    An exception raised inside ``score_fn`` (typically a network's "mat1 and mat2 must have the same dtype", many
    frames down) is re-raised unchanged with a note naming the shapes, dtypes and device of ``x`` and ``t``.
    """
    try:
        out = score_fn(x, t)
    except ScoreShapeError:  # a nested check (a wrapped score): its message says it all
        raise
    except Exception as e:
        called = f"{name} was called with x {_describe(x)} and t {_describe(t)}"
        if hasattr(e, "add_note") and not any(n.startswith(called) for n in getattr(e, "__notes__", ())):
            hint = ("; a network takes both in its parameters' dtype (GaussianMixture.sample defaults to float64, "
                    "the nets to float32: pass dtype=, or convert the network with .double())")
            e.add_note(f"{called} on {getattr(x, 'device', '?')}" + (hint if "type" in str(e).lower() else ""))
        raise
    return check_score_shape(out, x, name)


def shape_checked(score_fn: ScoreFn, name: str = "score_fn") -> ScoreFn:
    """``score_fn`` whose first call goes through :func:`call_score`; later calls go straight to ``score_fn``.

    For the loops of one public call (an ODE solve, a sampler's steps): the shapes of ``x`` and of the score do not
    change along them, so one check per call of the public function is enough.
    """
    checked = False

    def fn(x: Tensor, t: Tensor) -> Tensor:
        nonlocal checked
        if checked:
            return score_fn(x, t)
        out = call_score(score_fn, x, t, name)
        checked = True
        return out

    return fn


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-example ``[B]`` tensor broadcasts against ``[B, ...]``."""
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor to {ndim} dims")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def flat_dim(x: Tensor) -> int:
    """Number of data dimensions D of a batch ``[B, ...]``."""
    return x[0].numel()


def sum_except_batch(x: Tensor) -> Tensor:
    """``[B, ...] -> [B]``: sum over all but the first dim."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def mean_except_batch(x: Tensor) -> Tensor:
    """``[B, ...] -> [B]``: mean over all but the first dim."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def as_time(t: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """A scalar or ``[B]`` time as a ``[B]`` tensor with ``like``'s dtype and device."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(batch) if t.ndim == 0 else t


@contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 convolutions and matmuls in true IEEE fp32 inside the block (no TF32), restored afterwards.

    cuDNN convolutions default to TF32 on Ampere and later GPUs (10-bit mantissa): fine for training, but it
    moves a network's output by ~1e-3 relative, so likelihoods and Inception features are computed without it.
    A no-op on CPUs.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if conv is None or not hasattr(matmul, "fp32_precision"):  # torch < 2.9: the legacy flags
        old = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = old
        return
    old = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = old


def tensors_digest(tensors: Mapping[str, Tensor], algorithm: str = "blake2b", sep: str = ":") -> str:
    """Hex digest of named tensors in key order: for each, ``"<name><sep><dtype><sep><shape>;"`` then its bytes
    (any dtype, bfloat16 included; moved to the CPU). ``algorithm``: ``blake2b`` (16 bytes) or a :mod:`hashlib`
    name. The digests stored by earlier releases keep their algorithm and separator: evaluation folders'
    ``weights_digest`` (blake2b, ``:``) and flow runs' ``dequant_run.score_digest`` (sha256, ``|``)."""
    h = hashlib.blake2b(digest_size=16) if algorithm == "blake2b" else hashlib.new(algorithm)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{sep}{t.dtype}{sep}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
