"""`sampler=lambda_family sampler.lam=...` reaches Huang et al.'s plug-in reverse SDE (Eq. 27) through the real
config and the one sampler dispatch (scoreflow.sampling.sample) that sample.py, evaluate.py's FID and the sample
grids use."""

import pytest
import torch

from scoreflow.oracles import GaussianMixture
from scoreflow.sampling import PlugInReverseSDE, pc_sample, sample
from scoreflow.sde import SubVPSDE
from scoreflow.tasks.fid import sampler_kwargs

MIX = GaussianMixture(torch.tensor([0.5, 0.5]), torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), torch.tensor([0.2, 0.3]))


@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0])
def test_config_dispatches_to_the_lambda_family(make_cfg, lam):
    cfg = make_cfg(["sampler=lambda_family", f"sampler.lam={lam}", "sampler.steps=50"], config_name="sample")
    kind, kw = sampler_kwargs(cfg.sampler)
    assert kind == "pc" and kw["predictor"] == "lambda_family" and kw["lam"] == lam and kw["corrector"] == "none"
    sde = SubVPSDE()
    got = sample(MIX.score_fn(sde), sde, (6, 2), kind=kind, seeds=list(range(6)), dtype=torch.float64, **kw)
    ref = pc_sample(MIX.score_fn(sde), sde, (6, 2), predictor=PlugInReverseSDE(lam), corrector="none", steps=50,
                    seeds=list(range(6)), dtype=torch.float64)
    torch.testing.assert_close(got.samples, ref.samples, rtol=0, atol=0)
    assert got.nfe == 51


def test_lam_with_another_predictor_is_refused(make_cfg):
    cfg = make_cfg(["sampler=lambda_family", "sampler.predictor=reverse_diffusion", "sampler.lam=0.5"],
                   config_name="sample")
    kind, kw = sampler_kwargs(cfg.sampler)
    with pytest.raises(ValueError, match="only used by predictor=lambda_family"):
        sample(MIX.score_fn(SubVPSDE()), SubVPSDE(), (2, 2), kind=kind, seeds=[0, 1], **kw)


@pytest.mark.parametrize("variance", ["posterior", "forward"])
def test_config_reaches_the_ancestral_variance(make_cfg, variance):
    """`sampler.predictor=ancestral sampler.variance=...` (default auto: Eq. 4's beta_i for VP/subVP)."""
    from scoreflow.sampling import Ancestral
    from scoreflow.tasks import validate

    cfg = make_cfg(["sampler=pc", "sampler.predictor=ancestral", f"sampler.variance={variance}", "sampler.steps=20",
                    "sampler.corrector=none"], config_name="sample")
    validate.sampler(cfg)
    kind, kw = sampler_kwargs(cfg.sampler)
    sde = SubVPSDE()
    got = sample(MIX.score_fn(sde), sde, (6, 2), kind=kind, seeds=list(range(6)), dtype=torch.float64, **kw)
    ref = pc_sample(MIX.score_fn(sde), sde, (6, 2), predictor=Ancestral(variance), corrector="none", steps=20,
                    seeds=list(range(6)), dtype=torch.float64)
    torch.testing.assert_close(got.samples, ref.samples, rtol=0, atol=0)


def test_a_bad_ancestral_variance_is_a_config_error(make_cfg):
    from scoreflow.tasks import validate
    from scoreflow.tasks.errors import ConfigError

    cfg = make_cfg(["sampler=pc", "sampler.predictor=ancestral", "sampler.variance=posterio"], config_name="sample")
    with pytest.raises(ConfigError, match="unknown ancestral variance") as e:
        validate.sampler(cfg)
    assert "posterior" in str(e.value.fix)
    other = make_cfg(["sampler=pc", "sampler.variance=forward"], config_name="sample", sub="other")
    with pytest.raises(ConfigError, match="only used by sampler.predictor=ancestral"):
        validate.sampler(other)
