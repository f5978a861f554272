"""``evaluate.py`` on several processes (two gloo processes on CPU) and the ODE solver check.

* 1 and 2 processes give bit-identical per-image values and the same ``metrics.json``, also when the
  2-process run resumes what a 1-process run started (and, in-process, when 3 ranks are followed by 2);
* the solver check re-solves with the same noise and probes at a 100x tighter tolerance, and its error
  shrinks with the tolerance.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scoreflow.tasks.checkpoint import load_model
from scoreflow.tasks.common import json_safe
from scoreflow.tasks.likelihood_eval import (
    LikelihoodSettings,
    PartialResults,
    is_complete,
    partial_files,
    run_likelihoods,
)
from scoreflow.tasks.train import train
from tests.integration import test_evaluate
from tests.integration.test_evaluate import ROOT, compose_train, run_eval

digits_ckpt = test_evaluate.digits_ckpt  # the tiny checkpoint fixture (4 training steps on digits)

# dopri5 at a loose tolerance: adaptive, so the ranks take different numbers of steps, and still quick;
# 7 images in batches of 2 -> 4 batches + 2 batches of the solver check on images 0..2
ARGS = ["evaluation.method=dopri5", "evaluation.rtol=1e-2", "evaluation.atol=1e-2", "evaluation.test_num_t=4",
        "num_images=7", "batch_size=2", "solver_check_images=3", "progress=false"]


def counts(folder: Path) -> dict[tuple[str, int, int], int]:
    """How often each (quantity, image, repeat) appears over every process's partial file."""
    out: dict[tuple[str, int, int], int] = {}
    for path in partial_files(folder):
        for line in path.read_text().splitlines()[1:]:
            rec = json.loads(line)
            for i in rec["i"]:
                out[(rec["q"], i, rec["r"])] = out.get((rec["q"], i, rec["r"]), 0) + 1
    return out


def test_two_processes_give_the_values_of_one(digits_ckpt, make_cfg, tmp_path):
    one = run_eval(make_cfg, digits_ckpt, [*ARGS, "accelerator=cpu"], sub="one")
    # one process does one batch, then two processes finish the job in the same folder
    part = run_eval(make_cfg, digits_ckpt, [*ARGS, "accelerator=cpu", "max_batches=1"], sub="two")
    assert part["complete"] is False and len(counts(tmp_path / "two")) == 2 * 2  # ODE + bound of images 0, 1
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={digits_ckpt}", *ARGS, "accelerator=cpu",
           "devices=2", f"hydra.run.dir={tmp_path / 'two'}"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 processes (cpu)" in proc.stdout and proc.stdout.count("== test split") == 1  # rank 0 prints

    two = tmp_path / "two"
    rank1 = [json.loads(line) for line in (two / "partial.rank1.jsonl").read_text().splitlines()[1:]]
    assert {r["q"] for r in rank1} >= {"bpd_ode", "bpd_bound"}  # rank 1 did its share
    c = counts(two)
    assert set(c.values()) == {1} and len(c) == 2 * 7 + 3  # every (image, repeat) once, + the check of 3 images

    a, b = np.load(tmp_path / "one" / "per_example.npz"), np.load(two / "per_example.npz")
    assert set(a.files) == set(b.files) >= {"index", "bpd_ode", "bpd_bound", "nfe", "bpd_ode_tight"}
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key])  # bit for bit: the same batches on 1 and 2 ranks
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert mb["num_processes"] == 2 and mb["complete"] is True and ma == json_safe(one)  # non-finite: null
    for m in (ma, mb):
        del m["wall_time_s"], m["num_processes"], m["protocol"]["checkpoint"]
    assert ma == mb


@pytest.mark.slow  # two evaluate.py runs on 2 processes: about a minute on 2 busy cores
def test_sigterm_to_the_launching_process_stops_both_and_the_same_command_finishes(digits_ckpt, tmp_path):
    """``kill`` of the command (rank 0, which launched rank 1 through Lightning Fabric) reaches rank 1 too: both
    stop, the command prints one line and exits 143. Before, rank 0 died alone and rank 1 ran on, orphaned."""
    from tests.integration.test_evaluate import RK4, _eval_until_signal

    folder = tmp_path / "two"
    rk4 = [a for a in RK4 if a != "device=cpu"]
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={digits_ckpt}", *rk4, "num_images=24",
           "batch_size=2", "evaluation.test_num_t=8", "accelerator=cpu", "devices=2", f"hydra.run.dir={folder}"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    stopped = _eval_until_signal(cmd, folder, signal.SIGTERM, env)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    lines = [ln for ln in stopped.stderr.splitlines() if ln.startswith("scoreflow: ")]
    assert lines == [f"scoreflow: SIGTERM during the evaluation: stopped; the finished batches are kept in {folder}; "
                     "the same command again continues (exit code 143)"], stopped.stderr[-3000:]
    rank1 = folder / "partial.rank1.jsonl"
    time.sleep(2)
    size = rank1.stat().st_size if rank1.is_file() else 0
    time.sleep(8)  # rank 1 has stopped: its file no longer grows
    assert (rank1.stat().st_size if rank1.is_file() else 0) == size
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    c = counts(folder)
    assert set(c.values()) == {1} and len(c) == 2 * 24


