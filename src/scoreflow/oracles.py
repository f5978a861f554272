"""Exact scores and log-densities of Gaussian-mixture data under any linear SDE.

If ``x0 ~ sum_k w_k N(mu_k, diag(v_k))`` then every marginal of the forward SDE is the mixture
``p_t = sum_k w_k N(alpha_t mu_k, diag(alpha_t^2 v_k + sigma_t^2))``, so its score and log-density are
exact at every ``t``. These are the ground truth of the test suite and a public helper: plug
:meth:`GaussianMixture.score_fn` into :func:`scoreflow.likelihood.ode_log_likelihood` to check that
your solver settings reproduce :meth:`GaussianMixture.log_prob` before trusting them on a network.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scoreflow.sde import SDE


class GaussianMixture:
    """A diagonal Gaussian mixture on ``R^D`` (data of shape ``[B, *event_shape]``).

    Args:
        weights: ``[K]`` mixture weights (normalised here).
        means: ``[K, D]`` component means.
        variances: ``[K, D]`` (or ``[K]``, isotropic) component variances; zero is allowed (a point mass,
            valid only for ``t > 0`` under an SDE with ``sigma_t > 0``).
        event_shape: shape of one example (defaults to ``(D,)``), e.g. ``(1, 2, 2)`` for tiny images.
    """

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        variances: Tensor,
        event_shape: tuple[int, ...] | None = None,
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        K, D = means.shape
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if variances.ndim == 1:
            variances = variances[:, None].expand(K, D)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        self.log_w = (weights / weights.sum()).log()
        self.means, self.variances = means, variances.clone()
        self.event_shape = (D,) if event_shape is None else tuple(event_shape)
        if math.prod(self.event_shape) != D:
            raise ValueError(f"event_shape {self.event_shape} does not hold D={D} dimensions")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _params(self, sde: SDE | None, t: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
        """Means ``[B or 1, K, D]`` and variances of the marginal at time t (data if ``sde`` is None)."""
        mu = self.means.to(like)[None]
        var = self.variances.to(like)[None]
        if sde is None:
            return mu, var
        alpha, sigma = sde.marginal(t.to(like))
        return alpha[:, None, None] * mu, alpha[:, None, None] ** 2 * var + sigma[:, None, None] ** 2

    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)

    def _component_logp(self, x: Tensor, sde: SDE | None, t: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        xf = self._flat(x)
        mu, var = self._params(sde, t, xf)
        diff = xf[:, None, :] - mu  # [B, K, D]
        comp = -0.5 * (diff**2 / var + var.log() + math.log(2 * math.pi)).sum(-1) + self.log_w.to(xf)
        return comp, diff, var

    def log_prob(self, x: Tensor, sde: SDE | None = None, t: Tensor | None = None) -> Tensor:
        """``log p_t(x)`` in nats, ``[B]``; the data density when ``sde`` is ``None``."""
        comp, _, _ = self._component_logp(x, sde, t)
        return comp.logsumexp(dim=1)

    def score(self, x: Tensor, sde: SDE | None = None, t: Tensor | None = None) -> Tensor:
        """``grad_x log p_t(x)``, shaped like ``x``."""
        comp, diff, var = self._component_logp(x, sde, t)
        resp = comp.softmax(dim=1)  # [B, K]
        s = -(resp[..., None] * diff / var).sum(dim=1)
        return s.reshape(x.shape)

    def score_fn(self, sde: SDE):
        """A ``score_fn(x, t)`` with the exact score of the marginals of ``sde``."""
        return lambda x, t: self.score(x, sde, t)

    def sample(
        self,
        n: int,
        sde: SDE | None = None,
        t: float | None = None,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Tensor:
        """``n`` samples of the data (or of the marginal at time ``t``), shape ``[n, *event_shape]``.

        Drawn in float64 and returned in ``dtype``, float64 by default: the oracle's precision, on which its tests
        and benches rely, unlike ``TimeSampler.sample`` and the nets (torch's default dtype, float32). For a
        float32 network pass ``dtype=torch.float32``; a mismatch fails inside the network, and the library's entry
        points add a note naming the dtypes of ``x`` and ``t`` to that error.
        """
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[k] + self.variances[k].sqrt() * eps
        if sde is not None:
            tt = torch.full((n,), float(t), dtype=torch.float64)
            z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
            x = sde.perturb(x, tt, z)
        return x.reshape(n, *self.event_shape).to(dtype)

    def mean_cov(self, sde: SDE | None = None, t: float | None = None) -> tuple[Tensor, Tensor]:
        """Exact mean ``[D]`` and covariance ``[D, D]`` of the data or of the marginal at time ``t``."""
        like = self.means
        tt = None if sde is None else torch.tensor([float(t)], dtype=torch.float64)
        mu, var = self._params(sde, tt, like)
        mu, var, w = mu[0], var[0], self.log_w.exp()
        mean = (w[:, None] * mu).sum(0)
        second = (w[:, None, None] * (torch.diag_embed(var) + mu[:, :, None] * mu[:, None, :])).sum(0)
        return mean, second - mean[:, None] * mean[None, :]


def gaussian(mean: Tensor, var: float | Tensor, event_shape: tuple[int, ...] | None = None) -> GaussianMixture:
    """A single Gaussian as a one-component mixture."""
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
    var = torch.as_tensor(var, dtype=torch.float64).reshape(1, -1).expand_as(mean)
    return GaussianMixture(torch.ones(1), mean, var, event_shape)
