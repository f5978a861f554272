"""Likelihoods of score-based diffusion models, in nats per example.

* :func:`ode_log_likelihood`: exact ``-log p^ODE_eps(x)`` by the probability-flow ODE
  (Song et al. 2021, Sec. 4.3, App. D.2).
* :func:`likelihood_bound`: the per-datapoint upper bound ``L^DSM`` of Theorem 3 (Song et al. 2021b), optionally with
  the eps-truncation correction (Song et al. 2021b, Sec. 4.3).
* :mod:`scoreflow.likelihood.units`: nats per example -> bits/dim at the reporting edge (docs/reference.md §4.2).
"""

from scoreflow.likelihood.bound import BoundPlan, BoundResult, fit_bound_plan, likelihood_bound
from scoreflow.likelihood.divergence import draw_probe, estimate_divergence, exact_divergence
from scoreflow.likelihood.ode import ODELikelihood, ode_log_likelihood
from scoreflow.likelihood.truncation import truncation_correction
from scoreflow.likelihood.units import (
    bpd_offset,
    bpd_to_nats,
    mean_and_se,
    nats_per_dim,
    nats_to_bpd,
    num_samples_for_mc_excess,
    split_standard_error,
)

__all__ = [
    "BoundPlan",
    "BoundResult",
    "ODELikelihood",
    "bpd_offset",
    "bpd_to_nats",
    "draw_probe",
    "estimate_divergence",
    "exact_divergence",
    "fit_bound_plan",
    "likelihood_bound",
    "mean_and_se",
    "nats_per_dim",
    "nats_to_bpd",
    "num_samples_for_mc_excess",
    "ode_log_likelihood",
    "split_standard_error",
    "truncation_correction",
]
