"""The user audit's bad inputs: each is refused on one screen (key, value, fix), exits 2 and writes nothing;
Ctrl-C of evaluate.py is one line and exit 130; the FID/sample progress reaches the samplers' per-step bars."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from scoreflow.tasks import validate
from scoreflow.tasks.errors import ConfigError, classify, format_error
from tests.integration.conftest import compose_cfg
from tests.integration.test_entry_errors import ROOT, check_screen, cli_batch, written

VP = {"_target_": "scoreflow.sde.VPSDE", "beta_min": 0.1, "beta_max": 20.0}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints as train.py / train_classifier.py write them (config and metadata; the checks need no weights)."""
    d = tmp_path_factory.mktemp("audit_ckpts")
    stored = OmegaConf.to_container(compose_cfg([], d / "compose"), resolve=True)
    torch.save({"state_dict": {}, "global_step": 3, "scoreflow": {"config": stored}}, d / "score.ckpt")
    clf = {**stored, "sde": VP}  # train_classifier.py's former default SDE; the score model is subVP
    torch.save({"state_dict": {}, "global_step": 3, "scoreflow": {"config": clf, "kind": "classifier"}},
               d / "clf_vp.ckpt")
    torch.save({"state_dict": {}, "global_step": 3,
                "scoreflow": {"config": {**stored, "num_classes": 10}, "kind": "classifier"}}, d / "clf_ok.ckpt")
    levels = {**stored, "num_classes": 10, "module": {**stored["module"], "train_input": "levels"}}
    torch.save({"state_dict": {}, "global_step": 3, "scoreflow": {"config": levels, "kind": "classifier"}},
               d / "clf_levels.ckpt")
    other = {**stored, "data": {**stored["data"], "_target_": "scoreflow.data.Photos"}}  # same shape, other data
    torch.save({"state_dict": {}, "global_step": 3, "scoreflow": {"config": other, "kind": "classifier"}},
               d / "clf_other_data.ckpt")
    run = d / "run" / "checkpoints"
    run.mkdir(parents=True)
    for name in ("best-20.ckpt", "last.ckpt"):
        torch.save({"state_dict": {}}, run / name)
    return d


# (script, overrides with {d} = the checkpoint folder, names the screen must show)
CASES = [
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "accelerator=gpu", "devices=2"],
     ["accelerator", "no CUDA device", "accelerator=cpu"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler.predictor=reverse_difusion"],
     ["sampler.predictor", "reverse_difusion", "did you mean sampler.predictor=reverse_diffusion"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler.corrector_norm=batches"],
     ["sampler.corrector_norm", "batches", "did you mean sampler.corrector_norm=batch"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler.corrector=langevn"], ["sampler.corrector", "langevin"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler=lambda_family", "sampler.lam=1.5"],
     ["sampler.lam", "1.5", "<= 1"]),
    ("train_classifier.py", ["ckpt_path={d}/score.ckpt"], ["ckpt_path", "score checkpoint", "train_classifier.py"]),
    ("train_classifier.py", ["data=toy2d"], ["config key: data", "WideResNet", "image data"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=inpaint", "mask=centre"], ["mask", "centre", "mask=center"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=inpaint", "mask={d}/nope.png"], ["mask", "does not exist"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "device=cuda"], ["device", "no CUDA device", "device=cpu"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=colorize"], ["mode", "colorize", "[1, 8, 8]", "RGB"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=conditional", "classifier_ckpt={d}/clf_vp.ckpt"],
     ["classifier_ckpt", "VPSDE", "SubVPSDE", "fix: retrain the classifier with sde=subvp"]),
    # classifier guidance (audit of controllable generation): were tracebacks, NaN samples or silent mismatches
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=conditional", "classifier_ckpt={d}/clf_ok.ckpt",
                   "guidance_scale=abc"], ["guidance_scale", "abc", "finite number >= 0"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=conditional", "classifier_ckpt={d}/clf_ok.ckpt",
                   "guidance_scale=nan"], ["guidance_scale", "nan", "finite number >= 0"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=conditional", "classifier_ckpt={d}/clf_ok.ckpt", "labels=3.0"],
     ["labels", "3.0", "class indices (integers)"]),
    # a classifier of the other input space (levels k/(K-1) against dequantized (k+u)/K) guided without a word
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=conditional", "classifier_ckpt={d}/clf_levels.ckpt"],
     ["module.train_input=levels inputs, the score model on dequantized", "module.train_input=dequantized"]),
    # the range was checked after the run folder existed, once the classifier was built
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=conditional", "classifier_ckpt={d}/clf_ok.ckpt",
                   "labels=[3,12]"], ["labels", "0 .. 9 (the classifier's 10 classes)", "[3, 12]"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=conditional", "classifier_ckpt={d}/clf_other_data.ckpt"],
     ["classifier_ckpt", "Photos data", "Digits", "train a classifier on the score model's data"]),
    ("train_classifier.py", ["module.eval_times=[0.0]"], ["module.eval_times", "(0, T]"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=latent", "num_images=4", "latent.pair=[0,20]"],
     ["latent.pair", "[0, 20]", "0 .. 3"]),
    ("evaluate.py", ["ckpt_path={d}/run"], ["ckpt_path", "fix: ckpt_path=", "checkpoints/last.ckpt"]),
    # likelihood settings that are names: refused before anything runs (they failed at the first validation)
    ("train.py", ["module.evaluation.method=rk5"], ["module.evaluation.method", "rk5", "did you mean", "=rk4"]),
    ("train.py", ["module.evaluation.ode_dtype=float16"], ["module.evaluation.ode_dtype", "float32, float64"]),
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "evaluation.divergence=hutch"],
     ["evaluation.divergence", "exact, gaussian, rademacher"]),
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "evaluation.bound_estimator=closedform"],
     ["evaluation.bound_estimator", "=closed_form"]),
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "evaluation.bound_plan=fitt"], ["evaluation.bound_plan", "=fit"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler=ode", "sampler.method=rk45"], ["sampler.method", "=rk4"]),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory, ckpts):
    if torch.cuda.is_available():
        pytest.skip("the no-CUDA cases need a machine without CUDA")
    cwd = tmp_path_factory.mktemp("audit_cases")
    out = cli_batch([(s, [a.format(d=ckpts) for a in args]) for s, args, _ in CASES], cwd)
    return out, written(cwd, set())


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_refused_on_one_screen_before_anything_is_written(results, i):
    out, created = results
    code, lines = out[i]
    text = check_screen(code, lines, 2, *CASES[i][2])
    assert "fix: " in text
    assert created == set(), "a usage error must not create a run folder"


def test_missing_inception_weights_are_reported_before_the_likelihoods(tmp_path, ckpts):
    """Was: found after the whole likelihood phase (hours under the Table-2 protocol), then the same screen."""
    ((code, lines),) = cli_batch([("evaluate.py", [f"ckpt_path={ckpts}/score.ckpt", "fid.num_samples=10",
                                                   f"fid.inception_weights={tmp_path / 'nope.pth'}"])], tmp_path)
    check_screen(code, lines, 2, "No TF-Inception-v3 weights", "nope.pth", "config key: fid.inception_weights")
    assert written(tmp_path, set()) == set()  # before the run folder: no likelihood was computed


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("HYDRA_FULL_ERROR", "NETRC")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), **extra)
    return env


