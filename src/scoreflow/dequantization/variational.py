"""Variational dequantization: a conditional flow ``q_φ(u | k)`` on ``(0, 1)^D`` (Ho et al. 2019, Flow++).

Song et al. (2021b, Sec. 5.2, Eq. 13) train it by maximising ``E_u[log p_θ((k + u)/K) − log q_φ(u|k)]`` with the
Theorem 3 bound standing in for ``log p_θ``. The flow (as in their Flow++ port, docs/reference.md §5):

    ε ~ N(0, I)  ->  [ActNorm -> 1x1 conv -> logistic-mixture coupling] x n  ->  sigmoid  ->  u,

each coupling conditioned on the other half of its input and on features of the centred data ``k/(K−1) − 0.5``.
``log q(u|k) = log N(ε) − log|det ∂u/∂ε|``. Images ``(C, H, W)`` use checkerboard splits and conv nets; vectors
``(D,)`` alternate even/odd coordinates with MLPs.

Initialisation: couplings start near the identity (small output layer), and the first ActNorm scales ε by
``a = 1.749``, the KL-optimal ``a`` for ``σ(a ε) ≈ U(0, 1)`` (KL 0.0095 nats/dim; the probit approximation
``Φ(ε) ≈ σ(1.70 ε)``), so training starts close to uniform dequantization. With ``base="logistic"`` and
``num_couplings=0`` the flow *is* uniform dequantization: ``σ(ε)`` of a logistic ε is ``U(0, 1)``, ``log q = 0``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoreflow.dequantization.base import Dequantizer
from scoreflow.dequantization.flow_layers import (
    ActNorm,
    AlternatingSplit,
    CheckerboardSplit,
    InvConv1x1,
    MixLogisticCoupling,
)
from scoreflow.dequantization.flow_nets import ContextNet, CouplingNet
from scoreflow.utils import sum_except_batch

# docs/reference.md §5 / the ScoreFlow Flow++ configs. "small" is ours: a fast flow for 8x8 digits and 28x28 MNIST
# on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        num_couplings=4,
        width=96,
        num_components=32,
        num_blocks=2,
        attn_heads=4,
        context_width=32,
        context_blocks=3,
        context_attention=False,
        pointwise=True,
        output_nonlinearity=False,
    ),
    "imagenet32": dict(
        num_couplings=8,
        width=128,
        num_components=32,
        num_blocks=8,
        attn_heads=4,
        context_width=32,
        context_blocks=8,
        context_attention=True,
        pointwise=False,
        output_nonlinearity=True,
    ),
    "small": dict(
        num_couplings=4,
        width=32,
        num_components=8,
        num_blocks=1,
        attn_heads=0,
        context_width=16,
        context_blocks=1,
        context_attention=False,
        pointwise=True,
        output_nonlinearity=False,
    ),
}
_BASE_SCALE = {"gaussian": 1.749, "logistic": 1.0}


class VariationalDequantizer(Dequantizer):
    """``q_φ(u | k)`` for one example shape ``shape`` (``(C, H, W)`` with even ``W``, or ``(D,)``).

    ``num_levels`` is K (256 for 8-bit data). Sizes: ``num_couplings`` couplings, each a conditioner of ``width``
    channels and ``num_blocks`` gated residual blocks (with ``attn_heads``-head self-attention if > 0, images
    only) emitting ``num_components`` logistics per element; a context net of ``context_width`` channels and
    ``context_blocks`` blocks. ``init_scale`` scales the conditioners' output layers (0 gives exactly the
    identity couplings); ``bisection_iters`` sets the accuracy of the inverse used by :meth:`log_prob_u`.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        num_levels: int = 256,
        num_couplings: int = 4,
        width: int = 96,
        num_components: int = 32,
        num_blocks: int = 2,
        attn_heads: int = 4,
        context_width: int = 32,
        context_blocks: int = 3,
        context_attention: bool = False,
        pointwise: bool = True,
        output_nonlinearity: bool = False,
        dropout: float = 0.0,
        base: Literal["gaussian", "logistic"] = "gaussian",
        init_scale: float = 0.1,
        bisection_iters: int = 40,
    ):
        super().__init__()
        self.shape, self.num_levels, self.base = tuple(shape), num_levels, base
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        if base not in _BASE_SCALE:
            raise ValueError(f"base must be 'gaussian' or 'logistic', got {base!r}")
        self.spatial = len(self.shape) == 3
        if self.spatial:
            self.splitter: CheckerboardSplit | AlternatingSplit = CheckerboardSplit(self.shape)
            ctx_in, hw = 2 * self.shape[0], self.splitter.half_shape[1:]
        elif len(self.shape) == 1:
            self.splitter, ctx_in, hw = AlternatingSplit(self.shape[0]), self.shape[0], None
        else:
            raise ValueError(f"shape must be (C, H, W) or (D,), got {shape}")
        self.context_net = ContextNet(
            ctx_in,
            width=context_width,
            blocks=context_blocks,
            spatial=self.spatial,
            heads=attn_heads if context_attention else 0,
            hw=hw,
            dropout=dropout,
        )
        layers: list[nn.Module] = [ActNorm(self.shape, _BASE_SCALE[base])]
        for i in range(num_couplings):
            if i > 0:
                layers.append(ActNorm(self.shape))
            if pointwise and self.spatial and self.shape[0] > 1:
                layers.append(InvConv1x1(self.shape[0]))
            cond_shape, trans_shape = self.splitter.shapes(i % 2)
            net = CouplingNet(
                cond_shape,
                trans_shape,
                2 + 3 * num_components,
                width=width,
                blocks=num_blocks,
                context_width=context_width,
                heads=attn_heads,
                dropout=dropout,
                output_nonlinearity=output_nonlinearity,
                init_scale=init_scale,
            )
            layers.append(MixLogisticCoupling(self.splitter, i % 2, net, bisection_iters))
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_preset(
        cls, name: str, shape: tuple[int, ...], num_levels: int = 256, **overrides: Any
    ) -> VariationalDequantizer:
        """Build from :data:`PRESETS` (``"cifar10"``, ``"imagenet32"``, ``"small"``) with optional overrides."""
        return cls(shape, num_levels, **{**PRESETS[name], **overrides})

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].bias.dtype

    def context(self, k: Tensor) -> Tensor:
        """Context features of the levels ``k [B, *shape]``, read as ``k/(K−1) − 0.5`` (SF: ``k/255 − 0.5``)."""
        if tuple(k.shape[1:]) != self.shape:
            raise ValueError(f"expected levels of shape [B, {self.shape}], got {tuple(k.shape)}")
        x = k.to(self.dtype) / (self.num_levels - 1) - 0.5
        if self.spatial:
            x = torch.cat(self.splitter.split(x, 0), dim=1)
        return self.context_net(x)

    def _log_base(self, eps: Tensor) -> Tensor:
        if self.base == "gaussian":
            return sum_except_batch(-0.5 * eps**2 - 0.5 * math.log(2 * math.pi))
        return sum_except_batch(F.logsigmoid(eps) + F.logsigmoid(-eps))

    def transform(self, eps: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """The flow ``ε [B, *shape] -> u`` given levels ``k``; returns ``(u, log|det ∂u/∂ε|)`` with ``[B]`` log-det."""
        ctx, h, log_det = self.context(k), eps, eps.new_zeros(eps.shape[0])
        for layer in self.layers:
            h, ld = layer(h, ctx)
            log_det = log_det + ld
        log_det = log_det + sum_except_batch(F.logsigmoid(h) + F.logsigmoid(-h))  # σ' = σ(h) σ(−h)
        tiny, eps_f = torch.finfo(h.dtype).tiny, torch.finfo(h.dtype).eps
        return torch.sigmoid(h).clamp(tiny, 1 - eps_f / 2), log_det  # keep u strictly inside (0, 1)

    def inverse(self, u: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``u [B, *shape] -> ε``; returns ``(ε, log|det ∂ε/∂u|)``. Couplings are inverted by bisection."""
        ctx = self.context(k)
        log_u, log_1mu = torch.log(u), torch.log1p(-u)
        h, log_det = log_u - log_1mu, -sum_except_batch(log_u + log_1mu)
        for layer in reversed(self.layers):
            h, ld = layer.inverse(h, ctx)
            log_det = log_det + ld
        return h, log_det

    def sample_u(self, k: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``u ~ q_φ(·|k)`` and ``log q_φ(u|k) [B]``; differentiable in φ by reparametrisation."""
        if self.base == "gaussian":
            eps = torch.randn(k.shape, generator=generator, dtype=self.dtype, device=k.device)
        else:
            v = torch.rand(k.shape, generator=generator, dtype=self.dtype, device=k.device)
            v = v.clamp_min(torch.finfo(v.dtype).tiny)
            eps = torch.log(v) - torch.log1p(-v)  # logistic by inverse CDF
        u, log_det = self.transform(eps, k)
        return u, self._log_base(eps) - log_det

    def log_prob_u(self, u: Tensor, k: Tensor) -> Tensor:
        """Exact ``log q_φ(u|k)`` in nats per example ``[B]`` of a given ``u [B, *shape]`` in ``(0, 1)``."""
        eps, log_det = self.inverse(u.to(self.dtype), k)
        return self._log_base(eps) + log_det

    def forward(self, k: Tensor, num_levels: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(x = (k + u)/K, log q(u|k))``; ``num_levels`` must be the K the flow was built for."""
        if num_levels != self.num_levels:
            raise ValueError(f"built for num_levels={self.num_levels}, called with {num_levels}")
        return super().forward(k, num_levels, generator=generator)
