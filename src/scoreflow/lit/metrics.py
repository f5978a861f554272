"""A DDP-safe running mean with its standard error (per-example values in, mean +- s.e. out)."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from scoreflow.likelihood import mean_and_se


class MeanSE(Metric):
    """Gathers the per-example values (concatenated across ranks) and reduces them with
    :func:`scoreflow.likelihood.mean_and_se`, the one standard-error convention (one value: s.e. NaN)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().double().reshape(-1)
        self.values.append(v)
        self.count += v.numel()

    def compute(self) -> torch.Tensor:
        """``[mean, standard error]`` in float64 (``[nan, nan]`` before any value)."""
        values = dim_zero_cat(self.values) if self.count > 0 else torch.zeros(0, dtype=torch.float64)
        return torch.tensor(mean_and_se(values), dtype=torch.float64, device=self.count.device)
