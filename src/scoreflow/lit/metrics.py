"""A DDP-safe running mean with its standard error (per-example values in, mean +- s.e. out)."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class MeanSE(Metric):
    """Accumulates ``sum``, ``sum of squares`` and ``count`` (synced across ranks by summation)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().double().reshape(-1)
        self.total += v.sum()
        self.total_sq += (v**2).sum()
        self.count += v.numel()

    def compute(self) -> torch.Tensor:
        """``[mean, standard error]`` (sample std / sqrt(n); s.e. is 0 for fewer than 2 values)."""
        n = self.count.clamp_min(1)
        mean = self.total / n
        var = (self.total_sq - n * mean**2).clamp_min(0) / (n - 1).clamp_min(1)
        se = (var / n).sqrt() if self.count >= 2 else torch.zeros_like(mean)
        return torch.stack([mean, se])


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of a 1-d sequence of floats."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() == 0:
        return math.nan, math.nan
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0
    return float(v.mean()), se
