"""Turn a network ``net(x, noise_label)`` into a score function ``score(x, t)`` (docs/reference.md §2)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from scoreflow.sde import SDE
from scoreflow.utils import append_dims

Parametrization = Literal["eps", "score_over_sigma", "score"]
TimeLabel = Literal["t999", "log_sigma", "t"]
TIME_LABELS = ("t999", "log_sigma", "t")
# an embedding fed the label it was not designed for: 999 t through N(0, 16^2) Fourier features is noise,
# and log sigma (|.| < 10) barely moves the sinusoidal features, whose top frequency is 1
INCOMPATIBLE_LABELS = {("fourier", "t999"), ("positional", "log_sigma")}


def time_label(kind: TimeLabel, sde: SDE, t: Tensor) -> Tensor:
    """What a net is conditioned on at time ``t``: ``999 t``, ``log sigma_t`` or ``t`` itself."""
    if kind == "t999":
        return 999.0 * t
    if kind == "log_sigma":
        return sde.sigma(t).log()
    if kind == "t":
        return t
    raise ValueError(f"unknown time_label {kind!r}; choose from {TIME_LABELS}")


class ScoreModel(nn.Module):
    """``score(x, t)`` from a time-conditioned network.

    Args:
        net: any module called as ``net(x, label)`` with ``x [B, ...]`` and ``label [B]``, returning
            a tensor shaped like ``x``.
        sde: the forward SDE (gives ``sigma_t``).
        parametrization: ``"eps"``: the net predicts the noise, ``score = -net / sigma_t`` (DDPM++ on
            VP/subVP); ``"score_over_sigma"``: ``score = net / sigma_t`` (NCSN++'s ``scale_by_sigma`` on VE);
            ``"score"``: the net output is the score.
        time_label: what the net is conditioned on: ``"t999"`` (``999 t``, the DDPM habit, sinusoidal
            embedding), ``"log_sigma"`` (``log sigma_t``, Gaussian Fourier features) or ``"t"``.
    """

    def __init__(
        self,
        net: nn.Module,
        sde: SDE,
        parametrization: Parametrization = "eps",
        time_label: TimeLabel = "t999",
    ):
        super().__init__()
        if parametrization not in ("eps", "score_over_sigma", "score"):
            raise ValueError(f"unknown parametrization {parametrization!r}")
        if time_label not in TIME_LABELS:
            raise ValueError(f"unknown time_label {time_label!r}; choose from {TIME_LABELS}")
        emb = getattr(net, "embedding_type", None)
        if (emb, time_label) in INCOMPATIBLE_LABELS:
            raise ValueError(f"embedding_type={emb!r} does not fit time_label={time_label!r}: use fourier with "
                             "log_sigma (or t), positional with t999 (or t)")
        self.net = net
        self.sde = sde
        self.parametrization = parametrization
        self.time_label = time_label

    def label(self, t: Tensor) -> Tensor:
        return time_label(self.time_label, self.sde, t)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.net(x, self.label(t))
        if self.parametrization == "score":
            return out
        sigma = append_dims(self.sde.sigma(t), x.ndim).to(out.dtype)
        return -out / sigma if self.parametrization == "eps" else out / sigma
