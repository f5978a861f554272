"""The sampling audit's defects, each through the code a user reaches (entry points in a subprocess where the
defect was on the screen):

1. a score_sde_pytorch ``.pth`` of another architecture is one screen (key counts, the first keys, what the
   checkpoint holds, the ``model=`` that fits it), from the preflight and from ``load_model``; a checkpoint of no
   known kind says "an unknown checkpoint" and which files are accepted;
2. ``bench/dequantization.py`` prints the checkpoint's SDE, not always "VP";
3. an unknown ``sampler.<key>`` that another sampler config has names that config;
4. ``train_dequant.py score_ckpt=<a train_dequant.py checkpoint>`` is refused, naming its kind;
5. conditional sampling reports the classifier's gradient evaluations beside the score model's;
6. ``train_classifier.py`` accepts ``extras.print_config`` and writes its results table to its log too.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from scoreflow.nets.ncsnpp import NCSNpp
from scoreflow.nets.sp_checkpoint import CheckpointMismatchError, save_score_sde_checkpoint
from scoreflow.tasks import validate
from scoreflow.tasks.errors import format_error
from tests.integration.conftest import compose_cfg
from tests.integration.test_entry_errors import ROOT, check_screen, cli, cli_batch, written

TINY = dict(nf=16, ch_mult=[1, 2], num_res_blocks=1)  # the audit's fake checkpoint: DDPM++-style by default
TINY_NCSN = dict(TINY, attn_resolutions=[4], fir=True, progressive_input="residual", embedding_type="fourier")
NCSN_FIX = "model=ncsnpp model.net.nf=16 'model.net.ch_mult=[1,2]' model.net.num_res_blocks=1 " \
           "'model.net.attn_resolutions=[4]'"
DDPM_FIX = "model=ddpmpp model.net.nf=16 'model.net.ch_mult=[1,2]' model.net.num_res_blocks=1"


def sp_checkpoint(path: Path, **net) -> Path:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_score_sde_checkpoint(path, NCSNpp((1, 8, 8), **net))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit_sampling")
    sp_checkpoint(d / "fake" / "checkpoint_1.pth", **TINY)
    sp_checkpoint(d / "ncsn" / "checkpoint_2.pth", **TINY_NCSN)
    torch.save({"weights": torch.zeros(3), "epoch": 4}, d / "random.pth")
    stored = OmegaConf.to_container(compose_cfg([], d / "compose"), resolve=True)
    torch.save({"state_dict": {}, "global_step": 3, "scoreflow": {"config": stored}}, d / "score.ckpt")
    flow = {**stored, "dequant_run": {"mode": "after", "score_ckpt": "outputs/train/x/checkpoints/last.ckpt"}}
    torch.save({"state_dict": {}, "global_step": 3, "scoreflow": {"config": flow}}, d / "flow.ckpt")
    return d


# (script, overrides with {d} = the checkpoint folder, what the screen must show)
CASES = [
    ("sample.py", ["ckpt_path={d}/fake/checkpoint_1.pth", "sde=vp", "model=ncsnpp", "data=digits", "num_samples=4"],
     ["usage error", "checkpoint_1.pth", "missing", "unexpected", "more)", "the checkpoint holds: DDPM++-style",
      "nf=16", "config key: model", f"fix: {DDPM_FIX}"]),
    ("sample.py", ["ckpt_path={d}/ncsn/checkpoint_2.pth", "sde=vp", "model=ddpmpp", "data=digits", "num_samples=4"],
     ["checkpoint_2.pth", "missing", "unexpected", "NCSN++-style (Fourier features)", f"fix: {NCSN_FIX}"]),
    ("evaluate.py", ["ckpt_path={d}/ncsn/checkpoint_2.pth", "sde=vp", "model=ddpmpp", "data=digits"],
     ["checkpoint_2.pth", "missing", "unexpected", f"fix: {NCSN_FIX}"]),
    ("sample.py", ["ckpt_path={d}/fake/checkpoint_1.pth", "sde=vp", "model=mlp", "data=digits"],
     ["NCSNpp", "MLP", f"fix: {DDPM_FIX}"]),
    ("sample.py", ["ckpt_path={d}/random.pth"],
     ["ckpt_path is an unknown checkpoint, not a score model", "epoch, weights", "fix: give a .ckpt written by "
      "train.py", "score_sde_pytorch .pth"]),
    ("evaluate.py", ["ckpt_path={d}/random.pth"], ["an unknown checkpoint", "fix: give a .ckpt"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler=pc", "sampler.lam=0.5"],
     ["sampler.lam", "fix: lam is a key of sampler=lambda_family", "sampler=lambda_family sampler.lam=0.5"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler=pc", "sampler.rtol=1e-3"],
     ["fix: rtol is a key of sampler=ode"]),
    ("train_dequant.py", ["score_ckpt={d}/flow.ckpt"],
     ["score_ckpt", "is a train_dequant.py checkpoint", "not a train.py score model",
      "fix: score_ckpt=outputs/train/x/checkpoints/last.ckpt"]),
    # train.py resuming a flow (new-user audit: the resume_allow_changes=true it suggested then crashed on its keys)
    ("train.py", ["ckpt_path={d}/flow.ckpt", "debug=fast"],
     ["ckpt_path is a train_dequant.py checkpoint", "config key: ckpt_path", "fix: resume it with python "
      "train_dequant.py"]),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory, ckpts):
    cwd = tmp_path_factory.mktemp("audit_sampling_cases")
    out = cli_batch([(s, [a.format(d=ckpts) for a in args]) for s, args, _ in CASES], cwd)
    return out, written(cwd, set())


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_refused_on_one_screen(results, i):
    out, created = results
    code, lines = out[i]
    text = check_screen(code, lines, 2, *CASES[i][2])
    assert "fix: " in text and "did you mean sampler?" not in text
    assert len(text) < 2000 and max(len(ln) for ln in lines) <= 400, text  # was 22 KB, one line of 11,761 chars
    assert created == set(), "a usage error must not create a run folder"


def test_unknown_key_names_the_option_only_where_the_config_has_the_group():
    from scoreflow.tasks.errors import unknown_key_fix

    assert unknown_key_fix("sampler.lam", "0.5", "sample") == ("lam is a key of sampler=lambda_family, not of the "
                                                                "sampler chosen: sampler=lambda_family sampler.lam=0.5")
    assert unknown_key_fix("sampler.lamm", "0.5", "sample") is None  # a misspelling: "did you mean" stays
    assert unknown_key_fix("extras.print_config", "false", "evaluate") is None  # no extras group to choose


def fix_overrides(fix: str) -> list[str]:
    return shlex.split(fix.split(" (")[0])


def test_the_suggested_model_loads_the_checkpoint_and_load_model_reports_the_same(ckpts, tmp_path):
    """The fix is right (the suggested model loads the .pth strictly), and a mismatch that reaches ``load_model``
    (no preflight: the API, multiruns) is the same screen: counts, first keys, the fix."""
    from scoreflow.tasks.checkpoint import load_model

    for pth, fix in (("fake/checkpoint_1.pth", DDPM_FIX), ("ncsn/checkpoint_2.pth", NCSN_FIX)):
        args = [f"ckpt_path={ckpts / pth}", "sde=vp", "data=digits", "device=cpu"]
        good = compose_cfg([*args, *fix_overrides(fix)], tmp_path / "good", "sample")
        validate.sample(good)
        assert load_model(good).info["format"] == "score_sde"
        bad = compose_cfg([*args, "model=ddpmpp_deep"], tmp_path / "bad", "sample")
        with pytest.raises(CheckpointMismatchError) as err:
            load_model(bad)
        screen = format_error(err.value, "sample.py")
        assert f"fix: {fix}" in screen and "missing: " in screen and "the checkpoint holds" in screen
        assert len(screen.splitlines()) <= 10 and len(screen) < 2000, screen


def test_the_fix_reads_the_architecture_from_the_checkpoint(tmp_path):
    """nf from the first conv, the family from the time embedding's keys, ``_deep`` from the res-block count."""
    cfg = compose_cfg(["ckpt_path=x.pth", "sde=vp", "model=ddpmpp", "data=digits"], tmp_path / "c", "sample")
    deep = torch.load(sp_checkpoint(tmp_path / "deep.pth", **dict(TINY_NCSN, num_res_blocks=8)), weights_only=True)
    fix, exact = validate.sp_model_fix(cfg, deep)
    assert fix == "model=ncsnpp_deep model.net.nf=16 'model.net.ch_mult=[1,2]' 'model.net.attn_resolutions=[4]'"
    assert exact
    wide = torch.load(sp_checkpoint(tmp_path / "wide.pth", nf=32, ch_mult=[1, 2, 2], num_res_blocks=4,
                                    attn_resolutions=[4]), weights_only=True)
    assert validate.sp_model_fix(cfg, wide) == ("model=ddpmpp model.net.nf=32 'model.net.ch_mult=[1,2,2]' "
                                                "'model.net.attn_resolutions=[4]'", True)


