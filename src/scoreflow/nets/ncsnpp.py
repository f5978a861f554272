"""NCSN++ and DDPM++ (Song et al. 2021b, Sec. 4.4 and App. H): one U-Net family, two published configurations.

DDPM++: positional (sinusoidal) embedding of ``999 t``, no FIR, no progressive growing; NCSN++ (VE): FIR
resampling, ``progressive_input='residual'``, Gaussian Fourier features of ``log sigma``. Both use BigGAN
residual blocks for resampling, skip rescaling by 1/sqrt(2), attention at 16x16, GroupNorm and swish
(Song et al. 2021, App. H; docs/reference.md §6). The net returns the raw output;
:class:`~scoreflow.nets.ScoreModel` turns it into a score.

Module creation order equals score_sde_pytorch's ``all_modules`` list; ``sp_module_names[i]`` names our
module for its ``all_modules.{i}`` so checkpoints map by renaming keys (:mod:`scoreflow.nets.sp_checkpoint`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoreflow.nets.layers import (
    SQRT2,
    AttnBlock,
    Combine,
    Downsample,
    GaussianFourierProjection,
    ResBlock,
    Upsample,
    conv3x3,
    dense,
    group_norm,
    sinusoidal_embedding,
)


class DownLevel(nn.Module):
    """One resolution of the encoder: res blocks (+ attention each), then a down block and the input pyramid."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.resample: ResBlock | None = None
        self.pyramid: nn.Module | None = None


