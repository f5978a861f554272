"""Where samplers get their Gaussian noise: one generator for the batch, or one generator per sample.

Every sampler in this package draws *all* of its randomness (the prior sample and the noise of each
predictor / corrector step) from a :class:`NoiseSource`. With :class:`PerSampleNoise` row ``i`` of every
draw comes from the generator seeded with ``seeds[i]`` alone, so an image depends only on its seed and not
on the batch it was drawn in (the habit of NVlabs/edm's samplers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from scoreflow.sde import SDE


class NoiseSource(Protocol):
    """Standard normal noise for a batch ``[B, ...]``."""

    def randn(self, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
        """A ``N(0, I)`` tensor of ``shape`` (``shape[0]`` is the batch size)."""
        ...


class BatchNoise:
    """All noise from one (optional) ``torch.Generator``: fast, but each row depends on the batch size."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def randn(self, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
        return torch.randn(shape, generator=self.generator, dtype=dtype, device=device)


class PerSampleNoise:
    """One generator per example, seeded with ``seeds[i]``; row ``i`` of every draw comes from generator ``i``.

    Costs one ``randn`` call per example and draw, which is negligible next to a network evaluation.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str | None = None):
        self.seeds = [int(s) for s in seeds]
        dev = torch.device("cpu" if device is None else device)
        self.generators = [torch.Generator(device=dev).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"PerSampleNoise holds {len(self.generators)} seeds, the batch has {shape[0]} rows")
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype, device=device) for g in self.generators])


def per_sample_randn(
    seeds: Sequence[int],
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``[len(seeds), *shape]`` standard normal noise, row ``i`` drawn from a generator seeded with ``seeds[i]``."""
    return PerSampleNoise(seeds, device).randn((len(seeds), *shape), dtype=dtype, device=device)


def make_noise(
    *,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> NoiseSource:
    """The noise source for a sampler call: per-sample seeds if given, else one (optional) generator."""
    if seeds is not None and generator is not None:
        raise ValueError("pass either seeds= (per-sample generators) or generator=, not both")
    return PerSampleNoise(seeds, device) if seeds is not None else BatchNoise(generator)


def initial_state(
    sde: SDE,
    shape: tuple[int, ...] | None,
    noise: Tensor | None,
    rng: NoiseSource,
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> Tensor:
    """``x_T``: the given prior sample ``noise`` or a fresh draw from the prior ``N(0, prior_std^2 I)``.

    ``dtype=None`` keeps ``noise``'s dtype (float32 for a fresh draw).
    """
    if noise is not None:
        if shape is not None and tuple(shape) != tuple(noise.shape):
            raise ValueError(f"shape {tuple(shape)} disagrees with noise of shape {tuple(noise.shape)}")
        return noise.to(dtype=dtype or noise.dtype, device=device or noise.device)
    if shape is None:
        raise ValueError("pass a shape or an initial prior sample noise=")
    return sde.prior_std * rng.randn(tuple(shape), dtype=dtype or torch.float32, device=device)
