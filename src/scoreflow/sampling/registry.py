"""The one sampler dispatch: ``sample(score_fn, sde, shape, kind=..., **options)`` (k-diffusion style).

Every sampler family is a plain function with one signature,
``fn(score_fn, sde, shape, *, seeds=, generator=, device=, dtype=, progress=, **options) -> SampleResult``,
registered under a ``kind``; ``conf/sampler/<name>.yaml`` names it as ``_target_`` with ``_partial_: true`` and
its options (a Hydra partial object with the shared call signature). Adding a family is that function,
decorated with :func:`register_sampler` in a module :mod:`scoreflow.sampling` imports, plus one YAML file;
the sample grids, ``sample.py`` and the FID all go through :func:`sampler_options` and :func:`sample`.
"""

from __future__ import annotations

import functools
import importlib
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


def sampler_options(config: Mapping[str, Any] | functools.partial) -> tuple[str, dict[str, Any]]:
    """A sampler config (``conf/sampler/*.yaml`` as a plain mapping) -> ``(kind, options)``.

    The config names its family by ``_target_`` (the registered function's dotted path, with ``_partial_: true``:
    ``hydra.utils.instantiate`` then gives ``fn(score_fn, sde, shape, **call options)``) or, as configs written
    before, by ``kind``; both must name a registered sampler. A partial of a registered function (the
    instantiated config) works too."""
    if isinstance(config, functools.partial):
        config = {"_target_": config.func, **config.keywords}
    options = dict(config)
    target = options.pop("_target_", None)
    options.pop("_partial_", None)
    kind = options.pop("kind", None)
    if target is not None:
        fn = target if callable(target) else _locate(str(target))
        kind = next((k for k, entry in SAMPLERS.items() if entry.fn is fn), None)
        if kind is None:
            raise ValueError(f"sampler._target_={target} is not a registered sampler: decorate it with "
                             f"@register_sampler(<kind>) (registered: {sorted(SAMPLERS)})")
    if kind is None:
        raise ValueError("a sampler config names its sampler by _target_ (e.g. scoreflow.sampling.ode_sample, with "
                         f"_partial_: true) or by kind (one of {sorted(SAMPLERS)}); this one has neither "
                         "(choose sampler=<a file of conf/sampler>)")
    if kind not in SAMPLERS:
        raise ValueError(f"sampler.kind must be one of {sorted(SAMPLERS)}, got {kind!r} "
                         f"(choose sampler=<a file of conf/sampler>)")
    return kind, options


def _locate(path: str) -> Any:
    """The object at a dotted path ``package.module.name`` (what Hydra's ``_target_`` names)."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"sampler._target_={path} cannot be imported: {e}") from None


def sample(score_fn: ScoreFn, sde: SDE, shape, *, kind: str = "ode", **options: Any):
    """Draw ``shape = (B, ...)`` samples with the sampler of ``kind``; returns its ``SampleResult``."""
    return get_sampler(kind).fn(score_fn, sde, shape, **options)


def describe_sampler(kind: str, options: Mapping[str, Any]) -> str:
    """One line naming the sampler and its settings (``sample.py``'s table and ``metrics.json``)."""
    return get_sampler(kind).describe(options)
