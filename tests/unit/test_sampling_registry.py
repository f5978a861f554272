"""The one sampler dispatch (scoreflow.sampling.sample): every registered kind is reachable by name, a new
family is one registered function, an unknown kind is refused naming the choices, and the report text of
the two built-in families is the one sample.py has always printed."""

import pytest
import torch

from scoreflow.oracles import GaussianMixture
from scoreflow.sampling import (
    SAMPLERS,
    SampleResult,
    describe_sampler,
    ode_sample,
    pc_sample,
    register_sampler,
    sample,
    sampler_options,
)
from scoreflow.sde import VPSDE

MIX = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.2, 0.3]))


def test_builtin_kinds_dispatch_to_their_functions():
    assert SAMPLERS["ode"].fn is ode_sample and SAMPLERS["pc"].fn is pc_sample
    sde = VPSDE()
    kw = dict(seeds=[0, 1, 2], dtype=torch.float64)
    got = sample(MIX.score_fn(sde), sde, (3, 2), kind="ode", method="rk4", steps=20, **kw)
    ref = ode_sample(MIX.score_fn(sde), sde, (3, 2), method="rk4", steps=20, **kw)
    torch.testing.assert_close(got.samples, ref.samples, rtol=0, atol=0)
    got = sample(MIX.score_fn(sde), sde, (3, 2), kind="pc", steps=20, corrector="none", **kw)
    ref = pc_sample(MIX.score_fn(sde), sde, (3, 2), steps=20, corrector="none", **kw)
    torch.testing.assert_close(got.samples, ref.samples, rtol=0, atol=0)


def test_a_new_family_is_one_registered_function(monkeypatch):
    monkeypatch.setattr("scoreflow.sampling.registry.SAMPLERS", dict(SAMPLERS))

    @register_sampler("prior")
    def prior_sample(score_fn, sde, shape, *, scale=1.0, **_):
        return SampleResult(samples=scale * torch.ones(shape), nfe=0)

    kind, kw = sampler_options({"kind": "prior", "scale": 3.0})
    res = sample(None, VPSDE(), (2, 2), kind=kind, **kw)
    assert res.nfe == 0 and torch.equal(res.samples, torch.full((2, 2), 3.0))
    assert describe_sampler(kind, kw) == "prior scale=3.0"
    assert "prior" not in SAMPLERS  # the registry of this test only


def test_unknown_kind_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown sampler kind 'sde'; choose from \['ode', 'pc'\]"):
        sample(None, VPSDE(), (1, 2), kind="sde")
    with pytest.raises(ValueError, match=r"names its sampler by _target_ .* or by kind \(one of \['ode', 'pc'\]\); "
                                         r"this one has neither"):
        sampler_options({"method": "rk4"})
    with pytest.raises(ValueError, match=r"sampler.kind must be one of \['ode', 'pc'\], got 'sde'"):
        sampler_options({"kind": "sde"})
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("ode")(lambda *a, **k: None)


def test_report_text_of_the_builtin_families():
    ode = {"method": "rk4", "rtol": 1e-5, "atol": 1e-5, "steps": 50, "eps": None, "denoise": True}
    assert describe_sampler("ode", ode) == "probability-flow ODE rk4 steps=50, denoise=True"
    assert describe_sampler("ode", {**ode, "method": "dopri5"}) == \
        "probability-flow ODE dopri5 rtol=1e-05 atol=1e-05, denoise=True"
    pc = {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16, "n_steps": 1, "steps": None,
          "denoise": False}
    assert describe_sampler("pc", pc) == \
        "PC reverse_diffusion + langevin (snr=0.16, n_steps=1), steps=N, denoise=False"


def test_sampler_configs_are_partial_objects_with_the_shared_signature():
    """conf/sampler/*.yaml are Hydra ``_target_`` + ``_partial_`` objects: instantiated, each is
    ``fn(score_fn, sde, shape, seeds=...)`` and draws what the registry dispatch draws from the same config."""
    from pathlib import Path

    import hydra
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "sampler"
    sde = VPSDE()
    files = sorted(conf.glob("*.yaml"))
    assert {p.stem for p in files} >= {"ode", "pc", "lambda_family"}
    fast = {"ode": {"method": "rk4", "steps": 8}, "pc": {"steps": 8, "corrector": "none"},
            "lambda_family": {"steps": 8}}
    for path in files:
        cfg = OmegaConf.merge(OmegaConf.load(path), fast.get(path.stem, {}))
        fn = hydra.utils.instantiate(cfg)
        got = fn(MIX.score_fn(sde), sde, (3, 2), seeds=[0, 1, 2], dtype=torch.float64)
        kind, kw = sampler_options(OmegaConf.to_container(cfg))
        assert sampler_options(fn) == (kind, kw)  # the instantiated object names the same sampler and options
        ref = sample(MIX.score_fn(sde), sde, (3, 2), kind=kind, seeds=[0, 1, 2], dtype=torch.float64, **kw)
        torch.testing.assert_close(got.samples, ref.samples, rtol=0, atol=0)


def test_an_unregistered_target_is_refused():
    with pytest.raises(ValueError, match=r"sampler._target_=torch.zeros is not a registered sampler"):
        sampler_options({"_target_": "torch.zeros", "_partial_": True})
    with pytest.raises(ValueError, match=r"sampler._target_=scoreflow.sampling.nope cannot be imported"):
        sampler_options({"_target_": "scoreflow.sampling.nope"})
