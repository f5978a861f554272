"""The LightningModule is an object of the config (``module._target_``): a subclass is one override, a module
that does not fit the dequantization is refused naming both choices, and configs of earlier releases (no
``_target_``) still build the module their dequantizer needs."""

import pytest
from omegaconf import open_dict

from scoreflow.lit.dequant_module import DequantLitModule
from scoreflow.lit.module import ScoreLitModule
from scoreflow.nets import ScoreModel
from scoreflow.tasks.build import build_module
from scoreflow.tasks.errors import ConfigError


class Tagged(ScoreLitModule):
    """A user's subclass (e.g. another loss), reached by ``module._target_`` alone."""


def test_a_subclass_is_one_override(make_cfg):
    m = build_module(make_cfg(["debug=fast", f"module._target_={__name__}.Tagged"]))
    assert type(m) is Tagged and m.optim_cfg.lr == 6e-3


def test_the_default_targets(make_cfg):
    assert type(build_module(make_cfg(["debug=fast"]))) is ScoreLitModule
    assert type(build_module(make_cfg(["debug=fast", "dequantization=variational"]))) is DequantLitModule


def test_a_module_that_does_not_fit_is_refused(make_cfg):
    cfg = make_cfg(["debug=fast", "dequantization=variational", "module._target_=scoreflow.lit.module.ScoreLitModule"])
    with pytest.raises(ConfigError, match=r"module._target_=ScoreLitModule does not fit dequantization="
                                          r"VariationalDequantizer: that needs .*DequantLitModule"):
        build_module(cfg)
    with pytest.raises(ConfigError, match=r"module._target_=torch.nn.Linear is not a ScoreLitModule"):
        build_module(make_cfg(["debug=fast", "module._target_=torch.nn.Linear"]))


@pytest.mark.parametrize("deq,cls", [("uniform", ScoreLitModule), ("variational", DequantLitModule)])
def test_configs_without_a_target_still_build(make_cfg, deq, cls):
    cfg = make_cfg(["debug=fast", f"dequantization={deq}"])
    with open_dict(cfg):
        del cfg.module["_target_"]
    assert type(build_module(cfg)) is cls


def test_the_optimizer_is_a_partial_object(make_cfg):
    """``module.optimizer`` replaces the built-in Adam (called with module.optim.lr); the warm-up schedule, the
    clip and the NaN guard stay; Adam's own keys set beside it are refused naming both."""
    import torch

    adamw = "module.optimizer={_target_: torch.optim.AdamW, _partial_: true, weight_decay: 0.05}"
    m = build_module(make_cfg(["debug=fast", adamw]))
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.05
    assert opt.param_groups[0]["initial_lr"] == m.optim_cfg.lr and sched.get_last_lr()[0] < m.optim_cfg.lr  # warm-up
    assert type(build_module(make_cfg(["debug=fast"])).configure_optimizers()["optimizer"]) is torch.optim.Adam
    with pytest.raises(ConfigError, match=r"module.optim \['weight_decay'\] configure the built-in Adam, but "
                                          r"module.optimizer=torch.optim.AdamW replaces it"):
        build_module(make_cfg(["debug=fast", adamw, "module.optim.weight_decay=0.1"]))
    with pytest.raises(ConfigError, match="module.optimizer must be a Hydra partial object"):
        build_module(make_cfg(["debug=fast", "module.optimizer={_target_: torch.optim.SGD}"]))


class Shifted(ScoreModel):
    """A user's score-model wrapper (another parametrization, say), reached by ``model._target_`` alone."""


def test_the_score_model_wrapper_is_an_object(make_cfg):
    m = build_module(make_cfg(["debug=fast", f"model._target_={__name__}.Shifted", "model.time_label=t"]))
    assert type(m.score_model) is Shifted and m.score_model.time_label == "t"
    with pytest.raises(ConfigError, match=r"model._target_=torch.nn.Linear is not a ScoreModel"):
        build_module(make_cfg(["debug=fast", "model._target_=torch.nn.Linear"]))
    cfg = make_cfg(["debug=fast"])
    with open_dict(cfg):  # a config of an earlier release: no model._target_, the same model and no difference
        del cfg.model["_target_"]
    assert type(build_module(cfg).score_model) is ScoreModel
    from scoreflow.tasks.build import to_container
    from scoreflow.tasks.validate import config_differences

    assert config_differences(to_container(cfg), to_container(make_cfg(["debug=fast"]))) == []
    assert config_differences(to_container(make_cfg(["debug=fast", f"model._target_={__name__}.Shifted"])),
                              to_container(make_cfg(["debug=fast"]))) != []
