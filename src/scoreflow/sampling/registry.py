"""The one sampler dispatch: ``sample(score_fn, sde, shape, kind=..., **options)`` (k-diffusion style).

Every sampler family is a plain function with one signature,
``fn(score_fn, sde, shape, *, seeds=, generator=, device=, dtype=, progress=, **options) -> SampleResult``,
registered under the ``kind`` that ``conf/sampler/<name>.yaml`` names. Adding a family is that function,
decorated with :func:`register_sampler` in a module :mod:`scoreflow.sampling` imports, plus one YAML file;
the sample grids, ``sample.py`` and the FID all go through :func:`sample`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from scoreflow.sde import SDE
from scoreflow.utils import ScoreFn

SamplerFn = Callable[..., Any]
"""``fn(score_fn, sde, shape, **options) -> SampleResult``."""


@dataclass(frozen=True)
class SamplerEntry:
    """A registered family: its function and a one-line description of a configuration of it."""

    fn: SamplerFn
    describe: Callable[[Mapping[str, Any]], str]


SAMPLERS: dict[str, SamplerEntry] = {}
"""``kind`` -> :class:`SamplerEntry`, filled by :func:`register_sampler`."""


def _generic_text(kind: str) -> Callable[[Mapping[str, Any]], str]:
    return lambda options: f"{kind} " + ", ".join(f"{k}={v}" for k, v in options.items())


def register_sampler(kind: str, *, describe: Callable[[Mapping[str, Any]], str] | None = None):
    """Decorator: register ``fn`` as the sampler of ``kind`` (``describe(options)``: its text in reports)."""

    def deco(fn: SamplerFn) -> SamplerFn:
        if kind in SAMPLERS and SAMPLERS[kind].fn is not fn:
            raise ValueError(f"sampler kind {kind!r} is already registered ({SAMPLERS[kind].fn.__qualname__})")
        SAMPLERS[kind] = SamplerEntry(fn, describe or _generic_text(kind))
        return fn

    return deco


def get_sampler(kind: str) -> SamplerEntry:
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler kind {kind!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[kind]


def sampler_options(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A sampler config (``conf/sampler/*.yaml`` as a plain mapping) -> ``(kind, options)``; checks ``kind``."""
    options = dict(config)
    kind = options.pop("kind", None)
    if kind not in SAMPLERS:
        raise ValueError(f"sampler.kind must be one of {sorted(SAMPLERS)}, got {kind!r} "
                         f"(choose sampler=<a file of conf/sampler>)")
    return kind, options


def sample(score_fn: ScoreFn, sde: SDE, shape, *, kind: str = "ode", **options: Any):
    """Draw ``shape = (B, ...)`` samples with the sampler of ``kind``; returns its ``SampleResult``."""
    return get_sampler(kind).fn(score_fn, sde, shape, **options)


def describe_sampler(kind: str, options: Mapping[str, Any]) -> str:
    """One line naming the sampler and its settings (``sample.py``'s table and ``metrics.json``)."""
    return get_sampler(kind).describe(options)
