"""``scoreflow.tasks.reproduce``: paired statistics, the claims' verdicts, the report and resume skipping."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scoreflow.tasks import reproduce as rp


def _images(values, start: int = 0) -> dict[int, float]:
    return {start + i: float(v) for i, v in enumerate(values)}


def test_paired_se_is_that_of_the_differences_not_of_two_means():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 1.0, 400)  # large between-image spread, shared by both rows
    a, b = _images(base + 0.01 + rng.normal(0, 0.001, 400)), _images(base)
    d = rp.paired(a, b)
    assert d.n == 400
    assert d.mean == pytest.approx(0.01, abs=2e-4)
    diffs = np.array([a[i] - b[i] for i in range(400)])
    assert d.se == pytest.approx(diffs.std(ddof=1) / math.sqrt(400), rel=1e-12)
    assert d.se < 1e-4  # two independent means would give ~0.07: the pairing is what resolves 0.01
    assert d.z > 50


def test_paired_uses_only_shared_images_and_needs_two():
    a, b = _images([1.0, 2.0, 3.0]), _images([0.0, 1.0, 5.0, 7.0], start=1)  # shared: 1, 2
    d = rp.paired(a, b)
    assert d.n == 2 and d.mean == pytest.approx(((2 - 0) + (3 - 1)) / 2)
    with pytest.raises(ValueError, match="2 shared"):
        rp.paired(_images([1.0]), _images([1.0]))


@pytest.mark.parametrize(
    ("zs", "expect_negative", "want"),
    [
        ([-3.0, -5.0], True, "holds"),
        ([-3.0, -1.0], True, "inconclusive"),  # one within 2 s.e. of zero
        ([-3.0, 2.5], True, "does not hold"),  # one significantly the wrong way
        ([3.0, 4.0], False, "holds"),
        ([3.0, -2.1], False, "does not hold"),
        ([], True, "inconclusive"),
        ([-1.9, 1.9], True, "inconclusive"),
    ],
)
def test_verdict(zs, expect_negative, want):
    assert rp.verdict([rp.Paired(z * 0.01, 0.01, 100) for z in zs], expect_negative=expect_negative) == want


def _row(sde, w, ode, bound, vd=None, kid=None) -> rp.RowResult:
    r = rp.RowResult(rp.Row("digits", sde, w, 10, None), _images(ode), _images(bound), kid=kid)
    if vd is not None:
        r.ode_vd, r.bound_vd = _images(vd[0]), _images(vd[1])
    return r


def _synthetic(lw_is_shift: float, noise: float, seed: int = 0, vd_shift: float = -0.05) -> list[rp.RowResult]:
    """Rows built from one per-image base so pairing matters: original > likelihood > lw_is by ``lw_is_shift``."""
    rng = np.random.default_rng(seed)
    base = rng.normal(2.0, 0.3, 200)
    rows = []
    for sde in rp.SDES:
        for j, w in enumerate(rp.WEIGHTINGS):
            ode = base - j * lw_is_shift + rng.normal(0, noise, 200)
            bound = ode + 0.05 + rng.normal(0, noise, 200)  # bound above the NLL
            vd = (ode + vd_shift + rng.normal(0, noise, 200), bound + vd_shift + rng.normal(0, noise, 200))
            rows.append(_row(sde, w, ode, bound, vd, kid=(0.01 + 0.01 * (w == "lw_is"), 0.001)))
    return rows


def test_claims_hold_on_synthetic_rows_that_follow_the_paper():
    cs = {c.number: c for c in rp.claims(_synthetic(lw_is_shift=0.05, noise=0.01))}
    assert [cs[i].verdict for i in (1, 2, 3, 5)] == ["holds"] * 4
    assert cs[4].verdict.startswith("holds (NLL/bound); sample quality worse: holds")
    assert "digits/vp/uniform" in cs[3].evidence and "digits/subvp/variational" in cs[4].evidence


def test_claims_do_not_hold_when_the_data_say_the_opposite():
    # lw_is and likelihood worse than original, variational dequantization worse than uniform, bound below NLL
    rows = _synthetic(lw_is_shift=-0.05, noise=0.01, vd_shift=+0.05)
    for r in rows:
        r.bound = {i: v - 0.2 for i, v in r.ode.items()}
    cs = {c.number: c for c in rp.claims(rows)}
    assert cs[1].verdict == "does not hold"
    assert cs[3].verdict == "does not hold"
    assert cs[4].verdict.startswith("does not hold")
    assert cs[5].verdict == "does not hold"


def test_claims_are_inconclusive_within_the_noise():
    cs = {c.number: c for c in rp.claims(_synthetic(lw_is_shift=0.0005, noise=0.2, vd_shift=-0.0005))}
    assert cs[3].verdict == "inconclusive" and cs[5].verdict == "inconclusive"
    assert cs[4].verdict.startswith("inconclusive")


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    x, y, z = rng.random((400, 16)), rng.random((400, 16)), rng.random((400, 16)) ** 3
    same, se = rp.kid(x, y)
    diff, _ = rp.kid(x, z)
    assert abs(same) < 3 * se + 1e-3
    assert diff > 10 * se


def test_report_lists_every_claim_and_row(tmp_path):
    rows = _synthetic(lw_is_shift=0.05, noise=0.01)
    rows[0].loss_var = {"likelihood": 12.0, "lw_is": 0.5}
    cs = rp.claims(rows)
    path = rp.write_report(tmp_path / "r.md", rows, cs, command="make reproduce-small QUICK=1", wall_s=90.0,
                           budget=rp.QUICK, plots={"samples": "r/samples.png"})
    text = path.read_text()
    for c in cs:
        assert f"| {c.number} | {c.text} | **{c.verdict}** |" in text
    for r in rows:
        assert f"| {r.row.name} |" in text
    assert "12 / 0.5" in text and "![samples](r/samples.png)" in text
    assert "make reproduce-small QUICK=1" in text and "wall time 1.5 min from scratch" in text


def test_a_resumed_report_does_not_pass_its_invocation_off_as_the_cost(tmp_path):
    """A rerun that reused finished stages says so and reports the recorded stage times, not its own minutes."""
    rows = _synthetic(lw_is_shift=0.05, noise=0.01)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / rp.TIMINGS).write_text('{"stage": "a", "seconds": 600.0, "exit": 0}\n{"stage": "b", "seconds": 300.0, '
                                   '"exit": 0}\n')
    assert rp.stage_seconds(runs) == 900.0 and rp.stage_seconds(tmp_path / "none") == 0.0
    text = rp.write_report(tmp_path / "r.md", rows, rp.claims(rows), command="make reproduce-small", wall_s=60.0,
                           budget=rp.FULL, plots={}, resumed=True, stage_s=rp.stage_seconds(runs)).read_text()
    assert "this invocation took 1.0 min but resumed earlier ones" in text and "sum to 15.0 min" in text
    assert "from scratch" not in text


def test_the_runner_records_each_stage_time(tmp_path):
    log = tmp_path / "runs" / "row.log"
    rp._call([sys.executable, "-c", "pass"], log)
    rec = [json.loads(line) for line in (log.parent / rp.TIMINGS).read_text().splitlines()]
    assert len(rec) == 1 and rec[0]["stage"] == "row" and rec[0]["exit"] == 0 and rec[0]["seconds"] >= 0
    with pytest.raises(RuntimeError, match="exit 3"):
        rp._call([sys.executable, "-c", "raise SystemExit(3)"], log)
    assert json.loads((log.parent / rp.TIMINGS).read_text().splitlines()[-1])["exit"] == 3


def _finished(run: Path) -> None:
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"test/bpd_ode": 1.9}))


def test_resume_skips_finished_stages(tmp_path):
    row = rp.Row("digits", "vp", "lw_is", 10, 16)
    calls: list[list[str]] = []
    runner = lambda cmd, log: calls.append(cmd)  # noqa: E731
    _finished(tmp_path / "runs" / row.name)
    assert rp.do_row(row, tmp_path, rp.QUICK, runner=runner) == ["dequant", "samples"]
    assert "train_dequant.py" in calls[0][1] and "sample.py" in calls[1][1]
    _finished(tmp_path / "runs" / f"{row.name}_vd")
    (tmp_path / "runs" / f"{row.name}_samples").mkdir()
    (tmp_path / "runs" / f"{row.name}_samples" / "samples.npz").write_bytes(b"")
    calls.clear()
    assert rp.do_row(row, tmp_path, rp.QUICK, runner=runner) == [] and calls == []


def test_a_run_without_test_metrics_is_not_done(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    assert not rp.run_done(run)
    (run / "metrics.json").write_text(json.dumps({"val/bpd_bound": 2.0}))  # test=false or crashed before test
    assert not rp.run_done(run)
    (run / "metrics.json").write_text("{trunc")
    assert not rp.run_done(run)


def test_commands_pair_the_protocols():
    row = rp.Row("digits", "subvp", "original", 300, 100)
    t = rp.train_cmd(row, Path("/x/r"))
    assert {"sde=subvp", "weighting=original", "trainer.max_steps=300", "datamodule.test_subset=100",
            "hydra.run.dir=/x/r"} <= set(t)
    d = rp.dequant_cmd(row, Path("/x/v"), Path("/x/r"), 100)
    assert "score_ckpt=/x/r/checkpoints/last.ckpt" in d and "datamodule.test_subset=100" in d
    assert "module.evaluation.truncation_correction=false" in d  # the bound the uniform row reports
    assert len(rp.plan(rp.QUICK)) == 6 and len(rp.plan(rp.FULL)) == 8


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
    """The whole pipeline on tiny budgets (real train.py / train_dequant.py / sample.py), then resume does nothing."""
    out = tmp_path / "rep"
    cmd = [sys.executable, "-m", "scoreflow.tasks.reproduce", "--steps", "30", "--out", str(out)]
    first = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800).stdout
    assert first.count(" started (log ") == 18 and first.count(" done in ") == 18  # stdout is a pipe here
    text = (tmp_path / "rep.md").read_text()
    assert text.count("| **") == 5
    assert f"Command: `python -m scoreflow.tasks.reproduce --steps 30 --out {out}`" in text
    assert text.count(" | 30 | 16 | ") == 6  # each run's own train/steps, and its 16 test images
    other = subprocess.run([*cmd[:4], "31", *cmd[5:]], capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "holds runs of another budget (30 score steps" in other.stderr
    assert all((out / p).is_file() for p in ("samples.png", "bpd_vs_step.png", "loss_variance.png"))
    again = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    assert again.count("already done") == 6
    assert "from scratch" in text and "resumed earlier ones" in (tmp_path / "rep.md").read_text()
    assert len((out / "runs" / rp.TIMINGS).read_text().splitlines()) == 18  # 6 rows x 3 stages, none rerun


def test_the_mnist_pair_has_its_own_smaller_budget(tmp_path):
    """Full mode: the mnist5k rows validate twice, train a shorter flow and draw fewer samples (the 60-min budget)."""
    rows = {r.name: r for r in rp.plan(rp.FULL)}
    m = rows["mnist5k_vp_lw_is"]
    assert (m.steps, m.test_subset, m.validations, m.dequant_steps, m.num_samples) == (300, 100, 2, 150, 200)
    cmd = rp.train_cmd(m, tmp_path / "r")
    assert "val_every=150" in cmd and "module.evaluation.nll_every=150" in cmd
    assert "val_every=250" in rp.train_cmd(rows["digits_vp_original"], tmp_path / "d")
    calls: list[list[str]] = []
    _finished(tmp_path / "runs" / m.name)
    rp.do_row(m, tmp_path, rp.FULL, runner=lambda cmd, log: calls.append(cmd))
    assert "trainer.max_steps=150" in calls[0] and "num_samples=200" in calls[1]


def test_a_folder_of_another_budget_is_refused_and_the_budget_is_recorded(tmp_path, capsys):
    """The audit's case: ``--steps 5 --out <folder of 300-step runs>`` reported "Budget: 5 score steps" and rows
    "| 5 |" with the numbers of the 300-step runs."""
    out, five = tmp_path / "rep", rp.Budget(5, 16, 5, 40, 0)
    out.mkdir()
    assert rp.check_plan(out, rp.QUICK) is None and rp.check_plan(out, rp.QUICK) is None
    assert rp.Budget(**json.loads((out / rp.PLAN).read_text())["budget"]) == rp.QUICK
    why = rp.check_plan(out, five)
    assert why is not None and "300 score steps, 100 test images" in why and "this command's (5 score steps" in why
    assert f"--out {tmp_path / 'rep-steps5'}" in why
    assert rp.main(["--steps", "5", "--out", str(out)]) == 2  # refused before any stage runs
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} holds runs of another budget") and not (out / "runs").exists()

    old = tmp_path / "old"  # a folder of an earlier release: no plan.json, its finished runs say their budget
    _finished(old / "runs" / "digits_vp_original")
    (old / "runs" / "digits_vp_original" / "metrics.json").write_text(json.dumps({"test/bpd_ode": 1.9,
                                                                                 "train/steps": 300}))
    assert rp.main(["--steps", "5", "--out", str(old)]) == 2
    assert "digits_vp_original trained for 300 score steps" in capsys.readouterr().err
    assert not (old / rp.PLAN).exists()
    assert rp.check_plan(old, rp.Budget(300, 16, 100, 40, 0)) is None  # the same steps: recorded, goes on


def test_the_table_reads_each_runs_own_steps(tmp_path):
    row = rp.Row("digits", "vp", "original", 5, 16)
    run = tmp_path / "runs" / row.name
    _finished(run)
    (run / "metrics.json").write_text(json.dumps({"test/bpd_ode": 1.9, "train/steps": 300, "wall_time_s": 12.0}))
    np.savez(run / "test_per_example.npz", index=np.arange(3), bpd_ode=np.array([1.0, 2.0, 3.0]),
             bpd_bound=np.array([1.5, 2.5, 3.5]))
    (run / "loss_variance.json").write_text(json.dumps({"likelihood": 2.0, "lw_is": 0.1}))
    r = rp.collect(row, tmp_path, None, 17)
    assert r.steps == 300 and r.seconds == 12.0
    assert "| digits_vp_original | 300 (planned 5) | 3 |" in rp.row_table([r])
    r.row = rp.Row("digits", "vp", "original", 300, 16)
    assert "| digits_vp_original | 300 | 3 |" in rp.row_table([r])


def test_the_header_states_the_actual_command_jobs_and_cores(tmp_path):
    rows = _synthetic(lw_is_shift=0.05, noise=0.01)
    cmd = rp.command_line(["--steps", "5", "--out", "/tmp/my out"])
    assert cmd == "python -m scoreflow.tasks.reproduce --steps 5 --out '/tmp/my out'"
    text = rp.write_report(tmp_path / "r.md", rows, rp.claims(rows), command=cmd, wall_s=60.0, budget=rp.QUICK,
                           plots={}, jobs=3, cores=16).read_text()
    assert f"Command: `{cmd}` — wall time 1.0 min from scratch on this machine (16 cores, 3 rows at a time" in text
    assert "make reproduce-small" not in text and "2 cores" not in text and "two at a time" not in text
    text = rp.write_report(tmp_path / "r.md", rows, rp.claims(rows), command="python -m scoreflow.tasks.reproduce",
                           wall_s=60.0, budget=rp.FULL, plots={}, resumed=True, stage_s=600.0, jobs=1, cores=2,
                           by_make=True).read_text()
    assert "Command: `python -m scoreflow.tasks.reproduce` (run by `make`)" in text
    assert "this invocation: 2 cores, 1 row at a time" in text and "two at a time" not in text
    assert rp.available_cores() >= 1


def test_the_project_root_is_the_working_directory_when_it_holds_train_py(tmp_path, monkeypatch, capsys):
    here = tmp_path / "checkout"
    here.mkdir()
    monkeypatch.chdir(here)
    assert rp.project_root() == rp.ROOT  # no train.py here: the checkout the package was installed from
    (here / "train.py").write_text("")
    (here / "conf").mkdir()
    (here / "conf" / "train.yaml").write_text("")
    assert rp.project_root() == here
    row = rp.Row("digits", "vp", "original", 10, 16)
    assert rp.train_cmd(row, tmp_path / "r")[1] == str(here / "train.py")
    assert rp.dequant_cmd(row, tmp_path / "v", tmp_path / "r", 5)[1] == str(here / "train_dequant.py")
    assert rp.sample_cmd(tmp_path / "r", tmp_path / "s", 4)[1] == str(here / "sample.py")
    assert rp.default_out(quick=True) == here / "reports" / "reproduce-small-quick"
    log = tmp_path / "runs" / "cwd.log"
    rp._call([sys.executable, "-c", "import os; print('cwd', os.getcwd())"], log)
    assert f"cwd {here}" in log.read_text()  # the stages run in that root

    monkeypatch.chdir(tmp_path)  # neither here nor where the package came from: a clear refusal
    monkeypatch.setattr(rp, "ROOT", tmp_path / "site-packages")
    assert rp.main(["--steps", "5"]) == 2
    assert "error: no train.py in" in capsys.readouterr().err


def test_each_stage_prints_a_line_when_it_starts_and_ends(tmp_path, capsys):
    """A log file (stdout not a terminal) shows which row and stage is running, and since when."""
    import time

    row = rp.Row("digits", "vp", "lw_is", 10, 16)
    assert rp.do_row(row, tmp_path, rp.QUICK, runner=lambda cmd, log: None, t0=time.time() - 125) == \
        ["train", "dequant", "samples"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and all(line.startswith("[reproduce +2:0") for line in lines)
    assert f"digits_vp_lw_is: train started (log {tmp_path / 'runs' / 'digits_vp_lw_is.log'})" in lines[0]
    assert lines[1].endswith("digits_vp_lw_is: train done in 0:00") and "samples done in" in lines[5]

    def fails(cmd, log):
        if "train_dequant.py" in cmd[1]:
            raise RuntimeError("command failed with exit 1")

    _finished(tmp_path / "runs" / row.name)
    with pytest.raises(RuntimeError, match="exit 1"):
        rp.do_row(row, tmp_path, rp.QUICK, runner=fails)
    lines = capsys.readouterr().out.splitlines()
    assert "train finished earlier, reused" in lines[0] and "dequant started" in lines[1]
    assert "digits_vp_lw_is: dequant FAILED after 0:00" in lines[2] and len(lines) == 3
