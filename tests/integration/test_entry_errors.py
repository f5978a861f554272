"""Every bad input of issue 14's table, through the real entry points in a subprocess.

Each case checks: the exit code (2 usage, 1 runtime), at most 15 lines of output without HYDRA_FULL_ERROR,
the offending key or path named, and nothing written outside the run folder (a usage error found before
the run starts writes nothing at all). Value errors fail before torch is imported (well under a second
each); checkpoint errors import torch only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.integration.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 15


def cli(script: str, args: list[str], cwd: Path, *, full_error: bool = False, timeout: int = 300):
    """Run ``python <script> args hydra.run.dir=<cwd>/run`` in ``cwd``; return (exit code, output lines)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    cmd = [sys.executable, str(ROOT / script), *args, f"hydra.run.dir={cwd / 'run'}"]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, (p.stdout + p.stderr).splitlines()


def check_screen(code: int, lines: list[str], expected_code: int, *names: str) -> str:
    text = "\n".join(lines)
    assert code == expected_code, text
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{text}"
    assert "Traceback" not in text, text
    for n in names:
        assert n in text, f"{n!r} not named in:\n{text}"
    return text


def written(cwd: Path, inputs: set[str]) -> set[str]:
    """Top-level entries the command created in its working directory (besides the inputs we put there)."""
    return {p.name for p in cwd.iterdir()} - inputs


