"""The settings of the Lightning modules: one typed, frozen dataclass per group, whose field defaults are the
only defaults in the code base.

* :class:`OptimConfig` (``module.optim``): Adam, the linear warm-up, an optional cosine decay and the clip.
* :class:`EvalConfig` (``module.evaluation``): the validation and test likelihoods (bound and ODE).
* :class:`DequantConfig` (``module.dequant``): the objective of a learnable dequantizer.

Defaults are those of the paper's CIFAR-10 runs (Song et al. 2021b, App. B; Song et al. 2021, App. D.2); the
YAML files of ``conf/`` only override them (the small default run, the presets). Hydra merges these classes
under the YAML as a typed schema (:mod:`scoreflow.tasks.schema`), so a key that is not a field, or a value of
the wrong type, is an error when the config is composed, and ``--cfg job`` shows every value. Python callers
pass plain mappings (or instances); :meth:`Settings.from_mapping` rejects unknown keys with the list of the
known ones. Change a value of a built module with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

S = TypeVar("S", bound="Settings")


class Settings:
    """Mixin of the settings dataclasses: strict construction from a mapping, and back to a plain dict."""

    group: ClassVar[str] = ""  # the config key these settings live under, for messages

    @classmethod
    def from_mapping(cls: type[S], values: Mapping[str, Any] | S | None = None) -> S:
        """The settings with ``values`` over the defaults; ``None`` values of non-optional fields keep the
        default (a null in an older config). Unknown keys raise ``ValueError`` naming the known ones."""
        if isinstance(values, cls):
            return values
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            close = {u: difflib.get_close_matches(u, names, n=1) for u in unknown}
            hint = "; ".join(f"{u} (did you mean {c[0]}?)" for u, c in close.items() if c)
            raise ValueError(f"unknown {cls.group or cls.__name__} settings {unknown}"
                             f"{': ' + hint if hint else ''}; known: {sorted(names)}")
        kw = {}
        for name, value in values.items():
            kind = hints[name]
            if value is None and not _optional(kind):
                continue
            kw[name] = _coerce(value, kind, f"{cls.group}.{name}" if cls.group else name)
        return cls(**kw)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _optional(kind: Any) -> bool:
    return type(None) in typing.get_args(kind)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """``value`` as the field's type (YAML gives ints for floats, lists for tuples, strings for numbers)."""
    if value is None:
        return None
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    origin = typing.get_origin(kind)
    if origin is tuple:
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        return _coerce(value, args[0], key)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "false"):
                    return value.lower() == "true"
                raise ValueError
            return bool(value)
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}={value!r} is not a valid {kind.__name__}") from None
    return value


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclass(frozen=True)
class OptimConfig(Settings):
    """Adam with a linear warm-up, an optional cosine decay and a global-norm clip (Song et al. 2021, App. D)."""

    group: ClassVar[str] = "module.optim"
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 5000  # linear warm-up of the learning rate over this many steps
    grad_clip: float | None = 1.0  # global-norm clip; null or <= 0: none
    decay_steps: int | None = None  # cosine decay of the lr to min_lr_ratio at this step; null: none
    min_lr_ratio: float = 0.0
    # Adam(fused=True) and a NaN guard without a host sync per step (GPU speed; README "GPU speed"): a non-finite
    # step is skipped on the device (weights and Adam state unchanged) but still counts as a step
    fused: bool = False
    # micro-batches per optimizer step: the step's gradient is that of datamodule.batch_size x this many images
    # (per rank), for batches that do not fit in memory; steps, schedule, EMA and val/checkpoint/sample intervals
    # stay in optimizer steps
    accumulate_grad_batches: int = 1


