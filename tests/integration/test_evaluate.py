"""``evaluate.py`` end to end on a tiny digits checkpoint: metrics and per-image values, resume without double
counting, batch-independent per-image seeds, protocol checks, score_sde_pytorch checkpoints, FID, errors."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from scoreflow.tasks.build import ConfigError, build_module
from scoreflow.tasks.checkpoint import CheckpointFormatError, ckpt_tag, run_subdir
from scoreflow.tasks.evaluate import evaluate
from scoreflow.tasks.likelihood_eval import ProtocolMismatchError
from scoreflow.tasks.train import train
from tests.integration.conftest import compose_cfg
from tests.integration.signals import signal_when_ready

ROOT = Path(__file__).resolve().parents[2]
KEYS = ["test/bpd_ode", "test/bpd_ode_se", "test/bpd_bound", "test/bpd_bound_se", "test/nfe"]
# loose tolerances and few bound times: the mechanics, not the numbers
QUICK = ["evaluation.method=dopri5", "evaluation.rtol=1e-2", "evaluation.atol=1e-2", "evaluation.test_num_t=8",
         "progress=false", "device=cpu"]
# one fixed RK4 step (4 NFE) for the tests that need many ODE solves, without the (adaptive) solver check
RK4 = ["evaluation.method=rk4", "evaluation.steps=1", "evaluation.test_num_t=4", "progress=false", "device=cpu",
       "solver_check_images=0"]
TINY_NCSNPP = ["model=ddpmpp", "model.net.nf=16", "model.net.ch_mult=[1,2]", "model.net.num_res_blocks=1",
               "model.net.attn_resolutions=[4]", "model.net.dropout=0.0"]


compose_train = compose_cfg  # module-scoped fixtures cannot use the function-scoped make_cfg


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    """4 training steps on digits, then the test phase (16 images: debug=fast's test_subset)."""
    run = tmp_path_factory.mktemp("digits_run")
    train(compose_train(["debug=fast", "trainer.accelerator=cpu", "trainer.max_steps=4", "val_every=4",
                         "callbacks=minimal", "+trainer.enable_progress_bar=false"], run))
    return run / "checkpoints" / "last.ckpt"


def test_evaluate_alone_reproduces_the_training_test_phase(digits_ckpt, make_cfg, tmp_path):
    """One evaluation path: `evaluate.py ckpt_path=<run>/checkpoints/last.ckpt` gives the run's own test-phase
    values (same images, batches, seeds, protocol), bit for bit."""
    run = digits_ckpt.parent.parent
    phase, phase_m = np.load(run / "test_per_example.npz"), json.loads((run / "metrics.json").read_text())
    m = run_eval(make_cfg, digits_ckpt, ["progress=false"], sub="alone")
    per = np.load(tmp_path / "alone" / "per_example.npz")
    np.testing.assert_array_equal(phase["index"], np.arange(16))
    assert m["protocol"]["num_images"] == 16 and m["protocol"]["seed"] == 0 and per["bpd_ode"].shape == (16, 1)
    for q in ("bpd_ode", "bpd_bound"):
        np.testing.assert_array_equal(per[q][:, 0], phase[q])
        assert m[f"test/{q}"] == pytest.approx(phase_m[f"test/{q}"], rel=1e-6)  # logged as float32
        assert m[f"test/{q}_se"] == pytest.approx(phase_m[f"test/{q}_se"], rel=1e-5)
    assert m["test/nfe"] == phase_m["test/nfe"]
    # what each recorded it evaluated is the same record, so bench/compare_runs.py pairs them as like with like
    # (the test phase's was metrics.json's text line: "recorded by different tools", refused under --strict)
    meta, ev_meta = (json.loads(str(z["meta"].item())) for z in (phase, per))
    assert meta["protocol"] == ev_meta["protocol"] and meta["seed"] == ev_meta["seed"] == 0
    assert meta["protocol"]["bound"]["plan"] == "fit on 16 images"


def run_eval(make_cfg, ckpt, overrides, sub="eval"):
    return evaluate(make_cfg([f"ckpt_path={ckpt}", *overrides], sub=sub, config_name="evaluate"))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def counts(path: Path) -> dict[tuple[str, int, int], int]:
    out: dict[tuple[str, int, int], int] = {}
    for rec in jsonl(path):
        for i in rec["i"]:
            out[(rec["q"], i, rec["r"])] = out.get((rec["q"], i, rec["r"]), 0) + 1
    return out


def test_metrics_and_one_value_per_image(digits_ckpt, make_cfg, tmp_path, capsys):
    m = run_eval(make_cfg, digits_ckpt, [*QUICK, "num_images=10", "batch_size=5", "repeats=2", "solver_check_images=2"])
    out = tmp_path / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    for key in KEYS:
        assert key in saved and np.isfinite(saved[key]) and saved[key] == pytest.approx(m[key])
    assert saved["complete"] is True and 0 < saved["test/bpd_bound"] < 30 and saved["test/nfe_max"] >= saved["test/nfe"]
    p = saved["protocol"]
    assert p["ode"]["rtol"] == 1e-2 and p["ode"]["method"] == "dopri5" and p["bound"]["num_t"] == 8
    assert p["repeats"] == 2 and p["num_images"] == 10 and p["weights"] == "EMA" and p["split"] == "test"
    assert p["bound"]["truncation_correction"] is False and p["ode"]["truncation_correction"] is False

    per = np.load(out / "per_example.npz")
    np.testing.assert_array_equal(per["index"], np.arange(10))
    assert per["bpd_ode"].shape == per["bpd_bound"].shape == per["nfe"].shape == (10, 2)
    assert np.isfinite(per["bpd_ode"]).all() and np.isfinite(per["bpd_bound"]).all()
    per_image = per["bpd_ode"].mean(1)  # mean over repeats, then mean +- s.e. over images
    assert saved["test/bpd_ode"] == pytest.approx(per_image.mean(), rel=1e-12)
    assert saved["test/bpd_ode_se"] == pytest.approx(per_image.std(ddof=1) / np.sqrt(10), rel=1e-9)
    assert not np.array_equal(per["bpd_bound"][:, 0], per["bpd_bound"][:, 1])  # repeats draw fresh noise
    c = counts(out / "partial.jsonl")
    assert set(c.values()) == {1} and len(c) == 2 * 10 * 2 + 2  # + the solver check of images 0 and 1, repeat 0
    assert {k for k in c if k[0] == "bpd_ode_tight"} == {("bpd_ode_tight", 0, 0), ("bpd_ode_tight", 1, 0)}
    err = np.abs(per["bpd_ode"][:2, 0] - per["bpd_ode_tight"])
    assert saved["test/ode_solver_error_max"] == err.max() > 0 and saved["test/ode_solver_error_num_images"] == 2
    assert saved["protocol"]["solver_check"] == {"num_images": 2, "method": "dopri5", "rtol": 1e-4, "atol": 1e-4}

    table = capsys.readouterr().out
    assert "bits/dim (ODE)" in table and "bits/dim (bound)" in table and "rtol=0.01" in table and "num_t=8" in table
    assert f"solver error (ODE)  ≤ {err.max():.1e} bpd" in table and "max |Δ| over 2 images" in table


def test_interrupted_evaluation_resumes_without_double_counting(digits_ckpt, make_cfg, tmp_path):
    args = [*RK4, "num_images=10", "batch_size=4", "repeats=2"]  # 3 batches x 2 repeats
    part = run_eval(make_cfg, digits_ckpt, [*args, "max_batches=2"], sub="resumed")
    partial = tmp_path / "resumed" / "partial.jsonl"
    assert part["complete"] is False and len(jsonl(partial)) == 2 * 2  # two batches, ODE + bound each
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["complete"] is False
    with open(partial, "a") as f:
        f.write('{"q": "bpd_ode", "r": 1, "i": [8, 9], "v": [1.0')  # a line torn by a kill mid-write

    done = run_eval(make_cfg, digits_ckpt, args, sub="resumed")
    full = run_eval(make_cfg, digits_ckpt, args, sub="uninterrupted")
    c = counts(partial)
    assert done["complete"] and set(c.values()) == {1} and len(c) == 2 * 10 * 2
    a, b = np.load(tmp_path / "resumed" / "per_example.npz"), np.load(tmp_path / "uninterrupted" / "per_example.npz")
    for q in ("bpd_ode", "bpd_bound"):
        np.testing.assert_array_equal(a[q], b[q])
        assert done[f"test/{q}"] == full[f"test/{q}"] and done[f"test/{q}_se"] == full[f"test/{q}_se"]

    # a finished evaluation reruns with no new work; more repeats compute only the new repeat
    n_lines = len(partial.read_text().splitlines())
    run_eval(make_cfg, digits_ckpt, args, sub="resumed")
    assert len(partial.read_text().splitlines()) == n_lines
    more = run_eval(make_cfg, digits_ckpt, [*args[:-1], "repeats=3"], sub="resumed")
    assert len(partial.read_text().splitlines()) == n_lines + 3 * 2
    assert np.load(tmp_path / "resumed" / "per_example.npz")["bpd_ode"].shape == (10, 3) and more["complete"]


@pytest.mark.slow  # 10-110 s on 2 cores: `make test-all` runs it
def test_changing_num_images_under_an_adaptive_solver_equals_an_uninterrupted_run(digits_ckpt, make_cfg, tmp_path):
    """num_images=3 at batch 2 solves [0, 1] and [2]; raised to 5 the batches are [0, 1], [2, 3], [4]: image 2 was
    solved as a batch of one, while an uninterrupted run solves it with image 3 (an adaptive solver shares its
    steps across a batch). That batch is solved whole again, so every value, the mean NFE and the solver check
    equal an uninterrupted run's, to the bit. Lowered again to 3, image 2's value of the batch [2] counts again;
    lowered to 1, image 0 (solved with image 1 so far) is solved alone."""
    adaptive = ["evaluation.method=dopri5", "evaluation.rtol=1e-2", "evaluation.atol=1e-2", "evaluation.test_num_t=4",
                "progress=false", "device=cpu", "solver_check_images=3", "batch_size=2", "evaluation.bound_plan=none"]
    three = run_eval(make_cfg, digits_ckpt, [*adaptive, "num_images=3"], sub="changed")
    short = np.load(tmp_path / "changed" / "per_example.npz")["bpd_ode"][2, 0]
    done = run_eval(make_cfg, digits_ckpt, [*adaptive, "num_images=5"], sub="changed")
    full = run_eval(make_cfg, digits_ckpt, [*adaptive, "num_images=5"], sub="straight")
    a, b = np.load(tmp_path / "changed" / "per_example.npz"), np.load(tmp_path / "straight" / "per_example.npz")
    for q in ("bpd_ode", "bpd_bound"):
        np.testing.assert_array_equal(a[q], b[q])
    assert a["bpd_ode"][2, 0] != short  # the earlier value (image 2 alone) does not count in the batch [2, 3]
    keys = ("test/bpd_ode", "test/bpd_ode_se", "test/nfe", "test/nfe_max", "test/ode_solver_error_max")
    for key in keys:
        assert done[key] == full[key], key
    solved = [rec["i"] for rec in jsonl(tmp_path / "changed" / "partial.jsonl") if rec.get("q") == "bpd_ode"]
    assert solved == [[0, 1], [2], [2, 3], [4]]  # the check's batches ([0, 1], [2]) were whole: not solved again

    lowered = run_eval(make_cfg, digits_ckpt, [*adaptive, "num_images=3"], sub="changed")
    for key in keys:
        assert lowered[key] == three[key], key
    one = run_eval(make_cfg, digits_ckpt, [*adaptive, "num_images=1", "solver_check_images=1"], sub="changed")
    alone = run_eval(make_cfg, digits_ckpt, [*adaptive, "num_images=1", "solver_check_images=1"], sub="alone")
    for key in keys:
        np.testing.assert_equal(one[key], alone[key], err_msg=key)  # the s.e. of one image is NaN in both


def test_a_folder_compares_the_settings_of_the_quantities_computed(digits_ckpt, make_cfg, tmp_path):
    """A bound-only run leaves the ODE's settings open, an ODE-only run the bound's (its plan, fitted on the first
    min(32, num_images) images, too), but the ODE's batch size stays tied to the ODE values once there are any."""
    dopri = ["evaluation.method=dopri5", "evaluation.rtol=1e-2", "evaluation.atol=1e-2", "evaluation.test_num_t=4",
             "progress=false", "device=cpu", "solver_check_images=0"]
    run_eval(make_cfg, digits_ckpt, [*dopri, "ode=false", "num_images=4", "batch_size=4"], sub="f")
    run_eval(make_cfg, digits_ckpt, [*dopri, "bound=false", "num_images=4", "batch_size=4"], sub="f")
    with pytest.raises(ProtocolMismatchError, match="(?s)ode_batch_size: 4 -> 2.*rerun with batch_size=4"):
        run_eval(make_cfg, digits_ckpt, [*dopri, "bound=false", "num_images=4", "batch_size=2"], sub="f")
    raised = run_eval(make_cfg, digits_ckpt, [*dopri, "bound=false", "num_images=8", "batch_size=4"], sub="f")
    assert raised["test/bpd_ode_num_images"] == 8  # the bound plan's image count changed: no matter, no bound
    with pytest.raises(ProtocolMismatchError, match="(?s)ode.rtol: 0.01 -> 0.02"):
        run_eval(make_cfg, digits_ckpt, [*dopri, "bound=false", "num_images=8", "batch_size=4",
                                         "evaluation.rtol=2e-2"], sub="f")


def test_per_image_values_do_not_depend_on_batch_boundaries(digits_ckpt, make_cfg, tmp_path):
    for bs in (3, 5):
        run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=6", f"batch_size={bs}"], sub=f"bs{bs}")
    a, b = np.load(tmp_path / "bs3" / "per_example.npz"), np.load(tmp_path / "bs5" / "per_example.npz")
    np.testing.assert_array_equal(a["bpd_bound"], b["bpd_bound"])  # each image's times and noises are its own
    np.testing.assert_allclose(a["bpd_ode"], b["bpd_ode"], rtol=1e-6)  # fixed-step ODE: only float round-off


def test_changed_protocol_is_refused_then_restarted_with_resume_false(digits_ckpt, make_cfg, tmp_path):
    run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=2"], sub="proto")
    with pytest.raises(ProtocolMismatchError, match="test_num_t|num_t"):
        run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=2", "evaluation.test_num_t=6"], sub="proto")
    m = run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=2", "evaluation.test_num_t=6", "resume=false"], sub="proto")
    assert m["protocol"]["bound"]["num_t"] == 6 and len(counts(tmp_path / "proto" / "partial.jsonl")) == 4


def test_val_split_raw_weights_bound_only_with_corrections(digits_ckpt, make_cfg):
    m = run_eval(make_cfg, digits_ckpt, [*RK4, "split=val", "use_ema=false", "ode=false", "num_images=3",
                                         "evaluation.truncation_correction=true"])
    assert "val/bpd_bound" in m and "val/bpd_ode" not in m and not any(k.startswith("test/") for k in m)
    assert m["protocol"]["weights"] == "raw" and m["protocol"]["bound"]["truncation_correction"] is True
    assert "eps-correction on" in m["protocol_text"]
    m = run_eval(make_cfg, digits_ckpt, [*RK4, "bound=false", "num_images=3", "ode_truncation_correction=true"],
                 sub="odetc")
    assert np.isfinite(m["test/bpd_ode"]) and m["protocol"]["ode"]["truncation_correction"] is True


def test_score_sde_pytorch_checkpoint(make_cfg, tmp_path):
    from scoreflow.nets.sp_checkpoint import CheckpointMismatchError, save_score_sde_checkpoint

    module = build_module(make_cfg(["debug=fast", *TINY_NCSNPP], sub="build"))
    path = tmp_path / "checkpoint_8.pth"
    save_score_sde_checkpoint(path, module.score_model, step=8)
    m = run_eval(make_cfg, path, [*RK4, *TINY_NCSNPP, "sde=vp", "data=digits", "num_images=3"])
    assert np.isfinite(m["test/bpd_ode"]) and np.isfinite(m["test/bpd_bound"])
    assert m["protocol"]["step"] == 8 and m["protocol"]["checkpoint"].endswith("checkpoint_8.pth")
    with pytest.raises(ConfigError, match="model=... data=..."):
        run_eval(make_cfg, path, [*RK4, "sde=vp"], sub="e1")
    with pytest.raises(CheckpointMismatchError):
        run_eval(make_cfg, path, [*RK4, *TINY_NCSNPP, "model.net.nf=8", "sde=vp", "data=digits"], sub="e2")
    # a .pth takes its SDE and data scaling from the command line: another one in the same folder is refused, not
    # averaged with the values of the first (the folder's fingerprint holds them)
    for other, key in (("module.scale=1", "scale"), ("sde=subvp", "sde._target_")):
        with pytest.raises(ProtocolMismatchError, match=f"(?s)other settings.*  {key}: "):
            run_eval(make_cfg, path, [*RK4, *TINY_NCSNPP, "sde=vp", "data=digits", "num_images=3", other])


@pytest.mark.parametrize("override, key", [
    ("seed=abc", "seed"),
    ("ode=maybe", "ode"),
    ("evaluation.method=rk4", "evaluation.steps"),  # the checkpoint's steps: null
    ("evaluation.test_num_t=3", "evaluation.test_num_t"),  # debug=fast's checkpoint draws antithetic pairs
    ("evaluation.bound_plan_images=0", "evaluation.bound_plan_images"),
])
def test_settings_that_failed_inside_the_evaluation_are_refused_before_it(digits_ckpt, make_cfg, override, key):
    from scoreflow.tasks import validate

    validate.evaluate(make_cfg([f"ckpt_path={digits_ckpt}", "evaluation.method=rk4", "evaluation.steps=2",
                                "evaluation.test_num_t=4"], config_name="evaluate"))  # usable: no error
    with pytest.raises(ConfigError) as e:
        validate.evaluate(make_cfg([f"ckpt_path={digits_ckpt}", override], config_name="evaluate"))
    assert e.value.key == key
    if key.startswith("evaluation."):  # train.py's settings get the same checks
        with pytest.raises(ConfigError) as e:
            validate.train(make_cfg(["debug=fast", override.replace("evaluation.", "module.evaluation.")]))
        assert e.value.key == "module." + key


def test_clear_errors(digits_ckpt, make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        run_eval(make_cfg, tmp_path / "missing.ckpt", RK4)
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        evaluate(make_cfg(RK4, config_name="evaluate"))
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        run_eval(make_cfg, text, RK4)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointFormatError, match="neither a scoreflow checkpoint"):
        run_eval(make_cfg, other, RK4)
    with pytest.raises(CheckpointFormatError, match="is a scoreflow checkpoint"):
        run_eval(make_cfg, digits_ckpt, [*RK4, "ckpt_format=score_sde"])
    with pytest.raises(ConfigError, match="split"):
        run_eval(make_cfg, digits_ckpt, [*RK4, "split=dev"])
    with pytest.raises(ConfigError, match="device=cpu names one device; for several use accelerator"):
        run_eval(make_cfg, digits_ckpt, [*RK4, "devices=2"])  # RK4 holds device=cpu


def test_run_directory_is_stable_per_checkpoint_and_overrides(tmp_path):
    a = run_subdir(str(tmp_path / "runA" / "checkpoints" / "last.ckpt"), "split=val")
    assert a.startswith("runA-last-") and a.endswith("/split=val")
    assert a == run_subdir(str(tmp_path / "runA" / "checkpoints" / "last.ckpt"), "split=val")
    assert ckpt_tag(str(tmp_path / "runB" / "checkpoints" / "last.ckpt")) != a.split("/")[0]
    assert run_subdir(str(tmp_path / "m.pth"), "").endswith("/default")
    assert "/" not in run_subdir("m.pth", "mask=/a/b.png").split("/", 1)[1]


class PooledFeatures(torch.nn.Module):
    """A cheap stand-in for Inception: 4x4 average-pooled pixels as features."""

    identity = "test-pool4"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().expand(-1, 3, -1, -1) / 255
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


@pytest.fixture
def fid_draws(monkeypatch) -> list[int]:
    """The seeds evaluate.py's FID samples, in order (Inception replaced by PooledFeatures)."""
    import scoreflow.tasks.fid as fid_task

    monkeypatch.setattr(fid_task, "make_extractor", lambda weights, device: PooledFeatures())
    drawn: list[int] = []
    real_draw = fid_task.draw_samples

    def counting_draw(module, seeds, *a, **kw):
        drawn.extend(seeds)
        return real_draw(module, seeds, *a, **kw)

    monkeypatch.setattr(fid_task, "draw_samples", counting_draw)
    return drawn


def test_fid_samples_resume_and_reference_cache(digits_ckpt, make_cfg, tmp_path, fid_draws):
    drawn = fid_draws
    args = ["ode=false", "bound=false", "progress=false", "device=cpu", "fid.num_samples=12", "fid.batch_size=5",
            "sampler=ode", "sampler.method=euler", "sampler.steps=3", f"fid.cache_dir={tmp_path / 'cache'}",
            "fid.ref_num_images=40"]
    m = run_eval(make_cfg, digits_ckpt, args, sub="fid")
    assert np.isfinite(m["test/fid"]) and m["test/fid"] > 0 and m["test/fid_nfe"] == 4
    assert m["test/fid_ref_num_images"] == 40 and sorted(drawn) == list(range(12))
    cache = list((tmp_path / "cache").glob("fid_digits-*-first40_train.npz"))
    assert len(cache) == 1
    stamp = cache[0].stat().st_mtime_ns
    again = run_eval(make_cfg, digits_ckpt, [*args, "fid.num_samples=14"], sub="fid")
    assert sorted(drawn) == list(range(12)) + [12, 13]  # only the two new seeds were sampled
    assert cache[0].stat().st_mtime_ns == stamp and np.isfinite(again["test/fid"])
    assert m["protocol"]["fid"]["sampler"]["method"] == "euler"
    # what was computed: FID's sampler, not the likelihood ODE's settings (ode=false bound=false)
    assert m["protocol_text"].endswith(
        "; FID: 12 samples, ode_sample euler steps=3, against the train split (40 images)")
    assert "ODE " not in m["protocol_text"] and "bound num_t" not in m["protocol_text"]


def test_fid_waits_for_the_likelihoods_and_says_so(digits_ckpt, make_cfg, tmp_path, fid_draws, capsys):
    args = ["ode=false", "progress=false", "device=cpu", "fid.num_samples=4", "fid.batch_size=4", "sampler=ode",
            "sampler.method=euler", "sampler.steps=3", f"fid.cache_dir={tmp_path / 'cache'}", "fid.ref_num_images=20",
            "evaluation.test_num_t=4", "num_images=2", "batch_size=1"]
    m = run_eval(make_cfg, digits_ckpt, [*args, "max_batches=1"], sub="wait")
    assert not m["complete"] and fid_draws == [] and "test/fid" not in m
    assert re.search(r"^  FID +deferred: FID runs once the likelihoods are complete \(rerun the same command\)$",
                     capsys.readouterr().out, re.M)
    done = run_eval(make_cfg, digits_ckpt, args, sub="wait")
    assert done["complete"] and np.isfinite(done["test/fid"]) and "fid_status" not in done


def test_metrics_json_is_strict_json_with_null_for_a_non_finite_value(digits_ckpt, make_cfg, tmp_path):
    m = run_eval(make_cfg, digits_ckpt, [*RK4, "ode=false", "num_images=1"], sub="one")
    assert np.isnan(m["test/bpd_bound_se"])  # the standard error of one image

    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")

    saved = json.loads((tmp_path / "one" / "metrics.json").read_text(), parse_constant=refuse)
    assert saved["test/bpd_bound_se"] is None and saved["test/bpd_bound"] == m["test/bpd_bound"]


def test_fid_reference_cache_belongs_to_the_images_not_only_their_config(digits_ckpt, make_cfg, tmp_path, fid_draws,
                                                                         monkeypatch):
    """The reference statistics' cache was named by the data config alone: an image folder's files replaced under
    the same root reused the old statistics. One changed pixel of one training image now gets its own cache."""
    from scoreflow.data.base import DataSource

    args = ["ode=false", "bound=false", "progress=false", "device=cpu", "fid.num_samples=4", "fid.batch_size=4",
            "sampler=ode", "sampler.method=euler", "sampler.steps=2", f"fid.cache_dir={tmp_path / 'cache'}",
            "fid.ref_num_images=40"]
    first = run_eval(make_cfg, digits_ckpt, args, sub="ref-a")
    assert len(list((tmp_path / "cache").glob("fid_digits-*_train.npz"))) == 1
    load = DataSource.load

    def changed(self):
        first = self._splits is None
        splits = load(self)
        if first:  # once per source: its first training image (through the split's index), one level of one pixel
            train = splits["train"]
            train.x[0 if train.index is None else int(train.index[0]), 0, 0, 0] ^= 1
        return splits

    monkeypatch.setattr(DataSource, "load", changed)
    second = run_eval(make_cfg, digits_ckpt, args, sub="ref-b")
    assert len(list((tmp_path / "cache").glob("fid_digits-*_train.npz"))) == 2
    assert second["test/fid"] != first["test/fid"]


def test_fid_samples_of_a_model_trained_on_levels_are_rounded_onto_the_levels():
    """A model trained on k / (K - 1) (module.train_input=levels, ScoreFlow's JAX code, score_sde_pytorch) samples
    near the levels, not inside the bins of (k + u) / K: floor(K x) moved 3 % of the pixels of noisy exact levels
    off their level; round((K - 1) x) is its inverse."""
    from types import SimpleNamespace

    from scoreflow.tasks.checkpoint import to_levels

    K = 17
    k = torch.arange(K).repeat(50)
    x = k / (K - 1) + 0.1 / (K - 1) * torch.randn(len(k), generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_levels(SimpleNamespace(num_levels=K, train_input="levels"), x).long(), k)
    binned = to_levels(SimpleNamespace(num_levels=K, train_input="dequantized"), x).long()
    assert (binned != k).float().mean() > 0.01  # the bins of (k + u) / K are not centred on k / (K - 1)
    u = torch.rand(len(k), generator=torch.Generator().manual_seed(1))
    assert torch.equal(to_levels(SimpleNamespace(num_levels=K, train_input="dequantized"), (k + u) / K).long(), k)


@pytest.mark.parametrize("predictor", ["reverse_diffusion", "ancestral"])
def test_fid_samples_of_an_earlier_release_are_reused_unless_the_new_key_changes_them(
        digits_ckpt, make_cfg, tmp_path, fid_draws, predictor):
    """FID sample folders written before sampler.variance existed: reused by a PC sampler it does not touch; refused
    for the ancestral predictor, whose default noise changed with it (VP/subVP: Eq. 4's beta_i)."""
    from scoreflow.tasks.likelihood_eval import ProtocolMismatchError

    drawn = fid_draws
    args = ["ode=false", "bound=false", "progress=false", "device=cpu", "fid.batch_size=4", "sampler=pc",
            f"sampler.predictor={predictor}", "sampler.corrector=none", "sampler.steps=3",
            f"fid.cache_dir={tmp_path / 'cache'}", "fid.ref_num_images=40", f"hydra.run.dir={tmp_path / 'ev'}"]
    run_eval(make_cfg, digits_ckpt, [*args, "fid.num_samples=4"], sub="old")
    protos = list(tmp_path.glob("**/fid_samples/protocol.json"))
    assert len(protos) == 1
    stored = json.loads(protos[0].read_text())
    del stored["sampler"]["variance"]  # as an earlier release wrote it
    protos[0].write_text(json.dumps(stored))
    if predictor == "ancestral":
        with pytest.raises(ProtocolMismatchError):
            run_eval(make_cfg, digits_ckpt, [*args, "fid.num_samples=6"], sub="old")
    else:
        run_eval(make_cfg, digits_ckpt, [*args, "fid.num_samples=6"], sub="old")
        assert drawn == [0, 1, 2, 3, 4, 5]  # the four earlier samples reused


@pytest.mark.slow
def test_fid_with_real_inception_weights(digits_ckpt, make_cfg, tmp_path):
    from scoreflow.metrics.inception import fid_helper_torchscript, resolve_inception_weights

    try:
        resolve_inception_weights()
    except FileNotFoundError:
        if fid_helper_torchscript() is None:
            pytest.skip("no offline Inception weights")
    m = run_eval(make_cfg, digits_ckpt, ["ode=false", "bound=false", "progress=false", "device=cpu",
                                         "fid.num_samples=32", "fid.batch_size=32", "sampler=ode",
                                         "sampler.method=euler", "sampler.steps=4", "fid.ref_num_images=48",
                                         f"fid.cache_dir={tmp_path / 'cache'}"], sub="fid_real")
    assert np.isfinite(m["test/fid"]) and m["test/fid"] > 0
    assert list((tmp_path / "cache").glob("fid_digits-*_train.npz"))


@pytest.mark.slow
def test_command_line_resumes_in_the_same_directory(digits_ckpt, tmp_path):
    """The real ``python evaluate.py``: the same command twice writes to one folder and the second does no work."""
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={digits_ckpt}", *RK4, "num_images=6",
           "batch_size=3", "max_batches=1"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "PARTIAL" in first.stdout
    second = subprocess.run(cmd[:-1], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    (metrics,) = (tmp_path / "outputs" / "evaluate").rglob("metrics.json")
    saved = json.loads(metrics.read_text())
    assert saved["complete"] and set(counts(metrics.parent / "partial.jsonl").values()) == {1}
    assert "bits/dim (ODE)" in second.stdout
    log = (metrics.parent / "evaluate.log").read_text()  # both tables are in the run's log too (printed only before)
    assert log.count("bits/dim (ODE)") == 2 and "PARTIAL" in log


def test_bound_standard_error_split_and_fitted_plan(digits_ckpt, make_cfg, tmp_path, capsys):
    """The bound's s.e. over images is split into between-image and Monte-Carlo parts (se² = between² + mc²),
    printed under the result; the fitted plan (the default) gives a smaller Monte-Carlo part than no plan at the
    same number of calls, and the per-image Monte-Carlo standard errors land in per_example.npz."""
    common = ["evaluation.method=rk4", "evaluation.steps=1", "progress=false", "device=cpu", "solver_check_images=0",
              "ode=false", "num_images=16", "evaluation.test_num_t=16"]
    m = run_eval(make_cfg, digits_ckpt, common, sub="plan")
    se, b, mc = m["test/bpd_bound_se"], m["test/bpd_bound_se_between"], m["test/bpd_bound_se_mc"]
    assert "plan fit" in m["protocol_text"] and "antithetic" in m["protocol_text"]
    assert se**2 == pytest.approx(b**2 + mc**2, rel=1e-6) or b == 0.0
    assert "bound s.e. split" in capsys.readouterr().out
    per = np.load(tmp_path / "plan" / "per_example.npz")
    assert per["bpd_bound_mcse"].shape == per["bpd_bound"].shape and bool((per["bpd_bound_mcse"] > 0).all())
    m0 = run_eval(make_cfg, digits_ckpt, [*common, "evaluation.bound_plan=none", "evaluation.bound_antithetic=false"],
                  sub="noplan")
    assert "plan" not in m0["protocol"]["bound"]
    assert m["test/bpd_bound_se_mc"] < m0["test/bpd_bound_se_mc"]


def test_a_checkpoint_retrained_at_the_same_path_and_step_is_refused(digits_ckpt, make_cfg, tmp_path):
    """The same path and step but other weights (a run retrained in its folder): the stored values are not
    reused (they were, silently, when the checkpoint was identified by path and step only); FID samples too."""
    import shutil

    from scoreflow.tasks.fid import fid_fingerprint

    ckpt = tmp_path / "ckpts" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(digits_ckpt, ckpt)
    run_eval(make_cfg, ckpt, [*RK4, "num_images=2"], sub="same")
    run_eval(make_cfg, ckpt, [*RK4, "num_images=2"], sub="same")  # the same weights: reused
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for shadow in state["ema"]["shadow"].values():
        shadow.add_(1e-3)  # "retrained": same path, same global_step, other EMA weights
    torch.save(state, ckpt)
    with pytest.raises(ProtocolMismatchError, match="weights_digest"):
        run_eval(make_cfg, ckpt, [*RK4, "num_images=2"], sub="same")
    a = {"path": "p", "step": 4, "weights": "EMA", "weights_digest": "a"}
    fid_cfg = OmegaConf.create({"seed": 0})
    assert fid_fingerprint(a, fid_cfg, {}) != fid_fingerprint({**a, "weights_digest": "b"}, fid_cfg, {})


def test_an_earlier_release_folder_without_a_digest_still_resumes(digits_ckpt, make_cfg, tmp_path):
    run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=2"], sub="legacy")
    part = tmp_path / "legacy" / "partial.jsonl"
    lines = part.read_text().splitlines()
    header = json.loads(lines[0])
    for key in ("weights_digest", "data_digest"):
        del header["protocol"][key]  # as written before the digests existed
    part.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    m = run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=2"], sub="legacy")  # no ProtocolMismatchError
    assert m["protocol"]["weights_digest"] and json.loads(part.read_text().splitlines()[0])["protocol"] == header[
        "protocol"]  # the stored values were reused, not recomputed under a new header


def test_more_images_than_the_plan_was_fit_on_is_refused_not_mixed(digits_ckpt, make_cfg, tmp_path):
    """The bound's time plan is fit on the first min(bound_plan_images, n) images: raising n past a small
    first run would fit another plan, so the folder's values are not mixed with the new ones."""
    run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=2"], sub="plan")
    with pytest.raises(ProtocolMismatchError, match="plan"):
        run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=3"], sub="plan")


def test_other_images_or_another_ode_batch_size_are_refused_not_mixed(digits_ckpt, make_cfg, tmp_path, monkeypatch):
    """The folder's values were computed on these images (their digest; ``data_root`` may move them, not change
    them: a rerun on other images printed the first images' numbers) and, for an adaptive ODE solver, in batches
    of this size (each batch is one system); a fixed-grid ODE or the bound alone resume at any batch size."""
    import scoreflow.tasks.evaluate as ev
    from scoreflow.data.base import ArrayDataset

    run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=2"], sub="digest")
    run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=3", "batch_size=1", "evaluation.bound_plan=none"],
             sub="digest-grid")
    run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=3", "batch_size=2", "evaluation.bound_plan=none"],
             sub="digest-grid")  # fixed grid: no batch size in the protocol
    adaptive = ["evaluation.method=dopri5", "evaluation.rtol=1e-2", "evaluation.atol=1e-2", "evaluation.test_num_t=4",
                "progress=false", "device=cpu", "solver_check_images=0", "bound=false", "num_images=2"]
    run_eval(make_cfg, digits_ckpt, [*adaptive, "batch_size=2"], sub="digest-adaptive")
    with pytest.raises(ProtocolMismatchError, match="ode_batch_size"):
        run_eval(make_cfg, digits_ckpt, [*adaptive, "batch_size=1"], sub="digest-adaptive")
    digest = ev.images_digest
    monkeypatch.setattr(ev, "images_digest", lambda dataset: "other images")
    with pytest.raises(ProtocolMismatchError, match="data_digest"):
        run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=2"], sub="digest")
    # the digest itself: every image, in order; the same images at another place (a copy, a view) give the same one
    x = torch.randint(0, 17, (12, 1, 8, 8), dtype=torch.uint8)
    y = torch.zeros(12)
    d = digest(ArrayDataset(x, y))
    assert d == digest(ArrayDataset(x.clone(), y)) == digest(ArrayDataset(x, y, torch.arange(12)))
    assert d == ArrayDataset(x, y).digest(chunk=5)  # ArrayDataset.digest, read in chunks
    with pytest.raises(TypeError, match="ArrayDataset"):
        digest(torch.utils.data.TensorDataset(x, y))
    changed = x.clone()
    changed[11, 0, 7, 7] ^= 1
    assert digest(ArrayDataset(changed, y)) != d
    assert digest(ArrayDataset(x, y, torch.arange(12).flip(0))) != d  # order matters
    assert digest(ArrayDataset(x, y, torch.arange(11))) != d