# (overrides, names the output must contain): all fail in the preflight, before torch is imported
USAGE_CASES = [
    # a group train.py does not have (new-user audit: Hydra's hint, +sampler=ode, trained with the key unread)
    (["sampler=ode"], ["train.py has no config group 'sampler' (its groups: sde, weighting, model",
                       "fix: the sample grids' sampler is callbacks.samples.sampler"]),
    # + of a key no command has: Hydra added it, nothing read it, the run went on (new-user audit)
    (["+foo=1"], ["+foo: no scoreflow command has a setting 'foo'", "python train.py --cfg job"]),
    (["+val_evry=5"], ["+val_evry: no scoreflow command", "did you mean val_every"]),
    (["datamodule.batch_size=0"], ["datamodule.batch_size", "0"]),
    (["datamodule.batch_size=-3"], ["datamodule.batch_size", "-3"]),
    (["module.optim.lr=-1"], ["module.optim.lr", "-1"]),
    (["trainer.max_steps=abc"], ["trainer.max_steps", "'abc'"]),
    (["trainer.max_stepz=5"], ["trainer.max_stepz", "did you mean trainer.max_steps"]),
    (["val_evry=5"], ["val_evry", "did you mean val_every"]),
    (["trainer.accumulate_grad_batches=2"], ["did you mean module.optim.accumulate_grad_batches"]),
    (["sde=nonsense"], ["sde", "vp", "subvp"]),
    (["eps=1.5"], ["eps", "1.5"]),
    (["trainer.devices=0"], ["trainer.devices"]),
    (["trainer.precision=16-mixed"], ["trainer.precision", "16-mixed", "bf16-mixed", "32-true"]),
    (["module.loss=ism", "module.compile=true"], ["module.loss=ism", "module.compile", "double backward"]),
    (["datamodule.eval_batch_size=1.5"], ["datamodule.eval_batch_size", "1.5"]),
    (["data=cifar10", "data.root=/nonexistent/cifar"], ["data.root", "/nonexistent/cifar", "cifar-10-batches-py",
                                                        "https://"]),
    (["weighting=lw_is_trunc", "weighting.truncation=2"], ["weighting.truncation", "< 1", "1e-3"]),
    (["weighting.normalize=yes"], ["weighting.normalize", "'yes'"]),
    # every option of the group (Hydra lists one a line; the screen showed the first 6 of data's 8 before)
    (["data=nonsense"], ["cifar10, digits, image_folder, imagenet32, mnist, mnist5k, photos, toy2d"]),
    (["data=digitz"], ["did you mean data=digits?"]),
    (["experiment=tabel2/cifar10_vp_lw"], ["table2/<name>: 28 files", "did you mean experiment=table2/cifar10_vp_lw"]),
    # config-matrix audit: each trained to the end before (or stopped at the first sample grid) and died with a
    # traceback; the Adams methods gave a one-step likelihood, 0.7 bits/dim off, that the solver check vouched for
    (["module.evaluation.bound_estimator=paired"], ["module.evaluation.bound_plan=fit fits its plan",
                                                    "bound_estimator=paired", "module.evaluation.bound_plan=none"]),
    (["module.evaluation.importance_sampling=false"], ["importance_sampling=false", "bound_plan=none"]),
    (["module.evaluation.method=explicit_adams"], ["explicit_adams", "as if equal", "method=dopri5"]),
    (["callbacks.samples.sampler._target_=scoreflow.sampling.pc_sample"],
     ["callbacks.samples.sampler.method is not a setting of the pc sampler", "~callbacks.samples.sampler.method"]),
    # the Adam-only settings beside module.optimizer: stopped before a run folder exists (was: after the config tree)
    # a data shape or level count the data do not have: after the run folder, keyed "data", or a traceback (audit)
    (["data.shape=[1,9,9]"], ["digits: data.shape=[1, 9, 9] does not match", "config key: data.shape",
                              "fix: 'data.shape=[1,8,8]'"]),
    (["data.num_levels=256"], ["data.num_levels=256, but the data have 17 levels", "config key: data.num_levels",
                               "fix: data.num_levels=17"]),
    (["data=cifar10", "data.shape=[3,28,28]"], ["cifar10: data.shape=[3, 28, 28]", "'data.shape=[3,32,32]'"]),
    (["data=photos", "data.shape=[1,9,9]"], ["photos: shape must be [3, P, P]", "config key: data.shape"]),
    # the data first: on a machine without CUDA a Table-2 preset reported the GPU, then (on the CPU) the data
    (["experiment=table2/cifar10_vp_lw_is"], ["CIFAR-10 not found", "cifar-10-batches-py", "data.root"]),
    # an adaptive ODE sampler ignored steps: the grid was drawn with dopri5's own steps, not the 50 asked for
    (["callbacks.samples.sampler.method=dopri5"], ["callbacks.samples.sampler.steps=50 is the number of steps of a "
                                                   "fixed-step method", "callbacks.samples.sampler.steps=null"]),
    (["module.optimizer={_target_: torch.optim.AdamW, _partial_: true}", "module.optim.weight_decay=0.1"],
     ["module.optim ['weight_decay'] configure the built-in Adam", "module.optimizer = 'torch.optim.AdamW'"]),
]


# Several commands in one subprocess (a fresh interpreter costs seconds on a loaded CI machine): each runs the
# entry point's real ``__main__`` block (runpy), its exit code and output captured.
DRIVER = """
import contextlib, io, json, runpy, sys
results = []
for script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    buf, code = io.StringIO(), 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    results.append([code, buf.getvalue()])
sys.stdout.write(json.dumps(results))
"""


def cli_batch(commands: list[tuple[str, list[str]]], cwd: Path) -> list[tuple[int, list[str]]]:
    import json

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    todo = [(str(ROOT / script), [*args, f"hydra.run.dir={cwd / f'run{i}'}"]) for i, (script, args) in
            enumerate(commands)]
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(todo)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [(code, out.splitlines()) for code, out in json.loads(p.stdout)]


