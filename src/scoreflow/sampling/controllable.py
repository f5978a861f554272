"""Controllable generation with an unconditional score (Song et al. 2021, Sec. 5, App. I).

- Conditional scores (Eq. 49 / Eq. 50): ``grad log p_t(x | y) = s(x, t) + grad_x log p_t(y | x)``;
  :func:`guided_score` takes any differentiable ``log p_t(y | x)``, :func:`classifier_guided_score` a
  time-dependent classifier ``classifier(x [B, ...], t [B]) -> logits [B, K]`` (App. I.1).
- Imputation / inpainting (App. I.2): PC sampling where, after every update, the known entries are
  replaced by a fresh sample of ``p_0t(x_t | y) = N(alpha_t y, sigma_t^2 I)``. Masks use 1 = known.
- Colorization (App. I.3): imputation after an orthogonal change of colour basis whose first axis is
  the grey level; orthogonality keeps the Wiener process standard, so the same SDE applies there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from scoreflow.sampling.noise import NoiseSource
from scoreflow.sampling.pc import SampleResult, pc_sample
from scoreflow.sde import SDE
from scoreflow.utils import ScoreFn, check_score_shape

Classifier = Callable[[Tensor, Tensor], Tensor]
"""``classifier(x [B, ...], t [B]) -> logits [B, K]`` of a time-dependent classifier ``p_t(y | x)``."""

# App. I.3, with exact entries (the paper prints them rounded to 3 digits, which is not quite orthogonal):
# column 0 is the grey axis (1, 1, 1) / sqrt(3); columns 1-2 span the colour plane orthogonal to it.
_r3, _r6, _r2 = 1 / math.sqrt(3), 1 / math.sqrt(6), 1 / math.sqrt(2)
COLOR_DECOUPLE = torch.tensor(
    [[_r3, -2 * _r6, 0.0], [_r3, _r6, _r2], [_r3, _r6, -_r2]],
    dtype=torch.float64,
)


# ----------------------------------------------------------------------------- conditional scores
def guided_score(score_fn: ScoreFn, log_likelihood: Callable[[Tensor, Tensor], Tensor], scale: float = 1.0) -> ScoreFn:
    """``s(x, t) + scale * grad_x log_likelihood(x, t)`` (Eq. 49; Eq. 50 for a general inverse problem).

    ``log_likelihood(x [B, ...], t [B]) -> [B]`` is ``log p_t(y | x)`` for a fixed ``y``; examples must not
    interact in it (the gradient is taken of its sum). Works inside ``torch.no_grad()`` samplers.
    """

    def fn(x: Tensor, t: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(log_likelihood(xg, t).sum(), xg)
        return check_score_shape(score_fn(x, t), x) + scale * grad.to(x.dtype)  # no broadcast of a wrong shape

    return fn


def classifier_guided_score(score_fn: ScoreFn, classifier: Classifier, y: int | Tensor, scale: float = 1.0) -> ScoreFn:
    """Class-conditional score ``s + scale * grad_x log p_t(y | x)`` from a time-dependent classifier (App. I.1).

    ``y`` is one class for the whole batch or ``[B]`` labels; ``scale = 1`` is the exact conditional score
    when the classifier is exact, ``scale > 1`` sharpens it (classifier guidance).
    """

    labels_in = torch.as_tensor(y)
    if labels_in.is_floating_point() or labels_in.is_complex() or labels_in.dtype == torch.bool \
            or labels_in.ndim > 1 or (labels_in.numel() and int(labels_in.min()) < 0):
        raise ValueError(f"classifier_guided_score: y must be a class index >= 0 or [B] of them (integers), got "
                         f"{labels_in.dtype} of shape {list(labels_in.shape)}"
                         + (f" with values {labels_in.flatten()[:4].tolist()}" if labels_in.numel() else ""))

    top = int(labels_in.max()) if labels_in.numel() else 0  # checked against the classifier's output at the first call

    def log_p_y(x: Tensor, t: Tensor) -> Tensor:
        logp = classifier(x, t).log_softmax(dim=-1)  # [B, K]
        if top >= logp.shape[-1]:  # gather would fail with a CUDA assert or an index error far from the cause
            raise ValueError(f"classifier_guided_score: label {top} but the classifier has {logp.shape[-1]} classes "
                             f"(0..{logp.shape[-1] - 1})")
        if labels_in.numel() not in (1, x.shape[0]):  # expand would fail with a message about tensor sizes
            raise ValueError(f"classifier_guided_score: {labels_in.numel()} labels for a batch of {x.shape[0]}: "
                             "pass one label for all or one per example")
        labels = labels_in.to(device=x.device, dtype=torch.long).expand(x.shape[0])
        return logp.gather(1, labels[:, None]).squeeze(1)

    return guided_score(score_fn, log_p_y, scale)


# ----------------------------------------------------------------------------- imputation
def inpaint(score_fn: ScoreFn, sde: SDE, x_known: Tensor, mask: Tensor, **pc_kwargs: Any) -> SampleResult:
    """Sample ``p(x_unknown | x_known)`` by PC sampling with the known entries clamped (App. I.2).

    Args:
        x_known: ``[B, ...]`` data; only the entries where ``mask == 1`` are read (the others may hold anything,
            NaN included).
        mask: 1 = known, 0 = to fill in; broadcastable to ``x_known`` (e.g. ``[1, 1, H, W]``).
        **pc_kwargs: passed to :func:`~scoreflow.sampling.pc.pc_sample` (predictor, corrector, steps, seeds...).

    Returns:
        samples equal to ``x_known`` exactly on the known entries (put back after the last step), and
        ``known_error``: the largest distance between the sampler's own last state and ``x_known`` on the known
        entries before that, a measure of how well the sampled trajectory held the condition.
    """
    try:
        fits = torch.broadcast_shapes(mask.shape, x_known.shape) == x_known.shape
    except RuntimeError:
        fits = False
    if not fits:  # a mask broadcasting to more images would return more samples than were given
        raise ValueError(f"inpaint: mask of shape {list(mask.shape)} does not broadcast to the data's shape "
                         f"{list(x_known.shape)} (e.g. [1, 1, H, W] or [B, C, H, W])")
    if not bool(((mask == 0) | (mask == 1)).all()):  # a soft mask would blend the clamped and free samples
        raise ValueError("inpaint: the mask must hold only 0 (to fill in) and 1 (known); got values "
                         f"{sorted({float(v) for v in mask.flatten().unique()[:5]})}")
    known = mask.to(device=x_known.device).bool()  # selects, so that NaN in the unknown entries stays out

    def project(x: Tensor, t: Tensor, rng: NoiseSource) -> Tensor:
        # a fresh sample of the known entries at time t: y_t ~ N(alpha_t y, sigma_t^2 I)
        y_t = sde.perturb(x_known, t, rng.randn(tuple(x.shape), dtype=x.dtype, device=x.device))
        return torch.where(known, y_t, x)

    pc_kwargs.setdefault("dtype", x_known.dtype)
    pc_kwargs.setdefault("device", x_known.device)
    res = pc_sample(score_fn, sde, tuple(x_known.shape), project=project, **pc_kwargs)
    off = torch.where(known, (res.samples - x_known).abs(), torch.zeros((), dtype=res.samples.dtype,
                                                                         device=res.samples.device))
    return SampleResult(samples=torch.where(known, x_known, res.samples), nfe=res.nfe,
                        known_error=float(off.max()) if off.numel() else 0.0)


def decouple(x: Tensor) -> Tensor:
    """RGB ``[B, 3, ...]`` -> decoupled channels ``u = M^T x`` per pixel; ``u_0 = sqrt(3) * mean(R, G, B)``."""
    return torch.einsum("bi...,ij->bj...", x, COLOR_DECOUPLE.to(x))


def couple(u: Tensor) -> Tensor:
    """Inverse of :func:`decouple`: ``x = M u`` per pixel (``M^{-1} = M^T``)."""
    return torch.einsum("bj...,ij->bi...", u, COLOR_DECOUPLE.to(u))


def colorize(score_fn: ScoreFn, sde: SDE, gray: Tensor, **pc_kwargs: Any) -> SampleResult:
    """RGB samples ``[B, 3, ...]`` whose channel mean equals ``gray [B, 1, ...]`` (App. I.3).

    The grey level is the first decoupled channel (up to ``sqrt(3)``); the other two are imputed with the
    score mapped into the decoupled space, ``s_u(u) = M^T s(M u)``.
    """
    if gray.shape[1] != 1:
        raise ValueError(f"gray must have one channel, got shape {tuple(gray.shape)}")
    u_known = decouple(gray.expand(gray.shape[0], 3, *gray.shape[2:]))
    mask = torch.zeros((1, 3) + (1,) * (gray.ndim - 2), dtype=gray.dtype, device=gray.device)
    mask[:, 0] = 1

    def score_u(u: Tensor, t: Tensor) -> Tensor:
        return decouple(score_fn(couple(u), t))

    res = inpaint(score_u, sde, u_known, mask, **pc_kwargs)
    # the grey level is u_0 / sqrt(3): the sampler's distance from it in grey-level units
    error = None if res.known_error is None else res.known_error / math.sqrt(3)
    return SampleResult(samples=couple(res.samples), nfe=res.nfe, known_error=error)


# ----------------------------------------------------------------------------- masks, [1, 1, H, W], 1 = known
def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def center_mask(size: int | tuple[int, int], frac: float = 0.5) -> Tensor:
    """Everything known except a centred box covering ``frac`` of the height and width."""
    H, W = _hw(size)
    h, w = round(H * frac), round(W * frac)
    m = torch.ones(1, 1, H, W)
    m[..., (H - h) // 2 : (H - h) // 2 + h, (W - w) // 2 : (W - w) // 2 + w] = 0
    return m


def half_mask(size: int | tuple[int, int], missing: Literal["right", "left", "top", "bottom"] = "right") -> Tensor:
    """One half known, the ``missing`` half to be filled in."""
    H, W = _hw(size)
    m = torch.ones(1, 1, H, W)
    region = {
        "right": (..., slice(None), slice(W // 2, None)),
        "left": (..., slice(None), slice(None, W // 2)),
        "bottom": (..., slice(H // 2, None), slice(None)),
        "top": (..., slice(None, H // 2), slice(None)),
    }
    if missing not in region:
        raise ValueError(f"missing must be one of {sorted(region)}, got {missing!r}")
    m[region[missing]] = 0
    return m


def random_mask(size: int | tuple[int, int], p_known: float = 0.5, seed: int = 0) -> Tensor:
    """Each pixel known independently with probability ``p_known`` (reproducible from ``seed``)."""
    H, W = _hw(size)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 1, H, W, generator=g) < p_known).float()


def mask_from_png(path: str | Path, size: int | tuple[int, int] | None = None, threshold: float = 0.5) -> Tensor:
    """A mask from an image file: pixels with grey level >= ``threshold`` (in [0, 1]) are known (white = known)."""
    from PIL import Image

    img = Image.open(path).convert("L")
    if size is not None:
        H, W = _hw(size)
        img = img.resize((W, H), Image.NEAREST)
    grey = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width)
    return (grey.float() / 255 >= threshold).float()[None, None]
