"""Samplers for score-based models (Song et al. 2021): PC, probability-flow ODE, latents, controllable generation.

Every sampler takes ``score_fn(x [B, ...], t [B]) -> score`` and an :class:`~scoreflow.sde.SDE`, works for
any shape ``[B, ...]`` and every SDE, draws all its noise from one generator or per-sample seeds, and
returns a :class:`SampleResult` ``(samples, nfe)``. :func:`sample` (``kind="ode" | "pc" | ...``) is the one
dispatch over the families registered with :func:`register_sampler` (see :mod:`scoreflow.sampling.registry`).
"""

from scoreflow.sampling.controllable import (
    COLOR_DECOUPLE,
    center_mask,
    classifier_guided_score,
    colorize,
    couple,
    decouple,
    guided_score,
    half_mask,
    inpaint,
    mask_from_png,
    random_mask,
)
from scoreflow.sampling.correctors import (
    CORRECTORS,
    AnnealedLangevin,
    Corrector,
    LangevinCorrector,
    NoneCorrector,
    get_corrector,
)
from scoreflow.sampling.latent import RoundTrip, decode, encode, interpolate, round_trip
from scoreflow.sampling.noise import BatchNoise, NoiseSource, PerSampleNoise, per_sample_randn
from scoreflow.sampling.ode import ode_sample, ode_text, solve_probability_flow
from scoreflow.sampling.pc import SampleResult, pc_sample, time_grid, tweedie_denoise
from scoreflow.sampling.predictors import (
    PREDICTORS,
    Ancestral,
    EulerMaruyama,
    NonePredictor,
    PlugInReverseSDE,
    Predictor,
    ProbabilityFlow,
    ReverseDiffusion,
    ScoreFn,
    get_predictor,
)
from scoreflow.sampling.registry import (
    SAMPLERS,
    describe_sampler,
    get_sampler,
    register_sampler,
    sample,
    sampler_options,
)

__all__ = [
    "sample",
    "SAMPLERS",
    "register_sampler",
    "get_sampler",
    "sampler_options",
    "describe_sampler",
    "ode_text",
    "SampleResult",
    "pc_sample",
    "ode_sample",
    "solve_probability_flow",
    "time_grid",
    "tweedie_denoise",
    "ScoreFn",
    "Predictor",
    "PREDICTORS",
    "get_predictor",
    "NonePredictor",
    "EulerMaruyama",
    "ReverseDiffusion",
    "ProbabilityFlow",
    "PlugInReverseSDE",
    "Ancestral",
    "Corrector",
    "CORRECTORS",
    "get_corrector",
    "NoneCorrector",
    "LangevinCorrector",
    "AnnealedLangevin",
    "NoiseSource",
    "BatchNoise",
    "PerSampleNoise",
    "per_sample_randn",
    "encode",
    "decode",
    "round_trip",
    "RoundTrip",
    "interpolate",
    "guided_score",
    "classifier_guided_score",
    "inpaint",
    "colorize",
    "decouple",
    "couple",
    "COLOR_DECOUPLE",
    "center_mask",
    "half_mask",
    "random_mask",
    "mask_from_png",
]
