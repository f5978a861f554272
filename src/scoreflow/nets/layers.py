"""Building blocks of NCSN++ / DDPM++ (Song et al. 2021b, App. H) and the small nets.

Attribute names inside the blocks (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``NIN_0``, ...) and their
registration order are those of score_sde_pytorch's ``layerspp``, so a checkpoint of that code maps onto
ours by renaming only the network-level prefix (see :mod:`scoreflow.nets.sp_checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoreflow.nets import fir as fir_ops

SQRT2 = math.sqrt(2.0)


@torch.no_grad()
def default_init_(w: Tensor, scale: float = 1.0) -> Tensor:
    """DDPM's initialiser in place: variance scaling, fan_avg, uniform (Ho et al. 2020).

    ``scale=0`` means 1e-10 ("zero init" that keeps a non-zero gradient path), as in the reference.
    Fans follow JAX's convention with axis 1 = in and axis 0 = out, times the receptive field.
    """
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(w.shape[2:]) if w.ndim > 2 else 1
    fan_avg = 0.5 * (w.shape[0] + w.shape[1]) * receptive
    bound = math.sqrt(3.0 * scale / fan_avg)
    return w.uniform_(-bound, bound)


def conv3x3(in_ch: int, out_ch: int, init_scale: float = 1.0, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    """3x3 convolution with DDPM init and zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=padding)
    default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_ch: int, out_ch: int, init_scale: float = 1.0) -> nn.Conv2d:
    """1x1 convolution with DDPM init and zero bias."""
    conv = nn.Conv2d(in_ch, out_ch, 1)
    default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def dense(in_dim: int, out_dim: int, init_scale: float = 1.0) -> nn.Linear:
    """Linear layer with DDPM init and zero bias."""
    lin = nn.Linear(in_dim, out_dim)
    default_init_(lin.weight, init_scale)
    nn.init.zeros_(lin.bias)
    return lin