@pytest.fixture(scope="module")
def usage_results(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("usage")
    results = cli_batch([("train.py", c[0]) for c in USAGE_CASES], cwd)
    return results, written(cwd, set())


@pytest.mark.parametrize("i", range(len(USAGE_CASES)), ids=[" ".join(c[0]) for c in USAGE_CASES])
def test_bad_value_is_one_screen_before_anything_runs(usage_results, i):
    results, created = usage_results
    code, lines = results[i]
    text = check_screen(code, lines, 2, *USAGE_CASES[i][1])
    assert "HYDRA_FULL_ERROR=1" in text
    assert created == set(), "a usage error must not create a run folder"


def test_one_bad_value_in_a_fresh_process(tmp_path):
    code, lines = cli("train.py", ["trainer.max_stepz=5"], tmp_path)
    check_screen(code, lines, 2, "trainer.max_stepz", "did you mean trainer.max_steps")
    assert written(tmp_path, set()) == set()


def test_full_error_shows_the_traceback(tmp_path):
    code, lines = cli("train.py", ["datamodule.batch_size=0"], tmp_path, full_error=True)
    assert code != 0 and "Traceback" in "\n".join(lines) and "datamodule.batch_size" in "\n".join(lines)


@pytest.fixture(scope="module")
def fake_ckpts(tmp_path_factory):
    """Checkpoints shaped as train.py / train_classifier.py write them (config and metadata; no weights are
    needed: every check here happens before a model is built)."""
    d = tmp_path_factory.mktemp("ckpts")
    cfg = compose_cfg([], d / "compose")
    stored = OmegaConf.to_container(OmegaConf.masked_copy(cfg, ["sde", "model", "data", "dequantization"]),
                                    resolve=True)
    score = {"state_dict": {}, "global_step": 3, "scoreflow": {"config": stored, "batches_seen": 3}}
    torch.save(score, d / "score.ckpt")
    torch.save({**score, "scoreflow": {**score["scoreflow"], "kind": "classifier"}}, d / "classifier.ckpt")
    other = OmegaConf.to_container(OmegaConf.masked_copy(compose_cfg(["data=mnist5k"], d / "compose_mnist"),
                                                         ["sde", "model", "data", "dequantization"]), resolve=True)
    torch.save({**score, "scoreflow": {"config": other, "kind": "classifier"}}, d / "classifier_mnist.ckpt")
    (d / "notes.txt").write_text("this is not a checkpoint\n")
    return d


CKPT_CASES = [
    ("evaluate.py", ["ckpt_path={d}/notes.txt"], ["ckpt_path", "notes.txt", "not a PyTorch checkpoint"]),
    ("evaluate.py", ["ckpt_path={d}/missing.ckpt"], ["ckpt_path", "missing.ckpt", "not found"]),
    ("evaluate.py", [], ["ckpt_path", "required"]),
    ("evaluate.py", ["ckpt_path={d}/classifier.ckpt"], ["ckpt_path", "classifier"]),
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "split=tset"], ["split", "tset"]),
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "evaluation.rtol=-1"], ["evaluation.rtol", "-1"]),
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "evaluation.rtol=0", "evaluation.atol=0"],
     ["evaluation.rtol", "both 0"]),
    ("train.py", ["module.evaluation.rtol=0", "module.evaluation.atol=0"], ["module.evaluation.rtol", "both 0"]),
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "num_images=some"], ["num_images", "'some'", "all"]),
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "fid.num_samples=1"], ["fid.num_samples", "at least 2"]),
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "fid.num_samples=8", "fid.ref_stats={d}/nope.npz"],
     ["fid.ref_stats", "nope.npz", "no such file"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "num_samples=0"], ["num_samples", "0"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=conditional"], ["classifier_ckpt"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=conditional", "classifier_ckpt={d}/classifier_mnist.ckpt"],
     ["classifier_ckpt", "shape [1, 28, 28] (MNIST5k)", "score model on [1, 8, 8]"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "data_root={d}"], ["data_root", "does not apply", "drop data_root="]),
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "data_root={d}"], ["data_root", "does not apply"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler.eps=1.5"], ["sampler.eps", "1.5", "< 1"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler.snr=0"], ["sampler.snr", "> 0", "corrector=none"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler.denoise=no"], ["sampler.denoise", "'no'",
                                                                        "sampler.denoise=false"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler=ode", "sampler.rtol=-1"], ["sampler.rtol", "-1"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler=ode", "sampler.rtol=0", "sampler.atol=0"],
     ["sampler.rtol", "both 0"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=latent", "latent.eps=0"], ["latent.eps", "> 0"]),
    ("train.py", ["ckpt_path={d}/score.ckpt", "model=mlp"], ["ckpt_path", "model.net._target_", "UNet", "MLP",
                                                            "resume_allow_changes=true"]),
    ("train.py", ["ckpt_path={d}/score.ckpt", "sde=ve"], ["ckpt_path", "sde._target_", "VPSDE", "VESDE"]),
    ("train.py", ["ckpt_path={d}/classifier.ckpt"], ["ckpt_path", "classifier"]),
    ("train.py", ["ckpt_path={d}/notes.txt"], ["ckpt_path", "notes.txt"]),
    ("train_dequant.py", ["score_ckpt={d}/notes.txt"], ["score_ckpt", "notes.txt"]),
    # new-user audit: each was found after the run folder existed, or not at all
    ("evaluate.py", ["ckpt_path={d}/score.ckpt", "num_images=0"],
     ["num_images=0 leaves no image for the likelihoods", "fix: num_images=<N> or all; for FID alone: ode=false"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=latent", "sampler=pc", "sampler.steps=10"],
     ["mode=latent encodes and decodes with the probability-flow ODE of latent.*",
      "sampler=pc sampler.steps=10 would not be used"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "sampler=ode", "sampler.steps=100"],
     ["sampler.steps=100 is the number of steps", "sampler.method=dopri5 is adaptive", "sampler.method=rk4"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=latent", "latent.steps=100"],
     ["latent.steps=100", "latent.steps=null"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=latent", "latent.method=rk5"], ["latent.method", "=rk4"]),
    ("sample.py", ["ckpt_path={d}/score.ckpt", "mode=inpaint", "sampler=ode"],
     ["mode=inpaint clamps the known part inside a predictor-corrector sampler", "fix: sampler=pc"]),
]


@pytest.fixture(scope="module")
def ckpt_results(tmp_path_factory, fake_ckpts):
    cwd = tmp_path_factory.mktemp("ckpt_cases")
    results = cli_batch([(c[0], [a.format(d=fake_ckpts) for a in c[1]]) for c in CKPT_CASES], cwd)
    return results, written(cwd, set())


@pytest.mark.parametrize("i", range(len(CKPT_CASES)), ids=[f"{c[0]} {' '.join(c[1])}" for c in CKPT_CASES])
def test_bad_checkpoint_is_one_screen(ckpt_results, i):
    results, created = ckpt_results
    code, lines = results[i]
    check_screen(code, lines, 2, *CKPT_CASES[i][2])
    assert created == set()


def test_resume_mismatch_can_be_allowed(fake_ckpts):
    """resume_allow_changes=true lets the check through (it would now fail later, on the empty weights)."""
    from scoreflow.tasks import validate

    cfg = compose_cfg([f"ckpt_path={fake_ckpts}/score.ckpt", "sde=ve", "resume_allow_changes=true"],
                      fake_ckpts / "c2")
    validate.train(cfg)  # no error
    validate.train(compose_cfg([f"ckpt_path={fake_ckpts}/score.ckpt"], fake_ckpts / "c3"))  # the same run
    assert validate.config_differences({"data": {"root": "/a", "k": 1}}, {"data": {"root": "/b", "k": 1}}) == []


# A runtime failure: the run started, so its folder exists and holds the error too.
FAST_RUN = ["debug=fast", "extras.print_config=false", "trainer.log_every_n_steps=1", "sample_every=1000",
            "module.evaluation.nll_every=0", "test=false"]


def test_diverging_run_is_one_screen_logs_nan_and_keeps_no_best_checkpoint(tmp_path):
    args = [*FAST_RUN, "module.optim.lr=1e6", "module.max_bad_steps=3", "trainer.max_steps=30", "val_every=2"]
    code, lines = cli("train.py", args, tmp_path)
    text = check_screen(code, lines, 1, "non-finite", "module.optim.lr", "max_bad_steps")
    assert written(tmp_path, set()) == {"run"}
    run = tmp_path / "run"
    assert "run failed" in (run / "train.log").read_text()  # the same screen in the run's log
    assert not list(run.glob("checkpoints/best-*.ckpt")), "a 'best' checkpoint was chosen on a non-finite score"
    losses = [ln.split(",") for ln in (run / "csv" / "metrics.csv").read_text().splitlines()]
    col = losses[0].index("train/loss")
    assert "nan" in [row[col].lower() for row in losses[1:] if len(row) > col], "NaN losses not logged as NaN"
    assert text.count("optimizer step skipped") <= 2  # one warning per streak, then the error
    assert "├──" not in text  # extras.print_config=false


@pytest.mark.parametrize("script, args, shown", [
    ("train.py", [*FAST_RUN[1:], "+module.foo=1"],
     ["module.foo: not a setting of ScoreLitModule (its settings: scale, shift, loss", "config key: module.foo",
      "fix: remove module.foo"]),
    ("train.py", [*FAST_RUN[1:], "experiment=toy2d", "data.name=checkerboad"],
     ["data: toy2d: unknown name 'checkerboad'; choose one of ('checkerboard'", "config key: data"]),
    ("train_classifier.py", ["+debug=fast", "extras.print_config=false"],
     ["module.evaluation: not a setting of ClassifierLitModule"]),
    ("train.py", [*FAST_RUN[1:], "+trainer.foo=1"], ["trainer.foo: not a setting of Trainer", "config key: trainer.foo",
                                                    "fix: remove trainer.foo (python train.py --cfg job"]),
    ("train.py", [*FAST_RUN[1:], "+datamodule.foo=1"], ["datamodule.foo: not a setting of ScoreDataModule",
                                                        "config key: datamodule.foo"]),
], ids=["module-key", "toy2d-name", "classifier-debug", "trainer-key", "datamodule-key"])
def test_a_value_or_key_a_constructor_refuses_is_one_screen(tmp_path, script, args, shown):
    """New-user audit: these were Hydra's "Error executing job" or a TypeError traceback, exit 1. The objects are
    built after the run folder exists (the data are read there), so the folder is there."""
    code, lines = cli(script, args, tmp_path)
    text = check_screen(code, lines, 2, *shown)
    assert "Error executing job" not in text


def test_train_classifier_has_no_debug_group(tmp_path):
    code, lines = cli("train_classifier.py", ["debug=fast"], tmp_path)
    check_screen(code, lines, 2, "train_classifier.py has no config group 'debug'", "trainer.max_steps=50")
    assert written(tmp_path, set()) == set()


def test_a_batch_larger_than_the_training_split_is_one_screen(tmp_path):
    """New-user audit: datamodule.batch_size=100000 on digits' 1297 training images was killed for memory (exit
    137, no message); every batch would have repeated images."""
    code, lines = cli("train.py", [*FAST_RUN, "datamodule.batch_size=100000"], tmp_path)
    check_screen(code, lines, 2, "datamodule.batch_size=100000 images per process is more than one process's share",
                 "(1297 images over 1 process(es): 1297 each)", "config key: datamodule.batch_size",
                 "fix: datamodule.batch_size=128 (at most 1297)")


def test_corrupt_image_is_named_or_skipped(tmp_path):
    from PIL import Image

    data = tmp_path / "imgs"
    (data / "a").mkdir(parents=True)
    for i in range(12):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(data / "a" / f"{i}.png")
    (data / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = [*FAST_RUN, "data=image_folder", f"data.root={data}", "data.shape=[3,8,8]", "data.val_size=2",
            "data.test_size=2", "trainer.max_steps=1", "callbacks=none", "logger=none"]
    code, lines = cli("train.py", args, tmp_path)
    check_screen(code, lines, 2, "broken.png", "data.skip_bad_files=true")
    assert written(tmp_path, {"imgs"}) == {"run"}


def test_image_folder_skip_bad_files_counts_them(tmp_path, caplog):
    from PIL import Image

    from scoreflow.data.image_folder import ImageFolder

    for split, n in (("train", 6), ("valid", 2), ("test", 3)):
        for cls in ("x", "y"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("L", (4, 4), i * 30).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "x" / "bad.png").write_text("not an image")
    (tmp_path / "test" / "y" / "bad.jpg").write_bytes(b"")
    src = ImageFolder(str(tmp_path), shape=[1, 4, 4], skip_bad_files=True)
    with caplog.at_level("WARNING"):
        splits = src.load()
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "val": 4, "test": 6}
    assert sorted(p.name for p in src.skipped) == ["bad.jpg", "bad.png"]
    assert "skipped 2 unreadable" in caplog.text
    assert src.class_names == ("x", "y") and sorted(int(splits["test"][i][1]) for i in range(6)) == [0] * 3 + [1] * 3
    from scoreflow.data.base import DatasetFormatError

    with pytest.raises(DatasetFormatError, match="bad"):
        ImageFolder(str(tmp_path), shape=[1, 4, 4]).load()


def test_image_folder_missing_split_is_held_out_of_train(tmp_path):
    from PIL import Image

    from scoreflow.data.image_folder import ImageFolder

    for split, n in (("train", 10), ("val", 3)):
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.new("RGB", (4, 4), (i, i, i)).save(tmp_path / split / f"{i}.png")
    splits = ImageFolder(str(tmp_path), shape=[3, 4, 4], val_size=50, test_size=4).load()
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "val": 3, "test": 4}
    assert int(splits["val"][0][1]) == -1  # no class subfolders: unlabelled


def test_a_refused_resume_leaves_the_folders_config_untouched(tmp_path, fake_ckpts):
    """``hydra.run.dir=`` of a folder whose ``last.ckpt`` has another SDE: refused in the preflight, before Hydra
    writes the command's config into the folder's ``.hydra/`` (which then described a run that never happened)."""
    import shutil

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(fake_ckpts / "score.ckpt", run / "checkpoints" / "last.ckpt")  # a VP run
    (run / ".hydra").mkdir()
    before = {name: f"{name}: the folder's own\n" for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    for name, text in before.items():
        (run / ".hydra" / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "sde=ve", f"hydra.run.dir={run}"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
    check_screen(p.returncode, (p.stdout + p.stderr).strip().splitlines(), 2, "auto_resume", "sde._target_",
                 "VESDE", "resume_allow_changes=true")
    assert {p.name: p.read_text() for p in (run / ".hydra").iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "checkpoints"]  # no log file, nothing else


def test_a_truncated_checkpoint_says_so(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:1500])
    code, lines = cli("evaluate.py", [f"ckpt_path={path}"], tmp_path)
    check_screen(code, lines, 2, "cut.ckpt is a truncated or corrupt PyTorch checkpoint", "fix: copy it again")


def test_plots_refuses_a_folder_that_is_not_a_run(tmp_path):
    """It drew an empty plot into any folder, and created a missing one (exit 0)."""
    missing = tmp_path / "nonexist"
    done = subprocess.run([sys.executable, "-m", "scoreflow.tasks.plots", str(missing)], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "is not a training run folder: it has no csv/metrics.csv" in done.stderr
    assert "Traceback" not in done.stderr and not missing.exists()


def test_the_table_says_when_no_validation_ran(tmp_path):
    """test=false with val_every beyond the run: the title said "last validation (step 5)" over values of '-'."""
    code, lines = cli("train.py", ["debug=fast", "test=false", "trainer.max_steps=5", "extras.print_config=false"],
                      tmp_path)
    assert code == 0
    assert any("== no validation ran in 5 steps (val_every=10; test=false)" in ln for ln in lines), lines[-20:]