def _eval_until_signal(cmd: list[str], folder: Path, sig: int, env: dict[str, str], *, group: bool = False,
                       min_lines: int = 3) -> subprocess.CompletedProcess:
    """Start ``evaluate.py``, wait until ``partial.jsonl`` holds ``min_lines`` lines (its header and finished
    batches), send ``sig`` (to the process, or to its process group as SLURM does), wait for the exit."""
    partial = folder / "partial.jsonl"
    return signal_when_ready(cmd, cwd=folder.parent, env=env, sig=sig, group=group, what="its batches",
                             ready=lambda: partial.is_file() and len(partial.read_text().splitlines()) >= min_lines)


@pytest.mark.parametrize("sig", ["SIGUSR1", pytest.param("SIGTERM", marks=pytest.mark.slow)])
def test_a_signal_stops_evaluate_py_with_one_line_and_the_same_command_continues(digits_ckpt, make_cfg, tmp_path,
                                                                                 sig):
    """Under SLURM (fake: its variables and an ``scontrol`` on PATH that records its arguments) the time-limit
    warning SIGUSR1 requeues the job and SIGTERM (``scancel``, pre-emption) stops it: one line naming the folder,
    exit 128 + signal. Before, SIGUSR1 killed the job without a requeue and without a word (and submitit's own
    handler ignored SIGTERM). The finished batches stay; the same command finishes the job with each (image,
    repeat) counted once and the values of an uninterrupted evaluation."""
    signum = getattr(signal, sig)
    fake_bin, record = tmp_path / "bin", tmp_path / "scontrol.args"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {record}\n')
    (fake_bin / "scontrol").chmod(0o755)
    slurm = dict(SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_PROCID="0", SLURM_LOCALID="0",
                 SLURM_NODEID="0", SLURM_NODELIST="localhost", SLURM_JOB_NAME="evaluate", SLURM_JOB_ID="77")
    base = {"OMP_NUM_THREADS": "1", "HOME": str(tmp_path), "PATH": f"{fake_bin}{os.pathsep}/usr/bin:/bin"}
    folder = tmp_path / "eval"
    args = [*RK4, "num_images=24", "batch_size=2", "evaluation.test_num_t=8"]  # 12 batches
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={digits_ckpt}", *args, f"hydra.run.dir={folder}"]

    stopped = _eval_until_signal(cmd, folder, signum, {**base, **slurm}, group=True)
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    lines = [ln for ln in stopped.stderr.splitlines() if ln.startswith("scoreflow: ")]
    head = f"scoreflow: {sig} during the evaluation: stopped; the finished batches are kept in {folder}"
    if sig == "SIGUSR1":
        assert lines == [f"{head}; SLURM job 77 requeued, it continues from them"], stopped.stderr[-3000:]
        assert record.read_text().split() == ["requeue", "77"]
    else:
        assert lines == [f"{head}; the same command again continues (exit code 143)"], stopped.stderr[-3000:]
        assert not record.exists()  # scancel must be able to cancel
    assert "Traceback" not in stopped.stderr and not (folder / "metrics.json").exists()
    assert lines[0].removeprefix("scoreflow: ") in (folder / "evaluate.log").read_text()
    kept = counts(folder / "partial.jsonl")
    assert kept and len(kept) < 2 * 24

    done = subprocess.run(cmd, cwd=tmp_path, env=base, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    c = counts(folder / "partial.jsonl")
    assert set(c.values()) == {1} and len(c) == 2 * 24 and set(kept) <= set(c)
    full = run_eval(make_cfg, digits_ckpt, args, sub="uninterrupted")
    saved = json.loads((folder / "metrics.json").read_text())
    a, b = np.load(folder / "per_example.npz"), np.load(tmp_path / "uninterrupted" / "per_example.npz")
    for q in ("bpd_ode", "bpd_bound"):  # another process (1 thread) than pytest's: equal to float rounding
        np.testing.assert_allclose(a[q], b[q], rtol=1e-6)
        assert saved[f"test/{q}"] == pytest.approx(full[f"test/{q}"], rel=1e-6)
    assert saved["complete"] and "bits/dim (ODE)" in done.stdout


def test_a_non_finite_image_value_is_counted_not_dropped(digits_ckpt, make_cfg, tmp_path, monkeypatch, capsys):
    """An image whose ODE NLL is NaN (a diverged solve) was read as "not computed": the mean left it out, the count
    kept it and evaluate.py called the result complete. Now the mean is NaN and the table and metrics say how many
    images are non-finite, in evaluate.py and in train.py's test phase alike."""
    import scoreflow.lit.module as module_mod
    import scoreflow.lit.per_image as per_image_mod

    real = per_image_mod.ode_bpd

    def nan_for_image_3(module, k, indices, *args, **kwargs):
        v, nfe = real(module, k, indices, *args, **kwargs)
        return torch.where(torch.tensor([i == 3 for i in indices]), torch.nan, v), nfe

    monkeypatch.setattr(per_image_mod, "ode_bpd", nan_for_image_3)
    monkeypatch.setattr(module_mod, "ode_bpd", nan_for_image_3)
    m = run_eval(make_cfg, digits_ckpt, [*RK4, "num_images=6", "batch_size=3"])
    assert math.isnan(m["test/bpd_ode"]) and m["test/bpd_ode_num_nonfinite"] == 1 and m["test/bpd_ode_num_images"] == 6
    assert math.isfinite(m["test/bpd_bound"]) and "test/bpd_bound_num_nonfinite" not in m
    assert "nan (1 of 6 images non-finite)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["complete"] is True and saved["test/bpd_ode"] is None and saved["test/bpd_ode_num_nonfinite"] == 1

    run = tmp_path / "train"
    metrics = train(make_cfg(["debug=fast", "trainer.accelerator=cpu", "trainer.max_steps=2", "val_every=2",
                              "callbacks=minimal", "datamodule.test_subset=6", "module.evaluation.method=rk4",
                              "module.evaluation.steps=1", f"hydra.run.dir={run}"], sub="train"))
    assert math.isnan(metrics["test/bpd_ode"]) and metrics["test/bpd_ode_num_nonfinite"] == 1
    assert "nan (1 of 6 images non-finite)" in capsys.readouterr().out