def group_norm(ch: int) -> nn.GroupNorm:
    """GroupNorm(min(C/4, 32), eps 1e-6) (docs/reference.md §6)."""
    return nn.GroupNorm(num_groups=min(ch // 4, 32), num_channels=ch, eps=1e-6)


def sinusoidal_embedding(label: Tensor, dim: int, max_positions: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[B] -> [B, dim]``: ``[sin(l w_j), cos(l w_j)]``, ``w_j = M^(-j/(h-1))`` (Vaswani; DDPM)."""
    half = dim // 2
    dtype = torch.promote_types(label.dtype, torch.float32)  # float64 labels stay float64 (float64 ODE)
    freqs = torch.exp(-math.log(max_positions) / (half - 1) * torch.arange(half, device=label.device, dtype=dtype))
    arg = label.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([arg.sin(), arg.cos()], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar label ``[B] -> [B, 2 size]`` (Tancik et al. 2020; Song et al. 2021b).

    ``W ~ N(0, scale^2)`` is fixed: a buffer here (a frozen parameter in the reference; same state-dict key).
    """

    def __init__(self, embedding_size: int = 256, scale: float = 16.0):
        super().__init__()
        self.register_buffer("W", torch.randn(embedding_size) * scale)

    def forward(self, label: Tensor) -> Tensor:
        dtype = torch.promote_types(label.dtype, self.W.dtype)
        proj = label.to(dtype)[:, None] * self.W.to(dtype)[None, :] * (2 * math.pi)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)


class NIN(nn.Module):
    """Per-pixel linear map ("network in network") with weight ``W [in, out]`` as in the reference."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(default_init_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]`` (channels last)."""
        return F.linear(x, self.W.t(), self.b)


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, residual, optionally rescaled by 1/sqrt(2) (DDPM; NCSN++).

    Uses ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU) unless ``unfused``;
    pixels are taken in channels-last order, which is a view when the input is ``channels_last``.
    """

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor, unfused: bool = False) -> Tensor:
        """``[B, C, H, W] -> [B, C, H, W]``.

        ``unfused`` computes ``softmax(q k^T / sqrt(C)) v`` with plain ops: the fused SDPA kernels have no
        double backward, which implicit score matching and divergence-of-gradient code need.
        """
        B, C, H, W = x.shape
        h = self.GroupNorm_0(x).permute(0, 2, 3, 1).reshape(B, 1, H * W, C)
        w_qkv = torch.cat([self.NIN_0.W, self.NIN_1.W, self.NIN_2.W], dim=1)
        b_qkv = torch.cat([self.NIN_0.b, self.NIN_1.b, self.NIN_2.b])
        q, k, v = F.linear(h, w_qkv.t(), b_qkv).chunk(3, dim=-1)  # the three NINs as one matmul
        a = None
        if not unfused:
            try:
                a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
            except NotImplementedError:  # forward-mode AD (torch.func.jvp) has no rule for the fused kernels
                pass
        if a is None:
            a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C), dim=-1) @ v
        h = self.NIN_3(a).reshape(B, H, W, C).permute(0, 3, 1, 2)
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class ResBlock(nn.Module):
    """BigGAN-style residual block that can also resample by 2 (Brock et al. 2019; NCSN++ ``ResnetBlockBigGANpp``).

    ``h = Conv_1(drop(act(GN_1(Conv_0(resample(act(GN_0(x)))) + Dense_0(act(temb))))))``, skip =
    ``Conv_2(resample(x))`` (1x1) when the shape changes, output ``(skip + h) / sqrt(2)`` with ``skip_rescale``.
    ``Conv_1`` starts at ``init_scale`` (0 = 1e-10), so the block starts as (a rescaled) identity.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        temb_dim: int | None = None,
        up: bool = False,
        down: bool = False,
        dropout: float = 0.1,
        fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        init_scale: float = 0.0,
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch or up or down:
            self.Conv_2 = conv1x1(in_ch, out_ch)
        self.up, self.down, self.fir, self.skip_rescale = up, down, fir, skip_rescale
        self.register_buffer("fir_k", fir_ops.make_fir_kernel(fir_kernel), persistent=False)

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return fir_ops.upsample_2d(x, self.fir_k) if self.fir else F.interpolate(x, scale_factor=2.0)
        if self.down:
            return fir_ops.downsample_2d(x, self.fir_k) if self.fir else F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """``x [B, in, H, W]``, ``temb [B, temb_dim]`` already passed through the activation -> ``[B, out, H', W']``."""
        h = self._resample(F.silu(self.GroupNorm_0(x)))
        x = self._resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(temb)[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / SQRT2 if self.skip_rescale else x + h


class _Resample(nn.Module):
    """The constructor :class:`Upsample` and :class:`Downsample` share; ``_up`` (a class attribute) picks the way.

    With ``with_conv`` and ``fir`` a fused FIR conv ``Conv2d_0``; with ``with_conv`` alone a 3x3 conv ``Conv_0``
    (stride 2, no padding, when downsampling); always the FIR kernel ``fir_k`` (not persistent). These names
    are those of score_sde_pytorch's checkpoints.
    """

    _up: bool

    def __init__(
        self,
        in_ch: int,
        out_ch: int | None = None,
        with_conv: bool = False,
        fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        if with_conv and fir:
            self.Conv2d_0 = fir_ops.FIRConv2d(in_ch, out_ch, 3, up=self._up, down=not self._up, fir_kernel=fir_kernel)
            default_init_(self.Conv2d_0.weight)
        elif with_conv:
            self.Conv_0 = conv3x3(in_ch, out_ch) if self._up else conv3x3(in_ch, out_ch, stride=2, padding=0)
        self.fir, self.with_conv = fir, with_conv
        self.register_buffer("fir_k", fir_ops.make_fir_kernel(fir_kernel), persistent=False)


class Upsample(_Resample):
    """x2 upsampling, FIR or nearest, optionally with a 3x3 conv (NCSN++ progressive growing)."""

    _up = True

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in, H, W] -> [B, out, 2H, 2W]``."""
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else fir_ops.upsample_2d(x, self.fir_k)
        h = F.interpolate(x, scale_factor=2.0)
        return self.Conv_0(h) if self.with_conv else h


class Downsample(_Resample):
    """/2 downsampling, FIR or average pooling / strided conv (NCSN++ progressive growing)."""

    _up = False

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in, H, W] -> [B, out, H/2, W/2]``."""
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else fir_ops.downsample_2d(x, self.fir_k)
        if self.with_conv:
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))  # TF 'SAME' padding of a stride-2 conv
        return F.avg_pool2d(x, 2)


class Combine(nn.Module):
    """Merge the input pyramid into the features: 1x1 conv, then sum or concatenation (NCSN++ ``input_skip``)."""

    def __init__(self, dim1: int, dim2: int, method: str = "sum"):
        super().__init__()
        if method not in ("sum", "cat"):
            raise ValueError(f"unknown combine method {method!r}")
        self.Conv_0 = conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y