def test_resume_with_another_number_of_processes(digits_ckpt, make_cfg, tmp_path):
    """Ranks simulated in one process: 3 ranks stop after one batch each, then 2 ranks finish."""
    cfg = make_cfg([f"ckpt_path={digits_ckpt}", "device=cpu", "evaluation.method=rk4", "evaluation.steps=1",
                    "evaluation.test_num_t=4"],
                   config_name="evaluate")
    lm = load_model(cfg)
    data = lm.source.load()["test"]
    s = LikelihoodSettings(ode=True, bound=True, repeats=2, batch_size=3, seed=0)
    n, fp = 10, {"test": 1}  # 4 batches x 2 repeats = 8 units

    def run(folder: Path, world: int, max_batches: int | None) -> None:
        s.max_batches = max_batches
        stores = [PartialResults(folder, fp, rank=k) for k in range(world)]  # all read before any writes
        for k, store in enumerate(stores):
            run_likelihoods(lm.module, data, n, store, s, rank=k, world_size=world)

    run(tmp_path / "mixed", 3, 1)
    assert len(partial_files(tmp_path / "mixed")) == 3 and len(counts(tmp_path / "mixed")) == 2 * 3 * 3
    assert not is_complete(PartialResults(tmp_path / "mixed", fp), n, s)
    run(tmp_path / "mixed", 2, None)
    run(tmp_path / "single", 1, None)
    c = counts(tmp_path / "mixed")
    assert set(c.values()) == {1} and len(c) == 2 * n * 2
    merged, single = PartialResults(tmp_path / "mixed", fp), PartialResults(tmp_path / "single", fp)
    assert is_complete(merged, n, s)
    for q in ("bpd_ode", "bpd_bound"):
        np.testing.assert_array_equal(merged.table(q, n, 2), single.table(q, n, 2))


def test_torn_line_of_another_rank_is_ignored_not_truncated(tmp_path):
    import torch

    fp = {"test": 1}
    PartialResults(tmp_path, fp, rank=1).append("bpd_bound", 0, [0, 1], torch.tensor([1.0, 2.0]))
    f = tmp_path / "partial.rank1.jsonl"
    with open(f, "a") as fh:
        fh.write('{"q": "bpd_bound", "r": 0, "i": [2], "v": [3.0')  # killed mid-write
    text = f.read_text()
    r0 = PartialResults(tmp_path, fp, rank=0)
    assert r0.done("bpd_bound", 1, 0) and not r0.done("bpd_bound", 2, 0) and f.read_text() == text
    assert not (tmp_path / "partial.jsonl").exists()  # a process that wrote nothing leaves no file
    PartialResults(tmp_path, fp, rank=1)
    assert f.read_text() == text[: text.rfind("\n") + 1]  # the owner drops its torn tail before appending
    with pytest.raises(Exception, match="holds values of other settings"):
        PartialResults(tmp_path, {"test": 2}, rank=0)


@pytest.fixture(scope="module")
def toy_ckpt(tmp_path_factory) -> Path:
    """An MLP on 2-D data: an ODE solve at rtol=1e-8 costs seconds here (minutes on the digits network)."""
    run = tmp_path_factory.mktemp("toy_run")
    train(compose_train(["experiment=toy2d", "debug=fast", "trainer.accelerator=cpu", "test=false", "val_every=4",
                         "trainer.max_steps=4", "callbacks=minimal", "+trainer.enable_progress_bar=false"], run))
    return run / "checkpoints" / "last.ckpt"


def test_solver_check_is_the_tighter_solve_and_shrinks_with_the_tolerance(toy_ckpt, make_cfg, tmp_path, capsys):
    base = ["num_images=3", "batch_size=3", "solver_check_images=3", "bound=false", "progress=false", "device=cpu",
            "evaluation.method=dopri5"]

    def run(tol: float, *extra: str) -> tuple[dict, np.lib.npyio.NpzFile]:
        m = run_eval(make_cfg, toy_ckpt, [*base, f"evaluation.rtol={tol}", f"evaluation.atol={tol}", *extra],
                     sub=f"tol{tol}{''.join(extra)}")
        return m, np.load(tmp_path / f"tol{tol}{''.join(extra)}" / "per_example.npz")

    loose, lo = run(1e-2)
    table = capsys.readouterr().out
    _, mid = run(1e-4, "solver_check_images=0")
    tight, ti = run(1e-6)
    # the check of the 1e-2 run is the 1e-4 solve of the same images, noise and probes, bit for bit
    np.testing.assert_array_equal(lo["bpd_ode_tight"], mid["bpd_ode"][:, 0])
    err_lo, err_ti = (np.abs(x["bpd_ode"][:, 0] - x["bpd_ode_tight"]) for x in (lo, ti))
    assert loose["test/ode_solver_error_max"] == err_lo.max() and loose["test/ode_solver_error_mean"] == err_lo.mean()
    assert tight["test/ode_solver_error_max"] == err_ti.max() and tight["test/ode_solver_error_num_images"] == 3
    assert err_lo.max() > 30 * err_ti.max() and err_ti.max() < 1e-4  # ~0 once the tolerance is tight
    line = next(x for x in table.splitlines() if "solver error (ODE)" in x)
    assert line.split("solver error (ODE)")[1].split()[:2] == ["≤", f"{err_lo.max():.1e}"]
    assert "max |Δ| over 3 images vs dopri5 rtol=0.0001 atol=0.0001" in line
    assert "bpd_ode_tight" not in mid.files and not any("solver_error" in k for k in _)
    # a fixed grid has no error control: its check is dopri5 at the 100x tighter tolerance, here the 1e-4 solve
    fixed, fx = run(1e-2, "evaluation.method=rk4", "evaluation.steps=3")
    np.testing.assert_array_equal(fx["bpd_ode_tight"], mid["bpd_ode"][:, 0])
    assert fixed["test/ode_solver_error_max"] == np.abs(fx["bpd_ode"][:, 0] - fx["bpd_ode_tight"]).max() > 0
    assert fixed["protocol"]["solver_check"] == {"num_images": 3, "method": "dopri5", "rtol": 1e-4, "atol": 1e-4}
    assert fixed["test/nfe"] == 12 and "ODE rk4 steps=3 grid_rho=3" in fixed["protocol_text"]
