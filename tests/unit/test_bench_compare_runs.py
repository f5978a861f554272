"""``bench/compare_runs.py``: per-run means and paired differences against the first run, from the runs' own
per-image files, and a clear message (not a traceback) when a run folder has none; runs on other data or splits are
refused, another evaluation seed or protocol is flagged; the writers record what they evaluated."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scoreflow.tasks.reproduce import per_image

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "compare_runs.py"
DIGITS = {"_target_": "scoreflow.data.digits.Digits", "shape": [1, 8, 8], "num_levels": 17, "val_size": 100,
          "test_size": 400, "seed": 0, "hflip": False}
CIFAR = {"_target_": "scoreflow.data.cifar.CIFAR10", "shape": [3, 32, 32], "num_levels": 256, "val_size": 1000,
         "seed": 0, "hflip": True}
PROTOCOL = "eps=sde default, dequantization=UniformDequantizer, ODE rk4 50 steps rademacher float64, repeats=1"


def write_run(folder: Path, ode, bound, name="test_per_example.npz", index=None, meta=None) -> Path:
    folder.mkdir(parents=True)
    ode = np.asarray(ode, dtype=np.float64)
    arrays = {"index": np.arange(len(ode)) if index is None else np.asarray(index), "bpd_ode": ode[:, None]}
    if bound is not None:
        arrays["bpd_bound"] = np.asarray(bound, dtype=np.float64)[:, None]
    if meta is not None:
        arrays["meta"] = np.asarray(json.dumps(meta))
    np.savez(folder / name, **arrays)
    return folder


def meta(data=None, split="test", seed=0, protocol=PROTOCOL) -> dict:
    return {"data": DIGITS if data is None else data, "split": split, "seed": seed, "protocol": protocol}


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def compare(capsys, monkeypatch):
    """The script's ``main`` in this process (no interpreter start per call): ``(returncode, stdout, stderr)``."""
    spec = importlib.util.spec_from_file_location("compare_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "compare_runs", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)

    def _run(*args):
        rc = module.main([str(a) for a in args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)

    return _run


def test_paired_differences_match_a_hand_computation(tmp_path):
    rng = np.random.default_rng(0)
    base_ode, base_bound = 1.7 + 0.1 * rng.standard_normal(50), 1.8 + 0.1 * rng.standard_normal(50)
    shift = 0.01 + 0.002 * rng.standard_normal(50)
    a = write_run(tmp_path / "a", base_ode, base_bound)
    b = write_run(tmp_path / "b", base_ode + shift, base_bound - shift)
    r = run(a, b)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and str(b) in lines[2]
    d, se = shift.mean(), shift.std(ddof=1) / np.sqrt(50)
    assert f"ODE {d:+.4f} ± {se:.4f}" in lines[2] and f"bound {-d:+.4f} ± {se:.4f}" in lines[2]
    assert f"{base_ode.mean():.4f} ± {base_ode.std(ddof=1) / np.sqrt(50):.4f}" in lines[1]


def test_only_shared_images_are_paired_and_a_missing_quantity_is_skipped(tmp_path):
    a = write_run(tmp_path / "a", [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    b = write_run(tmp_path / "b", [1.5, 2.5, 3.5], None, name="per_example.npz", index=[1, 2, 3])
    b_as_test = write_run(tmp_path / "c", [2.5, 3.5, 4.5], None, index=[1, 2, 3])
    r = run(a, b_as_test)
    assert r.returncode == 0, r.stderr
    assert "ODE +0.5000 ± 0.0000" in r.stdout and "n = 3" in r.stdout and "bound" not in r.stdout.splitlines()[2]
    r = run("--file", "per_example.npz", b, b)
    assert r.returncode == 0 and "ODE +0.0000" in r.stdout


def test_a_run_without_results_is_named_without_a_traceback(tmp_path):
    a = write_run(tmp_path / "a", [1.0, 2.0], [1.0, 1.0])
    r = run(a, tmp_path / "unfinished")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert f"no per-image results at {tmp_path / 'unfinished' / 'test_per_example.npz'}" in r.stderr


def test_runs_on_other_data_or_another_split_are_refused_naming_both(tmp_path, compare):
    """The audit's case: a digits run and a CIFAR run paired image by image (z = -20 of nothing)."""
    a = write_run(tmp_path / "digits", [1.0, 2.0, 3.0], [1.1, 2.1, 3.1], meta=meta())
    b = write_run(tmp_path / "cifar", [3.0, 3.5, 4.0], [3.1, 3.6, 4.1], meta=meta(CIFAR))
    r = compare(a, b)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert f"error: {b} cannot be paired with the base {a}: different data: Digits vs CIFAR10" in r.stderr
    assert "num_levels 17 vs 256" in r.stderr
    v = write_run(tmp_path / "val", [1.0, 2.0, 3.0], None, meta=meta(split="val"))
    r = compare(a, v, "--file", "test_per_example.npz")
    assert r.returncode == 2 and "different splits: test vs val" in r.stderr
    # where the files are, or a training-only flip, is not other data
    moved = write_run(tmp_path / "moved", [1.5, 2.5, 3.5], None, meta=meta({**DIGITS, "root": "/x", "hflip": True}))
    assert compare(a, moved).returncode == 0


def test_another_seed_or_protocol_is_paired_with_a_warning_and_refused_when_strict(tmp_path, compare):
    a = write_run(tmp_path / "a", [1.0, 2.0, 3.0], [1.1, 2.1, 3.1], meta=meta())
    b = write_run(tmp_path / "b", [1.5, 2.5, 3.5], [1.6, 2.6, 3.6],
                  meta=meta(seed=1, protocol=PROTOCOL.replace("rk4 50 steps", "dopri5 rtol=1e-05 atol=1e-05")))
    r = compare(a, b)
    assert r.returncode == 0, r.stderr
    assert f"warning: {b} vs the base {a}: evaluation seed 0 vs 1" in r.stderr
    assert "protocol: 'ODE rk4 50 steps rademacher float64' vs 'ODE dopri5 rtol=1e-05" in r.stderr
    row = r.stdout.splitlines()[2]
    assert "ODE +0.5000" in row and row.endswith("[not like with like: evaluation seed, protocol]")
    r = compare(a, b, "--strict")
    assert r.returncode == 2 and r.stdout == "" and "evaluation seed 0 vs 1" in r.stderr
    same = write_run(tmp_path / "same", [1.5, 2.5, 3.5], None, meta=meta())
    r = compare("--strict", a, same)
    assert r.returncode == 0 and r.stderr == "" and "[" not in r.stdout.splitlines()[2]


def test_files_without_meta_are_identified_from_their_run_folders(tmp_path, compare):
    """Files of earlier releases: train.py's metrics.json protocol line + .hydra/config.yaml, or evaluate.py's
    metrics.json protocol entry; with neither, the pairing says it could not check."""
    import yaml

    def train_run(name, data, seed=0):
        folder = write_run(tmp_path / name, [1.0, 2.0, 3.0], None)
        (folder / "metrics.json").write_text(json.dumps({"test/bpd_ode": 2.0, "protocol": PROTOCOL}))
        (folder / ".hydra").mkdir()
        cfg = {"data": {**data, "root": "${oc.env:SCOREFLOW_DATA_DIR,data}/x"},
               "module": {"evaluation": {"seed": seed}}}
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
        return folder

    digits, cifar, seed1 = train_run("d", DIGITS), train_run("c", CIFAR), train_run("s", DIGITS, seed=1)
    r = compare(digits, cifar)
    assert r.returncode == 2 and "different data: Digits vs CIFAR10" in r.stderr
    r = compare(digits, seed1)
    assert r.returncode == 0 and "evaluation seed 0 vs 1" in r.stderr and "protocol" not in r.stderr

    def eval_run(name, split):
        folder = write_run(tmp_path / name, [1.0, 2.0, 3.0], None, name="per_example.npz")
        proto = {"data": DIGITS, "split": split, "seed": 0, "eps": 1e-5, "dequantization": "UniformDequantizer",
                 "ode": {"method": "rk4"}, "bound": {"num_t": 50}, "repeats": 1, "checkpoint": f"/{name}.ckpt"}
        (folder / "metrics.json").write_text(json.dumps({"protocol": proto}))
        return folder

    r = compare("--file", "per_example.npz", "--strict", eval_run("ev_test", "test"), eval_run("ev_test2", "test"))
    assert r.returncode == 0 and r.stderr == ""  # another checkpoint, the same protocol
    r = compare("--file", "per_example.npz", eval_run("ev_val", "val"), tmp_path / "ev_test")
    assert r.returncode == 2 and "different splits: val vs test" in r.stderr

    bare = write_run(tmp_path / "bare", [1.0, 2.0, 3.0], None)
    r = compare(digits, bare)
    assert r.returncode == 0 and r.stdout.splitlines()[2].endswith("[unchecked: data, evaluation seed, protocol]")
    assert f"warning: cannot check that {bare} evaluated the same data, evaluation seed, protocol" in r.stderr
    assert compare(digits, bare, "--strict").returncode == 2


def test_the_writers_record_what_they_evaluated_and_old_readers_still_load(tmp_path):
    """evaluate.py's per_example.npz and the training test phase's test_per_example.npz carry ``meta``; a file
    with it still loads where per-image files are read (reproduce.per_image)."""
    from scoreflow.tasks.likelihood_eval import PartialResults, per_example_meta, save_per_example

    fp = {"checkpoint": "/r/last.ckpt", "step": 10, "weights": "EMA", "weights_digest": "x", "data": DIGITS,
          "split": "test", "seed": 3, "eps": 1e-5, "dequantization": "UniformDequantizer",
          "ode": {"method": "rk4", "steps": 50}, "bound": {"num_t": 50}}
    store = PartialResults(tmp_path / "ev", fp)
    store._add({"q": "bpd_ode", "r": 0, "i": [0, 1, 2], "v": [1.0, 2.0, 3.0], "nfe": 200})
    store._add({"q": "bpd_bound", "r": 0, "i": [0, 1, 2], "v": [1.5, 2.5, 3.5], "se": [0.1, 0.1, 0.1]})
    save_per_example(tmp_path / "ev" / "per_example.npz", store, 3, 1, ["bpd_ode", "bpd_bound"])
    with np.load(tmp_path / "ev" / "per_example.npz") as z:  # no pickles: a plain string
        written = json.loads(z["meta"].item())
    assert written == per_example_meta({**fp, "repeats": 1, "num_images": 3}, 1)  # = from its metrics.json
    assert written["split"] == "test" and written["seed"] == 3 and written["protocol"]["repeats"] == 1
    assert "checkpoint" not in written["protocol"]
    assert per_image(tmp_path / "ev", "per_example.npz") == ({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.5, 1: 2.5, 2: 3.5})

    from scoreflow.lit.per_image import protocol_of
    from scoreflow.tasks.build import build_module
    from tests.integration.conftest import compose_cfg

    cfg = compose_cfg(["data=digits", "module.evaluation.seed=7"], tmp_path / "run")
    module = build_module(cfg)
    m = module.test_meta()
    assert m == {"data": DIGITS, "split": "test", "seed": 7, "protocol": {**protocol_of(module), "repeats": 1}}
    assert set(m["protocol"]) == set(written["protocol"])  # the keys evaluate.py's meta has


def test_runs_over_other_images_are_named_and_a_quantity_not_evaluated_is_a_dash(tmp_path, compare):
    """Audit: 32 images against 48 printed two means over different images side by side, without a word; a bound
    not evaluated (ode=false's counterpart) printed "nan ± nan"."""
    a = write_run(tmp_path / "a", [1.0, 2.0, 3.0, 4.0], None)
    b = write_run(tmp_path / "b", [1.5, 2.5, 3.5], None, index=[0, 1, 2])
    r = compare(a, b)
    assert r.returncode == 0
    assert f"warning: {b} holds 3 images for the ODE, the base {a} 4" in r.stderr and "the 3 both hold" in r.stderr
    assert "nan" not in r.stdout and r.stdout.splitlines()[1].split()[-1] == "-"
