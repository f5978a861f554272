"""Likelihoods of score-based diffusion models, in nats per example.

* :func:`ode_log_likelihood`: exact ``-log p^ODE_eps(x)`` by the probability-flow ODE (SPEC §4.1).
* :func:`likelihood_bound`: the per-datapoint upper bound ``L^DSM`` of Theorem 3 (SPEC §4.3), optionally with
  the eps-truncation correction (SPEC §4.4).
* :mod:`scoreflow.likelihood.units`: nats per example -> bits/dim at the reporting edge (SPEC §4.2).
"""

from scoreflow.likelihood.bound import BoundResult, likelihood_bound
from scoreflow.likelihood.divergence import draw_probe, estimate_divergence, exact_divergence
from scoreflow.likelihood.ode import ODELikelihood, ode_log_likelihood
from scoreflow.likelihood.truncation import truncation_correction
from scoreflow.likelihood.units import bpd_offset, bpd_to_nats, mean_and_se, nats_per_dim, nats_to_bpd

__all__ = [
    "BoundResult",
    "ODELikelihood",
    "bpd_offset",
    "bpd_to_nats",
    "draw_probe",
    "estimate_divergence",
    "exact_divergence",
    "likelihood_bound",
    "mean_and_se",
    "nats_per_dim",
    "nats_to_bpd",
    "ode_log_likelihood",
    "truncation_correction",
]