@dataclass(frozen=True)
class EvalConfig(Settings):
    """The validation and test likelihoods (see README "The bound" and "ODE likelihood speed")."""

    group: ClassVar[str] = "module.evaluation"
    eps: float | None = None  # smallest time of both likelihoods; None: the time sampler's eps
    val_num_t: int = 100  # bound times per image at validation
    test_num_t: int = 1000  # bound times per image at test
    importance_sampling: bool = True
    truncation_correction: bool = False  # the eps-truncation correction of the bound (Song et al. 2021b, Sec. 4.3)
    bound_estimator: str = "paired"  # closed_form | paired | monte_carlo
    stratified: bool = True  # stratified time samples (unbiased, lower variance)
    bound_antithetic: bool = False  # pairs (z, -z) at each bound time
    bound_plan: str = "none"  # none | fit: a time plan (control variate, time density, baseline) fitted once
    bound_plan_images: int = 32  # images whose pilot draws fit it
    rtol: float = 1e-5  # adaptive ODE solvers (and evaluate.py's solver check at rtol/100)
    atol: float = 1e-5
    method: str = "dopri5"  # adaptive: dopri5 | bosh3 | ...; fixed grid: rk4 | rk4_shared | exp_pc3 | heun3 | ...
    steps: int | None = None  # fixed-grid methods only: steps on the power grid
    grid_rho: float | None = None  # its exponent; None: the SDE's (3 VP/subVP, 1 VE; at most 2 with exp_pc*)
    divergence: str = "rademacher"  # rademacher | gaussian | exact
    ode_dtype: str = "float64"
    nll_every: int = 500  # steps between validation ODE likelihoods; 0: never
    nll_subset: int = 64  # validation images of that ODE likelihood
    test_ode: bool = True
    test_bound: bool = True
    test_repeats: int = 1  # passes over dequantization noise and probes at test
    seed: int = 0  # per-image noise of the test phase and evaluate.py (not the training seed: runs share it)


@dataclass(frozen=True)
class DequantConfig(Settings):
    """The objective ``J_φ`` of a learnable dequantizer (Song et al. 2021b, Eq. 13; lit/dequant_module.py)."""

    group: ClassVar[str] = "module.dequant"
    weight: float = 1.0  # joint mode: weight of J_φ (nats per dimension) next to the score model's loss
    freeze_score: bool = False  # True: "after" mode, only φ trains (train_dequant.py)
    num_t: int = 1  # importance-sampled times per image in the training estimate of the bound
    num_eps_samples: int = 1  # x_eps draws of the ε-correction per image
    importance_sampling: bool = True
    truncation_correction: bool = True


SCHEMAS: dict[str, type[Settings]] = {"optim": OptimConfig, "evaluation": EvalConfig, "dequant": DequantConfig}


def protocol_string(cfg: Any) -> str:
    """One line naming the evaluation protocol of a score model's test phase (solver, bound, dequantization), from a
    run's composed config (``DictConfig``): ``metrics.json``'s ``protocol``, the results table, the ``meta`` of
    ``test_per_example.npz``."""
    e = cfg.module.evaluation
    deq = cfg.get("dequantization")
    deq_name = str(deq.get("_target_", "?")).rsplit(".", 1)[-1] if deq else "none"
    from scoreflow.likelihood.ode import FIXED_GRID_METHODS

    solve = (f"{e.get('steps')} steps" if e.method in FIXED_GRID_METHODS else f"rtol={e.rtol} atol={e.atol}")
    extras = "".join(f" {name}" for name, on in (("stratified", e.get("stratified")),
                                                 ("antithetic", e.get("bound_antithetic")),
                                                 ("plan=fit", (e.get("bound_plan") or "none") == "fit")) if on)
    return (
        f"eps={e.get('eps') or cfg.get('eps') or 'sde default'}, dequantization={deq_name}, "  # the likelihoods'
        f"ODE {e.method} {solve} {e.divergence} "
        f"{e.ode_dtype}, bound num_t={e.test_num_t} IS={e.importance_sampling} {e.bound_estimator}{extras} "
        f"eps-correction={e.truncation_correction}, repeats={e.test_repeats}"
    )


def adam_only_settings(o: OptimConfig) -> list[str]:
    """The built-in Adam's own settings (betas, eps, weight_decay, fused) that ``o`` changes from their defaults:
    they would be ignored beside a ``module.optimizer`` factory, so setting both is an error."""
    return sorted(k for k in ("betas", "eps", "weight_decay", "fused") if getattr(o, k) != getattr(OptimConfig(), k))
