"""Networks inside the dequantization flow: coupling conditioners and the context encoder (Ho et al. 2019, Flow++).

Both work on images ``[B, C, H, W']`` (3x3 convs, optional self-attention) and on vectors ``[B, F]`` (linear
layers), picked by ``spatial``. Building blocks follow Flow++: gated residual blocks with concat-ELU
(Salimans et al. 2017, PixelCNN++), layer norm over channels, gated multi-head self-attention with a learned
position embedding. Residual branches start small (×0.1) so a fresh flow is close to its identity-ish init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def concat_elu(x: Tensor) -> Tensor:
    """``ELU([x, −x])`` along the channel dim 1: doubles the channels."""
    return F.elu(torch.cat([x, -x], dim=1))


def _layer(spatial: bool, c_in: int, c_out: int, kernel: int = 3, scale: float = 1.0) -> nn.Module:
    """A ``kernel``x``kernel`` conv (spatial) or a linear layer, weights scaled by ``scale`` (bias zero if scaled)."""
    layer = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2) if spatial else nn.Linear(c_in, c_out)
    if scale != 1.0:
        with torch.no_grad():
            layer.weight.mul_(scale)
            layer.bias.zero_()
    return layer


class ChannelLayerNorm(nn.LayerNorm):
    """Layer norm over the channel dim 1 of ``[B, C]`` or ``[B, C, H, W]``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            return super().forward(x)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedResidual(nn.Module):
    """``x + a·σ(b)``, ``[a, b] = c2(ELU⊕(c1(ELU⊕(x)) + proj(ELU⊕(ctx))))`` (PixelCNN++ gated resnet)."""

    def __init__(self, width: int, context_width: int, spatial: bool, nin_out: bool, dropout: float = 0.0):
        super().__init__()
        self.c1 = _layer(spatial, 2 * width, width, 3)
        self.ctx_proj = _layer(spatial, 2 * context_width, width, 1) if context_width else None
        self.dropout = nn.Dropout(dropout)
        self.c2 = _layer(spatial, 2 * width, 2 * width, 1 if nin_out else 3, scale=0.1)

    def forward(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        h = self.c1(concat_elu(x))
        if self.ctx_proj is not None:
            h = h + self.ctx_proj(concat_elu(ctx))
        a, b = self.c2(self.dropout(concat_elu(h))).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class GatedAttention(nn.Module):
    """Gated multi-head self-attention over the ``H·W`` positions of ``[B, C, H, W]`` (Flow++ Sec. 3.3)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by attn_heads {heads}")
        self.heads = heads
        self.qkv = _layer(True, width, 3 * width, 1)
        self.dropout = nn.Dropout(dropout)
        self.out = _layer(True, width, 2 * width, 1, scale=0.1)

    def forward(self, x: Tensor, pos_emb: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(x + pos_emb).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2)
        h = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # [B, heads, HW, C/heads]
        a, b = self.out(self.dropout(h.transpose(-1, -2).reshape(B, C, H, W))).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class Trunk(nn.Module):
    """``blocks`` x [gated residual (reads ctx), (LN, gated attention, LN)]: the body of both nets.

    The attention layers share one learned position embedding ``[width, H, W]``, as in Flow++.
    """

    def __init__(
        self,
        width: int,
        blocks: int,
        context_width: int,
        spatial: bool,
        nin_out: bool,
        heads: int,
        hw: tuple[int, int] | None,
        dropout: float,
    ):
        super().__init__()
        self.res = nn.ModuleList(GatedResidual(width, context_width, spatial, nin_out, dropout) for _ in range(blocks))
        self.attn = nn.ModuleList()
        if spatial and heads > 0:
            self.pos_emb = nn.Parameter(0.01 * torch.randn(width, *hw))
            self.attn.extend(
                nn.ModuleList([ChannelLayerNorm(width), GatedAttention(width, heads, dropout), ChannelLayerNorm(width)])
                for _ in range(blocks)
            )

    def forward(self, h: Tensor, ctx: Tensor | None = None) -> Tensor:
        for i, res in enumerate(self.res):
            h = res(h, ctx)
            if len(self.attn):
                ln1, attn, ln2 = self.attn[i]
                h = ln2(attn(ln1(h), self.pos_emb))
        return h


class CouplingNet(nn.Module):
    """Conditioner: conditioning half ``[B, *cond_shape]`` and context -> raw parameters ``[B, *trans_shape, P]``.

    Images: ``cond_shape = trans_shape = (C, H, W')``, context ``[B, context_width, H, W']``.
    Vectors: ``cond_shape = (D_c,)`` (may be 0), ``trans_shape = (D_t,)``, context ``[B, context_width]``.
    """

    def __init__(
        self,
        cond_shape: tuple[int, ...],
        trans_shape: tuple[int, ...],
        params_per_elem: int,
        *,
        width: int,
        blocks: int,
        context_width: int,
        heads: int = 0,
        dropout: float = 0.0,
        output_nonlinearity: bool = False,
        init_scale: float = 0.1,
    ):
        super().__init__()
        self.spatial = len(cond_shape) == 3
        self.trans_shape, self.P = trans_shape, params_per_elem
        c_in = cond_shape[0] if self.spatial else cond_shape[0] + context_width
        self.proj_in = _layer(self.spatial, c_in, width, 3)
        self.trunk = Trunk(
            width,
            blocks,
            context_width,
            self.spatial,
            True,
            heads,
            tuple(cond_shape[1:]) if self.spatial else None,
            dropout,
        )
        self.output_nonlinearity = output_nonlinearity
        c_out = trans_shape[0] * params_per_elem
        self.proj_out = _layer(self.spatial, (2 if output_nonlinearity else 1) * width, c_out, 3, scale=init_scale)

    def forward(self, cond: Tensor, ctx: Tensor) -> Tensor:
        h = self.proj_in(cond if self.spatial else torch.cat([cond, ctx], dim=1))
        h = self.trunk(h, ctx)
        out = self.proj_out(concat_elu(h) if self.output_nonlinearity else h)
        if self.spatial:  # [B, C·P, H, W'] -> [B, C, H, W', P]
            return out.unflatten(1, (self.trans_shape[0], self.P)).movedim(2, -1)
        return out.unflatten(1, (self.trans_shape[0], self.P))


class ContextNet(nn.Module):
    """Features of the centred data ``x − 0.5`` (Flow++ "shallow/deep processor").

    Images: both checkerboard halves stacked on channels ``[B, 2C, H, W/2]`` -> ``[B, width, H, W/2]``.
    Vectors: ``[B, D]`` -> ``[B, width]``.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        width: int,
        blocks: int,
        spatial: bool,
        heads: int = 0,
        hw: tuple[int, int] | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.proj = _layer(spatial, in_channels, width, 3)
        self.trunk = Trunk(width, blocks, 0, spatial, False, heads, hw, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(self.proj(x))