def test_wandb_without_credentials_is_refused_before_the_run_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    cmd = [sys.executable, str(ROOT / "train.py"), "debug=fast", "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(home), capture_output=True, text=True, timeout=120)
    check_screen(p.returncode, (p.stdout + p.stderr).splitlines(), 2, "logger.wandb", "wandb login",
                 "WANDB_MODE=offline")
    assert written(tmp_path, {"home"}) == set()


def test_wandb_preflight_accepts_offline_key_or_netrc(tmp_path, monkeypatch):
    cfg = compose_cfg(["logger=wandb"], tmp_path / "c")
    for k in [k for k in os.environ if k.startswith("WANDB_")] + ["NETRC"]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="no W&B API key"):
        validate.wandb_login(cfg)
    for mode in ("offline", "disabled", "dryrun"):
        monkeypatch.setenv("WANDB_MODE", mode)
        validate.wandb_login(cfg)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    validate.wandb_login(cfg)
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text("machine wandb.example.org\n  login user\n  password " + "y" * 40 + "\n")
    with pytest.raises(ConfigError, match="api.wandb.ai"):
        validate.wandb_login(cfg)  # an entry for another host
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    validate.wandb_login(cfg)
    validate.wandb_login(compose_cfg(["logger=csv"], tmp_path / "c2"))  # no W&B logger: nothing to check


def test_wandb_usage_error_at_runtime_is_a_usage_error():
    from wandb.errors import UsageError

    e = UsageError("No API key configured. Use `wandb login` to log in.")
    assert classify(e) == (2, "logger")
    text = format_error(e, "train.py", "/tmp/run")
    assert "usage error" in text and "wandb login" in text and "WANDB_MODE=offline" in text


def test_classifier_sde_matches_train(tmp_path):
    clf = compose_cfg([], tmp_path / "k", config_name="train_classifier")
    assert clf.sde == compose_cfg([], tmp_path / "t").sde