def test_train_dequant_refuses_a_flow_checkpoint_before_the_run_starts(ckpts, tmp_path):
    """Without the preflight (a multirun, a call of the task), the task itself refuses it, before writing anything."""
    from scoreflow.tasks.errors import CheckpointError
    from scoreflow.tasks.train_dequant import train_dequant

    cfg = compose_cfg([f"score_ckpt={ckpts / 'flow.ckpt'}", "logger=none"], tmp_path / "run", "train_dequant")
    with pytest.raises(CheckpointError, match="train_dequant.py checkpoint"):
        train_dequant(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sde, shown", [
    ({"_target_": "scoreflow.sde.SubVPSDE", "beta_min": 0.1, "beta_max": 20.0}, "SubVPSDE(beta_min=0.1, beta_max=20)"),
    ({"_target_": "scoreflow.sde.VESDE", "sigma_min": 0.01, "sigma_max": 50.0}, "VESDE(sigma_min=0.01, sigma_max=50)"),
])
def test_bench_dequantization_prints_the_checkpoints_sde(tmp_path, sde, shown):
    torch.save({"state_dict": {}, "scoreflow": {"config": {"sde": sde, "eps": None}}}, tmp_path / "s.ckpt")
    cmd = [sys.executable, str(ROOT / "bench" / "dequantization.py"), "--score", str(tmp_path / "s.ckpt"),
           "--models", "uniform", "--out", str(tmp_path / "out"), "--table-only"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("protocol:"))
    assert shown in line and "(the SDE's default)" in line and "VP eps" not in line