class UpLevel(nn.Module):
    """One resolution of the decoder: res blocks on concatenated skips, one attention, output pyramid, up block."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn: AttnBlock | None = None
        self.pyramid_norm: nn.GroupNorm | None = None
        self.pyramid_conv: nn.Conv2d | None = None
        self.pyramid_up: Upsample | None = None
        self.resample: ResBlock | None = None


class NCSNpp(nn.Module):
    """The NCSN++ / DDPM++ U-Net, ``net(x [B, C, H, W], label [B]) -> [B, C, H, W]``.

    Args:
        shape: one example ``(C, H, W)``; H and W divisible by ``2 ** (len(ch_mult) - 1)``.
        nf: base channels; ch_mult: channel multiplier per resolution (resolution i is ``H / 2**i``).
        num_res_blocks: res blocks per resolution in the encoder (the decoder has one more).
        attn_resolutions: resolutions (heights) with self-attention.
        dropout: inside each res block.
        fir, fir_kernel: FIR (anti-aliased) resampling with this 1-D kernel, else nearest / average pooling.
        skip_rescale: divide every residual sum by sqrt(2).
        progressive: output pyramid ``none | output_skip | residual``.
        progressive_input: input pyramid ``none | input_skip | residual``; progressive_combine ``sum | cat``.
        embedding_type: ``positional`` (label = 999 t) or ``fourier`` (label = log sigma); fourier_scale: std of W.
        init_scale: scale of the output conv, each block's second conv and the attention output (0 = 1e-10).
        conditional: use the label at all.
        centered: if False the input is taken in [0, 1] and mapped to [-1, 1] first (score_sde_pytorch's
            ``data.centered=False``, needed to run its VE checkpoints on [0, 1] data).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        fir: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
        skip_rescale: bool = True,
        progressive: str = "none",
        progressive_input: str = "none",
        progressive_combine: str = "sum",
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        init_scale: float = 0.0,
        conditional: bool = True,
        centered: bool = True,
    ):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"{type(self).__name__} needs images (C, H, W), got {tuple(shape)}; use MLP for vectors")
        C, H, W = shape
        n_levels = len(ch_mult)
        if H % 2 ** (n_levels - 1) or W % 2 ** (n_levels - 1):
            raise ValueError(f"image {H}x{W} is not divisible by 2^{n_levels - 1} (len(ch_mult)={n_levels})")
        if progressive not in ("none", "output_skip", "residual"):
            raise ValueError(f"unknown progressive {progressive!r}")
        if progressive_input not in ("none", "input_skip", "residual"):
            raise ValueError(f"unknown progressive_input {progressive_input!r}")
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"unknown embedding_type {embedding_type!r}")
        self.nf, self.conditional, self.centered, self.skip_rescale = nf, conditional, centered, skip_rescale
        self.progressive, self.progressive_input = progressive, progressive_input
        self.embedding_type = embedding_type  # ScoreModel checks that its time label fits
        resolutions = [H // 2**i for i in range(n_levels)]
        order: list[nn.Module] = []  # modules in score_sde_pytorch's all_modules order

        def add(m: nn.Module) -> nn.Module:
            order.append(m)
            return m

        self.fourier = add(GaussianFourierProjection(nf, fourier_scale)) if embedding_type == "fourier" else None
        embed_dim = 2 * nf if embedding_type == "fourier" else nf
        if conditional:  # temb -> Dense(4nf) -> act -> Dense(4nf)
            self.temb_0, self.temb_1 = add(dense(embed_dim, 4 * nf)), add(dense(4 * nf, 4 * nf))
        block = functools.partial(
            ResBlock,
            temb_dim=4 * nf if conditional else None,
            dropout=dropout,
            fir=fir,
            fir_kernel=fir_kernel,
            skip_rescale=skip_rescale,
            init_scale=init_scale,
        )
        attn = functools.partial(AttnBlock, skip_rescale=skip_rescale, init_scale=init_scale)

        self.conv_in = add(conv3x3(C, nf))
        skip_ch, ch, pyramid_ch = [nf], nf, C
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = DownLevel()
            for _ in range(num_res_blocks):
                level.res.append(add(block(ch, nf * mult)))
                ch = nf * mult
                if resolutions[i] in attn_resolutions:
                    level.attn.append(add(attn(ch)))
                skip_ch.append(ch)
            if i != n_levels - 1:
                level.resample = add(block(ch, down=True))
                if progressive_input == "input_skip":
                    level.pyramid = add(Combine(pyramid_ch, ch, method=progressive_combine))
                    ch = 2 * ch if progressive_combine == "cat" else ch
                elif progressive_input == "residual":
                    level.pyramid = add(Downsample(pyramid_ch, ch, with_conv=True, fir=fir, fir_kernel=fir_kernel))
                    pyramid_ch = ch
                skip_ch.append(ch)
            self.down.append(level)

        self.mid_0, self.mid_attn, self.mid_1 = add(block(ch)), add(attn(ch)), add(block(ch))

        self.up = nn.ModuleList()
        for i in reversed(range(n_levels)):
            level = UpLevel()
            for _ in range(num_res_blocks + 1):
                level.res.append(add(block(ch + skip_ch.pop(), nf * ch_mult[i])))
                ch = nf * ch_mult[i]
            if resolutions[i] in attn_resolutions:
                level.attn = add(attn(ch))
            if progressive == "output_skip":
                level.pyramid_norm, level.pyramid_conv = add(group_norm(ch)), add(conv3x3(ch, C, init_scale))
            elif progressive == "residual" and i == n_levels - 1:
                level.pyramid_norm, level.pyramid_conv = add(group_norm(ch)), add(conv3x3(ch, ch))
                pyramid_ch = ch
            elif progressive == "residual":
                level.pyramid_up = add(Upsample(pyramid_ch, ch, with_conv=True, fir=fir, fir_kernel=fir_kernel))
                pyramid_ch = ch
            if i != 0:
                level.resample = add(block(ch, up=True))
            self.up.append(level)
        assert not skip_ch

        if progressive != "output_skip":
            self.norm_out, self.conv_out = add(group_norm(ch)), add(conv3x3(ch, C, init_scale))
        # Parameter-free pyramid resamplers (outside all_modules in the reference).
        self.pyramid_downsample = Downsample(C, fir=fir, fir_kernel=fir_kernel)
        self.pyramid_upsample = Upsample(C, fir=fir, fir_kernel=fir_kernel)
        names = {id(m): name for name, m in self.named_modules()}
        self.sp_module_names: tuple[str, ...] = tuple(names[id(m)] for m in order)

    def _sum(self, a: Tensor, b: Tensor) -> Tensor:
        return (a + b) / SQRT2 if self.skip_rescale else a + b

    def embed(self, label: Tensor) -> Tensor | None:
        """``[B] -> [B, 4 nf]``, already passed through the activation every block applies to it."""
        if not self.conditional:
            return None
        emb = self.fourier(label) if self.fourier is not None else sinusoidal_embedding(label, self.nf)
        return F.silu(self.temb_1(F.silu(self.temb_0(emb.to(self.temb_0.weight.dtype)))))

    def forward(self, x: Tensor, label: Tensor) -> Tensor:
        """``x [B, C, H, W]``, ``label [B]`` (999 t or log sigma) -> ``[B, C, H, W]``."""
        temb = self.embed(label)
        # Gradients w.r.t. the input may be differentiated again (ISM, divergences): fused attention cannot.
        unfused = torch.is_grad_enabled() and x.requires_grad
        if not self.centered:
            x = 2 * x - 1.0
        pyramid = x
        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.res):
                h = block(hs[-1], temb)
                hs.append(level.attn[j](h, unfused) if len(level.attn) else h)
            if level.resample is not None:
                h = level.resample(hs[-1], temb)
                if self.progressive_input == "input_skip":
                    pyramid = self.pyramid_downsample(pyramid)
                    h = level.pyramid(pyramid, h)
                elif self.progressive_input == "residual":
                    h = pyramid = self._sum(level.pyramid(pyramid), h)
                hs.append(h)

        h = self.mid_1(self.mid_attn(self.mid_0(hs[-1], temb), unfused), temb)

        pyramid = None
        for level in self.up:
            for block in level.res:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            if level.attn is not None:
                h = level.attn(h, unfused)
            if self.progressive == "output_skip":
                out = level.pyramid_conv(F.silu(level.pyramid_norm(h)))
                pyramid = out if pyramid is None else self.pyramid_upsample(pyramid) + out
            elif self.progressive == "residual" and level.pyramid_up is None:
                pyramid = level.pyramid_conv(F.silu(level.pyramid_norm(h)))
            elif self.progressive == "residual":
                h = pyramid = self._sum(level.pyramid_up(pyramid), h)
            if level.resample is not None:
                h = level.resample(h, temb)

        if self.progressive == "output_skip":
            return pyramid
        return self.conv_out(F.silu(self.norm_out(h)))