def test_messages_folder_hint_max_steps_and_pc_text(ckpts, tmp_path):
    with pytest.raises(Exception) as e:
        validate.read_checkpoint(str(ckpts / "run"))
    assert e.value.fix.endswith("last.ckpt")
    with pytest.raises(ConfigError) as e:
        validate.integer(OmegaConf.create({"trainer": {"max_steps": 0}}), "trainer.max_steps", low=1)
    validate.common_training(compose_cfg(["trainer.max_steps=-1"], tmp_path / "c"))  # accepted ...
    with pytest.raises(ConfigError) as e:
        validate.common_training(compose_cfg(["trainer.max_steps=-2"], tmp_path / "c"))
    assert "trainer.max_epochs=-1" in e.value.fix and "no limit" not in e.value.fix.split("max_epochs=-1")[0]
    from scoreflow.tasks.sample import pc_text

    text = pc_text({"predictor": "lambda_family", "lam": 0.5, "corrector": "none", "snr": 0.16, "n_steps": 1})
    assert "λ=0.5" in text and "snr" not in text and "n_steps" not in text
    assert "snr=0.16" in pc_text({"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16,
                                  "n_steps": 1})


class _FakeModule:
    data_shape = (1, 2, 2)
    sde = None
    device = torch.device("cpu")
    scale, shift, num_levels = 2.0, -1.0, None

    def _score_fn(self):
        return lambda x, t: x


def test_draw_samples_passes_progress_to_the_sampler_on_a_terminal(monkeypatch):
    import scoreflow.sampling as sampling
    from scoreflow.sampling import SampleResult
    from scoreflow.tasks import fid

    calls = []

    def fake_sample(score_fn, sde, shape, *, kind, **kw):
        calls.append(kw.get("progress"))
        return SampleResult(samples=torch.zeros(shape), nfe=1)

    monkeypatch.setattr(sampling, "sample", fake_sample)
    sampler = {"_target_": "scoreflow.sampling.pc_sample", "_partial_": True, "predictor": "reverse_diffusion"}
    for tty, progress, want in ((True, True, True), (False, True, False), (True, False, False)):
        monkeypatch.setattr(fid, "on_terminal", lambda tty=tty: tty)
        calls.clear()
        list(fid.draw_samples(_FakeModule(), [0, 1, 2], sampler, 64, progress=progress))
        assert calls == [want], (tty, progress, calls)


@pytest.fixture(scope="module")
def untrained_ckpt(tmp_path_factory):
    """A real (untrained) digits score model: evaluate.py runs it end to end."""
    from scoreflow.tasks.build import build_module

    d = tmp_path_factory.mktemp("untrained")
    cfg = compose_cfg(["debug=fast"], d / "c")
    module = build_module(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"state_dict": module.state_dict(), "global_step": 0, "scoreflow": {"config": config}},
               d / "last.ckpt")
    return d / "last.ckpt"


def test_ctrl_c_of_evaluate_is_one_line_and_exit_130(untrained_ckpt, tmp_path):
    run = tmp_path / "run"
    args = [f"ckpt_path={untrained_ckpt}", "use_ema=false", "device=cpu", "num_images=all", "batch_size=1",
            "evaluation.method=rk4", "evaluation.steps=2", "evaluation.test_num_t=2", "solver_check_images=0",
            "progress=false", f"hydra.run.dir={run}"]
    env = _clean_env(tmp_path, WANDB_MODE="offline")
    p = subprocess.Popen([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if any(f.stat().st_size > 0 for f in run.glob("partial*.jsonl")):
                break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1] == (f"[scoreflow] evaluate.py: interrupted; the finished batches are kept in {run}; rerun the "
                         "same command to continue"), err
    assert len(lines) <= 3, err
    assert "evaluate.py: interrupted" in "".join(f.read_text() for f in run.glob("*.log"))


@pytest.mark.parametrize(("trainer", "fix"), [("gpu", "use trainer=cpu"), ("ddp", "use trainer=ddp_cpu")])
def test_a_gpu_trainer_without_cuda_names_the_cpu_trainer_that_matches(tmp_path, monkeypatch, trainer, fix):
    """``trainer=ddp`` on a machine without CUDA points at ``trainer=ddp_cpu`` (DDP over CPU processes), not at the
    one-process ``trainer=cpu`` (config-matrix audit)."""
    monkeypatch.setattr(validate, "cuda_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        validate.devices(compose_cfg([f"trainer={trainer}"], tmp_path))
    assert e.value.fix.startswith(fix)


def test_a_sweeps_latent_jobs_refuse_sampler_settings_they_would_not_use(ckpts, tmp_path):
    """Inside a Hydra job the check's ConfigError was caught with the "not in a Hydra job" ValueError it is a kind
    of: ``sample.py -m mode=latent sampler.steps=10,11`` ran both jobs, ignoring the swept setting (the single-run
    preflight caught it; a sweep's jobs have none of their own)."""
    cmd = [sys.executable, str(ROOT / "sample.py"), "-m", f"ckpt_path={ckpts}/score.ckpt", "mode=latent", "sampler=pc",
           "sampler.steps=10,11", "num_images=2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    p = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "2 jobs: 2 failed" in out, out[-3000:]
    assert out.count("sampler=pc sampler.steps=1") >= 2 and "would not be used" in out, out[-3000:]