class CountingClassifier(torch.nn.Module):
    """A differentiable 2-class ``classifier(x, t)`` that counts its calls."""

    num_classes = 2

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        m = x.flatten(1).mean(1)
        return torch.stack([m, -m], dim=1)


def test_conditional_sampling_counts_classifier_gradients(ckpts, tmp_path, monkeypatch):
    from scoreflow.tasks.sample import sample

    clf = CountingClassifier()
    monkeypatch.setattr("scoreflow.tasks.checkpoint.load_classifier", lambda path, **checks: clf)
    (tmp_path / "clf.ckpt").write_bytes(b"")
    cfg = compose_cfg([f"ckpt_path={ckpts / 'fake' / 'checkpoint_1.pth'}", "sde=vp", "data=digits",
                       *fix_overrides(DDPM_FIX), "device=cpu", "progress=false", "mode=conditional",
                       f"classifier_ckpt={tmp_path / 'clf.ckpt'}", "sampler.steps=3", "num_samples=4", "batch_size=2"],
                      tmp_path / "s", "sample")
    m = sample(cfg)
    assert m["conditional/nfe"] == 3 * 2 + 1  # reverse diffusion + Langevin, then Tweedie denoising
    assert m["conditional/classifier_nfe"] == 3 * 2 + 1 and clf.calls == 2 * 7  # two batches of 2


def test_train_classifier_accepts_extras_and_logs_its_table(tmp_path):
    args = ["extras.print_config=false", "trainer.max_steps=2", "val_every=2", "checkpoint_every=2", "logger=none",
            "test=false", "datamodule.batch_size=16", "datamodule.eval_batch_size=100"]
    code, lines = cli("train_classifier.py", args, tmp_path)
    text = "\n".join(lines)
    assert code == 0, text
    assert "├──" not in text  # extras.print_config=false: no config tree
    log = (tmp_path / "run" / "train_classifier.log").read_text()
    table = [ln for ln in text.splitlines() if ln.startswith("== noise-conditional classifier")]
    assert table and table[0] in log and "chance = 0.100" in log


def test_train_dequant_takes_the_extras_of_train_py():
    from scoreflow.tasks.entry import compose

    cfg = compose("train_dequant", ["score_ckpt=x.ckpt", "extras.print_config=false"])
    assert cfg.extras.print_config is False
    assert compose("train_dequant", ["score_ckpt=x.ckpt"]).extras.print_config is True  # the tree, as train.py


