"""A small U-Net for small images (8x8 digits, 28x28 MNIST): DDPM++ at toy scale.

It is :class:`~scoreflow.nets.ncsnpp.NCSNpp` with the DDPM++ choices (BigGAN res blocks without FIR,
skip rescaling, attention in the middle and at ``attn_resolutions``, GroupNorm, zero-initialised output)
and small defaults, so the tested big-model code path is the one that trains on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

from scoreflow.nets.ncsnpp import NCSNpp


class UNet(NCSNpp):
    """``net(x [B, C, H, W], label [B]) -> [B, C, H, W]``.

    Args:
        shape: one example ``(C, H, W)``, H and W divisible by ``2 ** (len(ch_mult) - 1)``.
        ch: base channels; ch_mult: multiplier per resolution; num_res_blocks: per resolution (encoder).
        attn_resolutions: resolutions with self-attention besides the middle block.
        dropout: inside the res blocks.
        embedding_type: ``positional`` (label 999 t) or ``fourier`` (label log sigma).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        ch: int = 32,
        ch_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
    ):
        super().__init__(
            shape,
            nf=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            dropout=dropout,
            embedding_type=embedding_type,
            fourier_scale=fourier_scale,
        )
