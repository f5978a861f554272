"""The train_dequant.py audit's defects, through the code a user reaches (the entry points in a subprocess where
the defect was on the screen):

1. a rerun in a folder whose flow was trained after another score model (``score_ckpt=B`` where ``last.ckpt``
   was trained from A) is refused, naming both, instead of silently restoring A's score weights under B's name;
   a copy of A at another path (the same weights) resumes; ``ckpt_path=`` of such a flow is refused too;
2. ``test=false`` shows the last validation under its own title, as train.py does; metrics.json has ``protocol``;
3. sde/model/data settings on the command line that are not the score model's, and a Table-2 flow step for
   another data set, are refused before anything is written;
4. the flow's sizes are range-checked (``dequantization.num_components=0`` gave NaN losses blamed on the lr).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scoreflow.tasks import validate
from scoreflow.tasks.errors import CheckpointError, ConfigError
from scoreflow.tasks.train import train
from scoreflow.tasks.train_dequant import train_dequant
from tests.integration.conftest import compose_cfg
from tests.integration.test_entry_errors import DRIVER, ROOT, check_screen

FAST = ["debug=fast", "trainer.accelerator=cpu"]
SCORE = [*FAST, "callbacks=minimal", "logger=none", "trainer.max_steps=2", "test=false", "val_every=100",
         "module.evaluation.method=rk4", "module.evaluation.steps=1"]
# a flow run: 2 steps, one validation (bound on 8 images, no ODE), no test phase
FLOW = [*FAST, "logger=none", "extras.print_config=false", "trainer.max_steps=2", "val_every=2", "checkpoint_every=2",
        "test=false", "datamodule.val_subset=8", "module.evaluation.val_num_t=2", "module.evaluation.nll_every=0",
        "module.evaluation.method=rk4", "module.evaluation.steps=1"]


def cli_many(commands: list[tuple[str, list[str]]], cwd: Path) -> list[tuple[int, list[str]]]:
    """Each ``(script, args)`` (args with their own ``hydra.run.dir``) through the script's real ``__main__``, all in
    one fresh interpreter (test_entry_errors' driver); ``(exit code, output lines)`` of each."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    todo = [(str(ROOT / script), args) for script, args in commands]
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(todo)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return [(code, out.splitlines()) for code, out in json.loads(p.stdout)]


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny digits score models (A, B: other seeds, other weights), a flow trained after A in ``cwd/flow``
    (its printed table kept), then the refused commands in one subprocess, with the flow folder's files before and
    after them."""
    d = tmp_path_factory.mktemp("dequant_audit")
    scores = {}
    for name, seed in (("A", 0), ("B", 1)):
        train(compose_cfg([*SCORE, f"seed={seed}"], d / f"score{name}"))
        scores[name] = d / f"score{name}" / "checkpoints" / "last.ckpt"
    flow = d / "cwd" / "flow"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        metrics = train_dequant(compose_cfg([*FLOW, f"score_ckpt={scores['A']}"], flow, "train_dequant"))
    before, written_json = listing(flow), json.loads((flow / "metrics.json").read_text())
    a, b, last = scores["A"], scores["B"], flow / "checkpoints" / "last.ckpt"
    commands = {
        "rerun_B": ["train_dequant.py", [*FLOW, f"score_ckpt={b}", f"hydra.run.dir={flow}"]],
        "ckpt_path_B": ["train_dequant.py", [*FLOW, f"score_ckpt={b}", f"ckpt_path={last}",
                                             f"hydra.run.dir={d / 'cwd' / 'other'}"]],
        "ckpt_path_score": ["train_dequant.py", [*FLOW, f"score_ckpt={a}", f"ckpt_path={a}",
                                                 f"hydra.run.dir={d / 'cwd' / 'other'}"]],
        "data": ["train_dequant.py", [*FLOW, f"score_ckpt={a}", "+data=mnist5k", f"hydra.run.dir={d / 'cwd' / 'r1'}"]],
        "table2": ["train_dequant.py", [f"score_ckpt={a}", "+experiment=table2/dequant_imagenet32", *FLOW,
                                        f"hydra.run.dir={d / 'cwd' / 'r2'}"]],
        "components": ["train_dequant.py", [*FLOW, f"score_ckpt={a}", "dequantization.num_components=0",
                                            f"hydra.run.dir={d / 'cwd' / 'r3'}"]],
        "components_joint": ["train.py", [*FAST, "dequantization=variational", "dequantization.num_components=0",
                                          f"hydra.run.dir={d / 'cwd' / 'r4'}"]],
    }
    results = dict(zip(commands, cli_many(list(commands.values()), d / "cwd")))
    return {"scores": scores, "flow": flow, "metrics": metrics, "printed": buf.getvalue(), "json": written_json,
            "before": before, "after": listing(flow), "results": results, "cwd": d / "cwd"}


# 1. the score model a flow run was trained after

def test_the_run_records_the_score_models_weights(runs):
    run = torch.load(runs["flow"] / "checkpoints" / "last.ckpt", weights_only=True)["scoreflow"]["config"]
    assert run["dequant_run"]["score_ckpt"] == str(runs["scores"]["A"])
    assert run["dequant_run"]["score_digest"] == validate.score_digest(runs["scores"]["A"])
    assert validate.score_digest(runs["scores"]["A"]) != validate.score_digest(runs["scores"]["B"])


def test_rerun_with_another_score_model_in_the_folder_is_refused(runs):
    code, lines = runs["results"]["rerun_B"]
    text = check_screen(code, lines, 2, "another score model", str(runs["scores"]["A"]), str(runs["scores"]["B"]),
                        "config key: score_ckpt", "hydra.run.dir=", "auto_resume=false", "resume_allow_changes=true")
    assert "HYDRA_FULL_ERROR=1" in text
    assert runs["after"] == runs["before"], "the refused rerun wrote into the run folder"
    assert not (runs["flow"] / ".hydra").exists()


def test_rerun_with_another_score_model_is_refused_in_process(runs):
    """train_dequant() called directly (no preflight): fit's resume check refuses it before any step."""
    flow, b = runs["flow"], runs["scores"]["B"]
    with pytest.raises(CheckpointError, match="another score model") as e:
        train_dequant(compose_cfg([*FLOW, f"score_ckpt={b}"], flow, "train_dequant"))
    assert str(runs["scores"]["A"]) in e.value.message and str(b) in e.value.message


def test_explicit_ckpt_path_of_another_score_models_flow_is_refused(runs):
    a, b = runs["scores"]["A"], runs["scores"]["B"]
    code, lines = runs["results"]["ckpt_path_B"]
    check_screen(code, lines, 2, "ckpt_path", "another score model", str(a), str(b), f"score_ckpt={a}",
                 "resume_allow_changes=true")
    code, lines = runs["results"]["ckpt_path_score"]
    check_screen(code, lines, 2, "ckpt_path", "not a train_dequant.py one")
    assert not (runs["cwd"] / "other").exists()


def test_a_copy_of_the_score_model_elsewhere_resumes_then_allow_changes_keeps_the_restored_score(runs, tmp_path):
    flow, a = runs["flow"], runs["scores"]["A"]
    moved = tmp_path / "moved" / "score.ckpt"
    moved.parent.mkdir()
    shutil.copy(a, moved)
    metrics = train_dequant(compose_cfg([*FLOW, f"score_ckpt={moved}", "trainer.max_steps=3"], flow, "train_dequant"))
    assert metrics["train/steps"] == 3 and metrics["train/segments"] == 2  # resumed at step 2
    ckpt = torch.load(flow / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["scoreflow"]["config"]["dequant_run"]["score_ckpt"] == str(moved)
    # resume_allow_changes: resumed as it is; the run records the score model its restore put back (A's weights)
    b = runs["scores"]["B"]
    train_dequant(compose_cfg([*FLOW, f"score_ckpt={b}", "trainer.max_steps=4", "resume_allow_changes=true"], flow,
                              "train_dequant"))
    ckpt = torch.load(flow / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    run = ckpt["scoreflow"]["config"]["dequant_run"]
    assert run["score_ckpt"] == str(moved) and run["score_digest"] == validate.score_digest(a)
    assert validate.score_weights_digest(ckpt) == validate.score_digest(a)  # the weights used are A's


def test_older_flow_checkpoints_without_the_digest_compare_their_frozen_score_weights(runs):
    ckpt = torch.load(runs["flow"] / "checkpoints" / "last.ckpt", weights_only=True)
    run = ckpt["scoreflow"]["config"]["dequant_run"]
    del run["score_digest"]
    a, b, path = runs["scores"]["A"], runs["scores"]["B"], run["score_ckpt"]  # A, or the test above's copy of it
    assert validate.other_score_model(ckpt, a) is None
    assert validate.other_score_model(ckpt, b).startswith(f"{path} -> {b} (score weights ")
    ckpt["state_dict"] = {}  # no weights either: the path decides
    assert validate.other_score_model(ckpt, path) is None and validate.other_score_model(ckpt, b) == f"{path} -> {b}"


# 2. test=false: the last validation, as train.py shows it

def test_test_false_shows_the_last_validation_and_metrics_json_has_the_protocol(runs):
    metrics, printed = runs["metrics"], runs["printed"]
    assert "validation subset, last validation (step 2; test=false), frozen score model + EMA flow" in printed
    assert "== test split" not in printed
    bound = next(ln for ln in printed.splitlines() if "bits/dim (bound)" in ln)
    assert f"{metrics['val/bpd_bound']:.4f} ± {metrics['val/bpd_bound_se']:.4f}" in bound
    assert "; the ODE NLL without eps-correction" in printed
    stored = runs["json"]  # the first run's (the tests below resume in its folder)
    assert "eps-correction=" in stored["protocol"]
    assert stored["val/bpd_bound"] == pytest.approx(metrics["val/bpd_bound"])


# 3. settings that are not the score model's

def test_data_the_score_model_never_saw_are_refused(runs):
    code, lines = runs["results"]["data"]
    check_screen(code, lines, 2, "with other data than", "data._target_", "Digits", "MNIST5k", "config key: data",
                 "drop the data override", "data=digits", "python train.py data=mnist5k")
    assert not (runs["cwd"] / "r1").exists()


def test_a_table2_flow_step_for_other_data_is_refused(runs):
    code, lines = runs["results"]["table2"]
    check_screen(code, lines, 2, "+experiment=table2/dequant_imagenet32", "imagenet32 score models", "digits",
                 "config key: experiment", "drop +experiment=table2/dequant_imagenet32")
    assert not (runs["cwd"] / "r2").exists()


@pytest.mark.parametrize("bad, good, key", [
    ("+sde=ve", "+sde=subvp", "sde"),
    ("+model=mlp", "+model=unet_small", "model"),
    ("+data.shape=[1,28,28]", "+data=digits", "data"),
    ("+data=mnist5k", "+data.path=/elsewhere", "data"),  # where the same data are read from may change
])
def test_sde_model_data_overrides_are_refused_but_the_score_models_own_pass(runs, tmp_path, bad, good, key):
    a = runs["scores"]["A"]
    validate.train_dequant(compose_cfg([f"score_ckpt={a}", good], tmp_path / "good", "train_dequant"))
    with pytest.raises(ConfigError, match="other data" if key == "data" else f"another {key}") as e:
        validate.train_dequant(compose_cfg([f"score_ckpt={a}", bad], tmp_path / "bad", "train_dequant"))
    assert e.value.key == key


def test_the_table2_step_for_the_score_models_data_passes(tmp_path):
    stored = {"data": {"_target_": "scoreflow.data.cifar.CIFAR10", "shape": [3, 32, 32]},
              "table2": {"dataset": "cifar10", "dequantization": "variational_cifar10"}}
    cfg = compose_cfg(["score_ckpt=x.ckpt", "+experiment=table2/dequant_cifar10"], tmp_path / "run", "train_dequant")
    validate.table2_flow_step(cfg, stored, "x.ckpt")  # no error
    with pytest.raises(ConfigError, match="trained on imagenet32") as e:
        validate.table2_flow_step(cfg, {**stored, "table2": {"dataset": "imagenet32"}}, "x.ckpt")
    assert e.value.fix.startswith("+experiment=table2/dequant_imagenet32")


def test_the_table2_step_is_recognised_with_its_sizes_overridden(tmp_path):
    # named by the option the run chose (hydra.runtime.choices), not by its values: a size override keeps the check
    stored = {"data": {"_target_": "scoreflow.data.cifar.CIFAR10", "shape": [3, 32, 32]},
              "table2": {"dataset": "imagenet32", "dequantization": "variational_imagenet32"}}
    cfg = compose_cfg(["score_ckpt=x.ckpt", "+experiment=table2/dequant_cifar10", "dequantization.width=64",
                       "dequantization.num_components=8"], tmp_path / "run", "train_dequant")
    with pytest.raises(ConfigError, match="trained on imagenet32"):
        validate.table2_flow_step(cfg, stored, "x.ckpt")
    # a flow of the preset's data set with other sizes passes
    validate.table2_flow_step(cfg, {**stored, "table2": {"dataset": "cifar10"}}, "x.ckpt")


def test_checkpoints_store_the_options_they_were_composed_of(runs):
    score = torch.load(runs["scores"]["A"], map_location="cpu", weights_only=True)["scoreflow"]
    assert score["choices"]["data"] == "digits" and score["choices"]["model"] == "unet_small"
    flow = torch.load(runs["flow"] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["scoreflow"]
    assert flow["choices"]["dequantization"] == "variational"
    assert {g: flow["choices"][g] for g in ("sde", "model", "data")} == \
        {g: score["choices"][g] for g in ("sde", "model", "data")}


def test_the_score_models_stored_options_name_it_in_the_error(runs, tmp_path, monkeypatch):
    # without conf/ beside the package (a non-editable install) the options cannot be found by value; stored, they
    # name the score model's data all the same
    monkeypatch.setattr(validate, "_option_of", lambda group, value: None)
    a = runs["scores"]["A"]
    ckpt = torch.load(a, map_location="cpu", weights_only=True)
    cfg = compose_cfg([f"score_ckpt={a}", "+data=mnist5k"], tmp_path / "run", "train_dequant")
    with pytest.raises(ConfigError) as e:
        validate.score_model_settings(cfg, ckpt["scoreflow"]["config"], a, ckpt["scoreflow"]["choices"])
    assert "(data=digits)" in e.value.fix and "python train.py data=mnist5k" in e.value.fix
    with pytest.raises(ConfigError) as e:
        validate.score_model_settings(cfg, ckpt["scoreflow"]["config"], a, {})  # an earlier release's checkpoint
    assert "(data=digits)" not in e.value.fix


def test_a_score_model_of_an_earlier_release_passes_and_is_named(tmp_path):
    # release 53daf68 stored no model._target_ (and no options): its own settings pass, another network is refused
    old = Path(__file__).resolve().parents[1] / "data" / "release-53daf68_digits_tiny.ckpt"
    stored = torch.load(old, map_location="cpu", weights_only=True)["scoreflow"]
    assert "_target_" not in stored["config"]["model"] and "choices" not in stored
    validate.score_model_settings(compose_cfg([f"score_ckpt={old}"], tmp_path / "a", "train_dequant"),
                                  stored["config"], old)
    with pytest.raises(ConfigError, match="another model") as e:
        validate.score_model_settings(compose_cfg([f"score_ckpt={old}", "+model=mlp"], tmp_path / "b", "train_dequant"),
                                      stored["config"], old)
    assert "(model=unet_small)" in e.value.fix


# 4. the flow's sizes

def test_zero_mixture_components_are_refused_by_both_entry_points(runs):
    for name in ("components", "components_joint"):
        code, lines = runs["results"][name]
        check_screen(code, lines, 2, "dequantization.num_components", ">= 1", "got 0")
    assert not (runs["cwd"] / "r3").exists() and not (runs["cwd"] / "r4").exists()


@pytest.mark.parametrize("overrides, key", [
    (["dequantization.num_components=-1"], "dequantization.num_components"),
    (["dequantization.width=0"], "dequantization.width"),
    (["dequantization.context_width=0"], "dequantization.context_width"),
    (["dequantization.num_couplings=-1"], "dequantization.num_couplings"),
    (["dequantization.attn_heads=3"], "dequantization.attn_heads"),  # width 32: not divisible
    (["dequantization.bisection_iters=0"], "dequantization.bisection_iters"),
    (["dequantization.base=uniform"], "dequantization.base"),
    (["module.dequant.num_t=0"], "module.dequant.num_t"),
])
def test_flow_sizes_are_checked(tmp_path, overrides, key):
    # usable: 0 couplings (the flow that is uniform dequantization), 0 blocks, 4 heads dividing the width
    validate.train(compose_cfg([*FAST, "dequantization=variational", "dequantization.num_couplings=0",
                                "dequantization.num_blocks=0", "dequantization.attn_heads=4"], tmp_path / "good"))
    with pytest.raises(ConfigError) as e:
        validate.train(compose_cfg([*FAST, "dequantization=variational", *overrides], tmp_path / "bad"))
    assert e.value.key == key