# the authors' VP/subVP NCSN++ (configs/vp/cifar10_ncsnpp_continuous.py): FIR, residual input pyramid, but the
# sinusoidal embedding of 999 t and score = -net / sigma_t (models/utils.get_score_fn), not model=ncsnpp's VE choices
TINY_VP_NCSN = dict(TINY, attn_resolutions=[4], fir=True, progressive_input="residual", embedding_type="positional")


@pytest.mark.parametrize("sde", ["vp", "subvp"])
def test_the_fix_for_their_vp_ncsnpp_computes_their_score(tmp_path, sde):
    """Nets audit: the fix for their VP NCSN++ was `model=ncsnpp model.net.embedding_type=positional`, rated an
    exact fit, which fed log sigma to a net trained on 999 t and returned +net/sigma (relative error 1.94 against
    their score). The fix now sets the score function, and a model that loads but computes another score is
    refused before the run."""
    from scoreflow.tasks.checkpoint import load_model
    from scoreflow.tasks.errors import ConfigError

    pth = sp_checkpoint(tmp_path / "vp_ncsn.pth", **TINY_VP_NCSN)
    args = [f"ckpt_path={pth}", f"sde={sde}", "data=digits", "device=cpu"]
    fix, exact = validate.sp_model_fix(compose_cfg([*args, "model=ddpmpp"], tmp_path / "c", "sample"),
                                       torch.load(pth, weights_only=True))
    assert exact and fix == ("model=ncsnpp model.net.embedding_type=positional" + NCSN_FIX.removeprefix("model=ncsnpp")
                             + " model.parametrization=eps model.time_label=t999")
    wrong = compose_cfg([*args, *fix_overrides(fix)[:-2]], tmp_path / "wrong", "sample")  # the old fix
    with pytest.raises(ConfigError, match="score_sde_pytorch computes its") as err:
        validate.sample(wrong)
    assert err.value.fix == "model.parametrization=eps model.time_label=t999"
    good = compose_cfg([*args, *fix_overrides(fix)], tmp_path / "good", "sample")
    validate.sample(good)
    model = load_model(good).module.score_model
    x, t = torch.rand(3, 1, 8, 8) * 2 - 1, torch.tensor([1e-3, 0.3, 1.0])
    with torch.no_grad():
        theirs = -model.net(x, 999 * t) / model.sde.sigma(t).view(-1, 1, 1, 1)  # get_score_fn(continuous=True)
        torch.testing.assert_close(model(x, t), theirs, rtol=0, atol=0)


def test_a_time_label_that_does_not_fit_the_embedding_is_refused(make_cfg):
    from scoreflow.nets import ScoreModel
    from scoreflow.sde import VPSDE
    from scoreflow.tasks.errors import ConfigError

    for model, label in (("ncsnpp", "t999"), ("ddpmpp", "log_sigma")):
        with pytest.raises(ConfigError, match=f"does not fit model.time_label={label}") as err:
            validate.train(make_cfg([f"model={model}", f"model.time_label={label}"]))
        assert err.value.key == "model.time_label"
        with pytest.raises(ValueError, match="does not fit"):
            ScoreModel(NCSNpp((1, 8, 8), **dict(TINY, embedding_type="fourier" if model == "ncsnpp" else
                                                "positional")), VPSDE(), time_label=label)


def test_loading_their_ve_ncsnpp_on_centered_data_warns(tmp_path, caplog):
    """Nets audit: every VE config of score_sde_pytorch trains on [0, 1] data; model=ncsnpp's default centers."""
    from scoreflow.tasks.checkpoint import load_model

    pth = sp_checkpoint(tmp_path / "ve.pth", **TINY_NCSN)
    args = [f"ckpt_path={pth}", "sde=ve", "data=digits", "device=cpu", *fix_overrides(NCSN_FIX)]
    load_model(compose_cfg(args, tmp_path / "a", "sample"))
    assert "model.net.centered=false module.scale=1 module.shift=0" in caplog.text
    caplog.clear()
    load_model(compose_cfg([*args, "model.net.centered=false", "module.scale=1", "module.shift=0"], tmp_path / "b",
                           "sample"))
    assert "centered" not in caplog.text
