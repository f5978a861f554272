"""A small time-conditioned residual MLP for 2-D toy and tabular data."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from scoreflow.nets.layers import GaussianFourierProjection, dense, sinusoidal_embedding


class MLPBlock(nn.Module):
    """``h + fc_1(act(fc_0(act(h)) + temb_proj(temb))))`` (a pre-activation residual block)."""

    def __init__(self, hidden: int, temb_dim: int):
        super().__init__()
        self.fc_0 = dense(hidden, hidden)
        self.temb_proj = dense(temb_dim, hidden)
        self.fc_1 = dense(hidden, hidden)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        return h + self.fc_1(F.silu(self.fc_0(F.silu(h)) + self.temb_proj(temb)))


class MLP(nn.Module):
    """``net(x [B, *shape], label [B]) -> [B, *shape]``; the input is flattened to ``D = prod(shape)``.

    Args:
        shape: one example, e.g. ``(2,)``.
        hidden: width; num_blocks: residual blocks.
        embed_dim: size of the label features; embedding_type: ``positional`` (999 t) or ``fourier`` (log sigma).
        fourier_scale: std of the fixed Fourier frequencies.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        hidden: int = 256,
        num_blocks: int = 3,
        embed_dim: int = 64,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"unknown embedding_type {embedding_type!r}")
        self.shape, self.embed_dim = tuple(shape), embed_dim
        dim = math.prod(shape)
        self.fourier = GaussianFourierProjection(embed_dim // 2, fourier_scale) if embedding_type == "fourier" else None
        self.temb_0, self.temb_1 = dense(embed_dim, hidden), dense(hidden, hidden)
        self.fc_in = dense(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, hidden) for _ in range(num_blocks))
        self.fc_out = dense(hidden, dim, init_scale=0.0)  # output starts at ~0 (1e-10 scale), as in NCSN++

    def forward(self, x: Tensor, label: Tensor) -> Tensor:
        """``x [B, *shape]``, ``label [B]`` -> ``[B, *shape]``."""
        emb = self.fourier(label) if self.fourier is not None else sinusoidal_embedding(label, self.embed_dim)
        temb = F.silu(self.temb_1(F.silu(self.temb_0(emb.to(self.fc_in.weight.dtype)))))
        h = self.fc_in(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = block(h, temb)
        return self.fc_out(F.silu(h)).reshape(x.shape)
