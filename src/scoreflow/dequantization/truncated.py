"""Training-free truncated-normal dequantization (Zheng et al. 2023, i-DODE, Sec. 4 "truncated-normal dequantization").

Each level ``k`` is dequantized with Gaussian noise truncated to its own bin, centred on the bin's midpoint:

    u = 1/2 + s·z,   z ~ N(0, 1) truncated to [−τ, τ],   τ = 1 / (2s),

so ``u ∈ (0, 1)`` and ``log q(u|k) = Σ_d [log N(z_d; 0, 1) − log Z + log 2τ]`` with ``Z = erf(τ/√2)``. i-DODE picks
``s`` so that, in data units, the noise std equals the diffusion's ``σ_ε/α_ε`` at the ODE's starting time ε: the
dequantized data then look like ``p_0ε(·|x)`` (which the model was trained on) except for the truncation. One bin
of data scaled by ``a`` (``a = 2`` for centred data) is ``a/K`` wide, hence ``s = K σ_ε / (a α_ε)``
(:meth:`TruncatedNormalDequantizer.from_sde`). i-DODE starts its ODE at ``x_ε = α_ε y`` of the dequantized ``y``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scoreflow.dequantization.base import Dequantizer
from scoreflow.utils import sum_except_batch


class TruncatedNormalDequantizer(Dequantizer):
    """``q(u|k)``: a normal of std ``bin_std`` (in units of one bin) around the bin centre, truncated to the bin.

    The default ``bin_std = 0.128`` matches the VP SDE at ε = 1e-5 on 8-bit centred data (``128 σ_ε``, σ_ε ≈ 1e-3).
    ``shape`` is accepted for a uniform interface with :class:`VariationalDequantizer` and checked when given.
    """

    def __init__(
        self,
        shape: tuple[int, ...] | None = None,
        num_levels: int = 256,
        bin_std: float = 0.128,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if bin_std <= 0:
            raise ValueError(f"bin_std must be positive, got {bin_std}")
        self.shape = None if shape is None else tuple(shape)
        self.num_levels, self.bin_std = num_levels, float(bin_std)
        self.dtype = torch.get_default_dtype() if dtype is None else dtype  # of u for integer levels
        self.tau = 0.5 / self.bin_std
        self.mass = math.erf(self.tau / math.sqrt(2))  # Z = P(|z| <= τ)
        # log density of u per dimension, up to −z²/2:  −½ log 2π − log Z + log 2τ
        self._log_norm = -0.5 * math.log(2 * math.pi) - math.log(self.mass) + math.log(2 * self.tau)

    @classmethod
    def from_sde(cls, sde, t: float, num_levels: int = 256, data_scale: float = 2.0, **kwargs):
        """``bin_std = K σ_t / (a α_t)``: the noise of ``p_0t`` measured in bins of data scaled by ``a``."""
        t_ = torch.tensor([t], dtype=torch.float64)
        ratio = float(sde.sigma(t_) / sde.alpha(t_))
        return cls(num_levels=num_levels, bin_std=num_levels * ratio / data_scale, **kwargs)

    def _check(self, k: Tensor) -> None:
        if self.shape is not None and tuple(k.shape[1:]) != self.shape:
            raise ValueError(f"expected levels of shape [B, {self.shape}], got {tuple(k.shape)}")

    def sample_u(self, k: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``u`` by inverting the truncated-normal CDF (float64 internally), and ``log q(u|k) [B]``."""
        self._check(k)
        dtype = k.dtype if k.is_floating_point() else self.dtype
        v = torch.rand(k.shape, generator=generator, dtype=torch.float64, device=k.device)
        z = torch.special.ndtri(0.5 * (1 - self.mass) + v * self.mass).clamp(-self.tau, self.tau)
        u = (0.5 + self.bin_std * z).clamp(torch.finfo(dtype).eps, 1 - torch.finfo(dtype).eps)
        return u.to(dtype), self._log_q(z).to(dtype)

    def _log_q(self, z: Tensor) -> Tensor:
        return sum_except_batch(self._log_norm - 0.5 * z**2)

    def log_prob_u(self, u: Tensor, k: Tensor) -> Tensor:
        """Exact ``log q(u|k) [B]``; ``−inf`` if any coordinate of ``u`` lies outside ``[0, 1]``."""
        self._check(k)
        z = (u.to(torch.float64) - 0.5) / self.bin_std
        log_q = self._log_q(z)
        outside = ((u < 0) | (u > 1)).reshape(u.shape[0], -1).any(dim=1)
        return torch.where(outside, torch.full_like(log_q, -math.inf), log_q).to(u.dtype)
