"""Time-dependent (noise-conditional) classifiers ``p_t(y | x_t)`` for class guidance (Song et al. 2021, App. I.1).

:class:`WideResNet` is ``net(x [B, C, H, W], label [B]) -> logits [B, K]``: a pre-activation Wide ResNet
(Zagoruyko & Komodakis 2016) whose blocks each add the embedded noise level after their first
convolution, the way NCSN++'s res blocks do. The paper's classifier is WRN-28-10 conditioned on
``log sigma`` by random Fourier features (Tancik et al. 2020); ``conf/classifier/small.yaml`` is the same
code at toy size (WRN-10-2 on ``999 t``) so the CPU-trained path is the one that scales.

:class:`NoiseConditionalClassifier` turns such a net into ``classifier(x, t) -> logits``, the interface
:func:`scoreflow.sampling.controllable.classifier_guided_score` takes, with the same time labels as
:class:`~scoreflow.nets.ScoreModel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoreflow.nets.layers import GaussianFourierProjection, group_norm, sinusoidal_embedding
from scoreflow.nets.score_model import INCOMPATIBLE_LABELS, TIME_LABELS, TimeLabel, time_label
from scoreflow.sde import SDE
from scoreflow.utils import append_dims


class WideBlock(nn.Module):
    """Pre-activation residual block ``x + conv(act(GN(conv(act(GN x)) + Dense temb)))``, optional stride 2.

    GroupNorm instead of WRN's BatchNorm: batch statistics would couple the examples of a batch, while
    guidance differentiates ``sum_b log p(y_b | x_b)`` and needs each gradient to depend on its own example
    only; GN also behaves the same in training and evaluation. SiLU instead of ReLU gives the smooth input
    gradients guidance follows.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.norm_0 = group_norm(in_ch)
        self.conv_0 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.temb = nn.Linear(temb_dim, out_ch) if temb_dim is not None else None
        self.norm_1 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv_1 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if in_ch != out_ch or stride != 1 else None

    def forward(self, x: Tensor, temb: Tensor | None) -> Tensor:
        """``x [B, in, H, W]``, ``temb [B, temb_dim]`` (already activated) -> ``[B, out, H / stride, W / stride]``."""
        h = self.conv_0(F.silu(self.norm_0(x)))
        if self.temb is not None:
            h = h + self.temb(temb)[:, :, None, None]
        h = self.conv_1(self.dropout(F.silu(self.norm_1(h))))
        return (x if self.skip is None else self.skip(x)) + h


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` with noise conditioning, ``net(x [B, C, H, W], label [B]) -> [B, num_classes]``.

    Three groups of ``(depth - 4) / 6`` blocks with ``16k, 32k, 64k`` channels at strides 1, 2, 2, a 3x3
    stem with 16 channels, then GN, SiLU, global average pooling and a linear layer. Without conditioning
    the parameter count equals the published WRN's (36,479,194 for WRN-28-10 on CIFAR-10).

    Args:
        shape: one example ``(C, H, W)``; H and W divisible by 4.
        num_classes: K.
        depth: ``6 n + 4``; widen_factor: k.
        dropout: inside each block, between the two convolutions (WRN's 0.3 is for long CIFAR runs).
        embedding_type: ``fourier`` (Gaussian Fourier features of ``log sigma``; the paper's choice) or
            ``positional`` (sinusoidal features of ``999 t``, as DDPM++).
        embedding_size: Fourier features (``2 embedding_size`` outputs) or sinusoidal dimension.
        fourier_scale: std of the fixed Fourier frequencies.
        temb_dim: width of the embedding MLP whose output each block projects and adds.
        conditional: use the label at all (``False``: a plain WRN, e.g. to check the parameter count).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        num_classes: int = 10,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        embedding_type: str = "fourier",
        embedding_size: int = 128,
        fourier_scale: float = 16.0,
        temb_dim: int = 512,
        conditional: bool = True,
    ):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"{type(self).__name__} needs images (C, H, W), got {tuple(shape)}")
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if shape[1] % 4 or shape[2] % 4:
            raise ValueError(f"image {shape[1]}x{shape[2]} is not divisible by 4 (two stride-2 groups)")
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"unknown embedding_type {embedding_type!r}")
        if num_classes < 2:
            raise ValueError(f"need num_classes >= 2, got {num_classes}")
        self.embedding_type, self.embedding_size, self.conditional = embedding_type, embedding_size, conditional
        self.num_classes = num_classes
        if conditional:
            fourier = embedding_type == "fourier"
            self.fourier = GaussianFourierProjection(embedding_size, fourier_scale) if fourier else None
            in_dim = 2 * embedding_size if fourier else embedding_size
            self.temb_0, self.temb_1 = nn.Linear(in_dim, temb_dim), nn.Linear(temb_dim, temb_dim)
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv_in = nn.Conv2d(shape[0], 16, 3, padding=1, bias=False)
        blocks, ch = [], 16
        for g, width in enumerate(widths):
            for i in range(n):
                stride = 2 if g > 0 and i == 0 else 1
                blocks.append(WideBlock(ch, width, temb_dim if conditional else None, stride, dropout))
                ch = width
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(ch)
        self.fc = nn.Linear(ch, num_classes)

    def embed(self, label: Tensor) -> Tensor | None:
        """``[B] -> [B, temb_dim]``, activated (every block projects it)."""
        if not self.conditional:
            return None
        if self.fourier is not None:
            emb = self.fourier(label)
        else:
            emb = sinusoidal_embedding(label, self.embedding_size)
        return F.silu(self.temb_1(F.silu(self.temb_0(emb.to(self.temb_0.weight.dtype)))))

    def forward(self, x: Tensor, label: Tensor) -> Tensor:
        """``x [B, C, H, W]``, ``label [B]`` (``log sigma_t`` or ``999 t``) -> logits ``[B, num_classes]``."""
        temb = self.embed(label)
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, temb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.fc(h)


class NoiseConditionalClassifier(nn.Module):
    """``classifier(x_t [B, ...], t [B]) -> logits [B, K]`` from a net ``net(x, label)`` and the SDE it was trained on.

    Args:
        net: ``net(x, label [B]) -> [B, K]``.
        sde: the forward SDE: the classifier only means something for the SDE (and the data scaling) of
            its training, which must equal those of the score model it guides.
        time_label: ``"t999"``, ``"log_sigma"`` or ``"t"``, as in :class:`~scoreflow.nets.ScoreModel`.
        normalize_input: feed ``x_t / sqrt(alpha_t^2 + sigma_t^2)``, which has roughly unit scale at every
            ``t`` for unit-scale data (EDM's ``c_in``, Karras et al. 2022). The identity for VP; for VE it keeps
            ``sigma_max = 50`` inputs in range. Part of the model, so guidance gradients include it.
    """

    def __init__(self, net: nn.Module, sde: SDE, time_label: TimeLabel = "log_sigma", normalize_input: bool = True):
        super().__init__()
        if time_label not in TIME_LABELS:
            raise ValueError(f"unknown time_label {time_label!r}; choose from {TIME_LABELS}")
        emb = getattr(net, "embedding_type", None)
        if (emb, time_label) in INCOMPATIBLE_LABELS:
            raise ValueError(f"embedding_type={emb!r} does not fit time_label={time_label!r}: use fourier with "
                             "log_sigma (or t), positional with t999 (or t)")
        self.net, self.sde = net, sde
        self.time_label, self.normalize_input = time_label, normalize_input

    @property
    def num_classes(self) -> int:
        return int(self.net.num_classes)

    def label(self, t: Tensor) -> Tensor:
        return time_label(self.time_label, self.sde, t)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Logits ``[B, K]`` in ``x``'s dtype; the network runs in its own (a float64 sampler's ``x`` is cast, and
        guidance gradients flow back through the cast)."""
        out_dtype = x.dtype
        if self.normalize_input:
            alpha, sigma = self.sde.marginal(t)
            x = x * append_dims(torch.rsqrt(alpha**2 + sigma**2), x.ndim).to(x.dtype)
        weight = next(self.net.parameters(), None)
        label = self.label(t)
        if weight is not None and weight.is_floating_point() and x.is_floating_point():
            x, label = x.to(weight.dtype), label.to(weight.dtype)
        return self.net(x, label).to(out_dtype)

    def log_prob(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """``log p_t(y | x_t)``, ``[B]``, for labels ``y [B]``."""
        return self(x, t).log_softmax(dim=-1).gather(1, y.long()[:, None]).squeeze(1)
