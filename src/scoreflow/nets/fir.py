"""FIR (anti-aliased) up/down-sampling in plain PyTorch (StyleGAN2's ``upfirdn2d``; Song et al. 2021b, App. H).

NCSN++ resamples with the separable kernel ``[1, 3, 3, 1]`` (Zhang 2019; Karras et al. 2020). The reference
implementation calls a custom CUDA op; here every operation is one depthwise ``conv2d`` /
``conv_transpose2d``, which cuDNN runs natively (channels_last included), so nothing needs compiling.

For an even kernel length K and factor 2 every padding StyleGAN2 uses is symmetric:

- ``upsample_2d``: zero-insertion, pad ``(K/2, K/2 - 1)``, convolve with ``4k`` = ``conv_transpose2d``
  with stride 2 and padding ``K/2 - 1``;
- ``downsample_2d``: convolve with ``k`` padded by ``K/2 - 1``, keep every 2nd sample = ``conv2d`` stride 2;
- ``upsample_conv_2d``: transposed kxk conv with stride 2, then the ``4k`` blur padded by ``(K + 1 - k)/2``;
- ``conv_downsample_2d``: the ``k`` blur padded by ``(K + k - 3)/2``, then a kxk conv with stride 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def make_fir_kernel(k: Sequence[float]) -> Tensor:
    """The normalised 2-D kernel ``outer(k, k) / sum`` ``[K, K]`` of a 1-D FIR filter of even length K."""
    k1 = torch.tensor([float(v) for v in k], dtype=torch.float32)
    if k1.ndim != 1 or k1.numel() % 2 != 0:
        raise ValueError(f"fir_kernel must be a 1-D filter of even length, got {list(k)}")
    k2 = torch.outer(k1, k1)
    return k2 / k2.sum()


def _depthwise(k: Tensor, x: Tensor) -> Tensor:
    """``[K, K] -> [C, 1, K, K]`` in ``x``'s dtype and device, for a grouped convolution over C channels."""
    return k.to(x.dtype)[None, None].expand(x.shape[1], 1, *k.shape)


def upsample_2d(x: Tensor, k: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, C, 2H, 2W]``: zero-insertion and the FIR filter ``4k`` (constant images stay constant).

    ``k`` ``[K, K]`` is a normalised kernel from :func:`make_fir_kernel`; the true convolution of ``upfirdn2d``
    equals a transposed convolution with the unflipped kernel.
    """
    K = k.shape[-1]
    return F.conv_transpose2d(x, _depthwise(4.0 * k, x), stride=2, padding=K // 2 - 1, groups=x.shape[1])


def downsample_2d(x: Tensor, k: Tensor) -> Tensor:
    """``[B, C, H, W] -> [B, C, H/2, W/2]``: FIR filter ``k`` then keep every second pixel."""
    K = k.shape[-1]
    return F.conv2d(x, _depthwise(k.flip(0, 1), x), stride=2, padding=K // 2 - 1, groups=x.shape[1])


def blur_2d(x: Tensor, k: Tensor, pad: int) -> Tensor:
    """FIR filter ``k`` ``[K, K]`` at stride 1 with ``pad`` zeros on every side."""
    return F.conv2d(x, _depthwise(k.flip(0, 1), x), padding=pad, groups=x.shape[1])


class FIRConv2d(nn.Module):
    """A KxK convolution fused with FIR resampling (StyleGAN2's ``Conv2d`` with ``up``/``down``).

    Parameter names ``weight [out, in, k, k]`` and ``bias [out]`` match score_sde_pytorch's
    ``up_or_down_sampling.Conv2d``. Initialisation is left to the caller.

    Args:
        in_ch, out_ch: channels.
        kernel: odd spatial size of the convolution (3 in NCSN++).
        up / down: resample by 2 (at most one of them); neither is a plain 'same' convolution.
        fir_kernel: the 1-D FIR filter.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        up: bool = False,
        down: bool = False,
        fir_kernel: Sequence[float] = (1, 3, 3, 1),
    ):
        super().__init__()
        if up and down:
            raise ValueError("FIRConv2d cannot both upsample and downsample")
        if kernel < 1 or kernel % 2 == 0 or kernel > len(fir_kernel) + 1:
            raise ValueError(f"kernel must be odd and at most len(fir_kernel) + 1, got {kernel}")
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.up, self.down, self.kernel = up, down, kernel
        # Not persistent: score_sde_pytorch checkpoints hold no FIR kernels.
        self.register_buffer("fir", make_fir_kernel(fir_kernel), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in, H, W] -> [B, out, H', W']`` with ``H' = 2H``, ``H/2`` or ``H``."""
        K = self.fir.shape[-1]
        if self.up:
            # Transposed conv of the flipped, in/out-swapped weight (StyleGAN2 upsample_conv_2d): [B, out, 2H+k-2, .]
            w = self.weight.flip(2, 3).transpose(0, 1)
            h = F.conv_transpose2d(x, w, stride=2)
            h = blur_2d(h, 4.0 * self.fir, pad=(K + 1 - self.kernel) // 2)
        elif self.down:
            h = F.conv2d(blur_2d(x, self.fir, pad=(K + self.kernel - 3) // 2), self.weight, stride=2)
        else:
            h = F.conv2d(x, self.weight, padding=self.kernel // 2)
        return h + self.bias.to(h.dtype).reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        mode = "up" if self.up else "down" if self.down else "same"
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel={self.kernel}, {mode}, fir={self.fir.shape[-1]}"
