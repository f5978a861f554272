"""``make reproduce-small``: the five observations of ScoreFlow §5.3 tested at CPU scale on the embedded data.

``python -m scoreflow.tasks.reproduce [--quick] [--steps N] [--out DIR] [--jobs 2]`` trains the grid
{VP, subVP} × {original, likelihood, lw_is} on ``digits`` (``train.py`` in a subprocess, one thread each, ``--jobs``
rows at a time), trains a variational dequantizer after each score model (``train_dequant.py``), draws samples
(``sample.py``, probability-flow ODE, per-sample seeds) and writes ``DIR.md`` with the claims table and PNG plots.
``train.py``, ``train_dequant.py``, ``sample.py`` and ``conf/`` are those of the current directory when it holds
``train.py`` and ``conf/train.yaml`` (a project checkout), else those of the checkout the package was installed from
(:func:`project_root`); the default ``DIR`` is ``reports/reproduce-small[-quick]`` under that root. Every stage of
every row prints a line (flushed) when it starts and ends, so a log file shows the progress.

Every row is evaluated by the one evaluation path (``lit/per_image.py``) on the same test images with the same
per-image seeds, so rows are compared **per image**: ``d_i = a_i - b_i``, reported as ``mean(d) ± sd(d)/sqrt(n)``.
A claim *holds* when every comparison it makes points its way by more than ``Z_SIGNIFICANT`` standard errors, *does
not hold* when one points the other way by more than that, and is *inconclusive* otherwise.

Resumable: a run folder whose ``metrics.json`` holds the test metrics (and a sample folder with ``samples.npz``) is
not redone; an interrupted ``train.py`` resumes from its own ``checkpoints/last.ckpt`` (``auto_resume``). The budget
is written to ``DIR/plan.json`` at the start, and a rerun with another budget (``--quick``, ``--steps``) into a folder
of runs of another budget is refused: give it another ``--out``. The report's steps are those of each run's
``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

Z_SIGNIFICANT = 2.0  # |paired mean| / s.e. below this: inconclusive
SDES = ("vp", "subvp")
WEIGHTINGS = ("original", "likelihood", "lw_is")
ROOT = Path(__file__).resolve().parents[3]  # the checkout the package was installed from (an editable install)


def project_root() -> Path:
    """Where ``train.py``, ``train_dequant.py``, ``sample.py`` and ``conf/`` are taken from (and the commands run):
    the current working directory when it holds ``train.py`` and ``conf/train.yaml`` (the project root of the
    checkout the user works in), else :data:`ROOT`, the checkout the package was installed from."""
    cwd = Path.cwd()
    return cwd if (cwd / "train.py").is_file() and (cwd / "conf" / "train.yaml").is_file() else ROOT


def default_out(quick: bool, root: Path | None = None) -> Path:
    """``reports/reproduce-small[-quick]`` under the project root."""
    return (root or project_root()) / "reports" / ("reproduce-small-quick" if quick else "reproduce-small")


# ---------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Budget:
    steps: int  # score-model training steps (the previous default run: 1500 at lr 2e-3)
    test_subset: int | None  # test images evaluated (None: the whole split)
    dequant_steps: int  # variational-dequantization steps after the score model
    num_samples: int  # samples per row for the sample-quality number
    mnist_steps: int = 0  # 0: no mnist5k pair
    mnist_test_subset: int | None = 100
    mnist_dequant_steps: int = 150
    mnist_num_samples: int = 200


# The full mode is meant to fit 60 min on 2 cores: the six digits rows took 22 min from scratch (two at a time: per
# pair 250 s of score training and test, 165 s of flow, 30 s of samples); the mnist5k pair gets the rest (a 28x28
# training step ~1.5 s on one thread, so 300 steps, 2 validations, 100 test images, 150 flow steps).
FULL = Budget(steps=1500, test_subset=None, dequant_steps=500, num_samples=400, mnist_steps=300)
QUICK = Budget(steps=300, test_subset=100, dequant_steps=100, num_samples=200)


@dataclass(frozen=True)
class Row:
    data: str
    sde: str
    weighting: str
    steps: int
    test_subset: int | None
    validations: int = 6  # validation bound + ODE bits/dim this many times in the run (the bits/dim-vs-steps plot)
    dequant_steps: int | None = None  # None: the budget's
    num_samples: int | None = None  # None: the budget's

    @property
    def name(self) -> str:
        return f"{self.data}_{self.sde}_{self.weighting}"


def plan(budget: Budget) -> list[Row]:
    rows = [Row("digits", s, w, budget.steps, budget.test_subset) for s in SDES for w in WEIGHTINGS]
    if budget.mnist_steps:
        rows += [Row("mnist5k", "vp", w, budget.mnist_steps, budget.mnist_test_subset, validations=2,
                     dequant_steps=budget.mnist_dequant_steps, num_samples=budget.mnist_num_samples)
                 for w in ("original", "lw_is")]
    return rows


def _common(row: Row) -> list[str]:
    sub = "null" if row.test_subset is None else str(row.test_subset)
    return [f"datamodule.test_subset={sub}", "logger=csv"]


def train_cmd(row: Row, run: Path) -> list[str]:
    every = max(row.steps // row.validations, 25)
    return [sys.executable, str(project_root() / "train.py"), f"data={row.data}", f"sde={row.sde}",
            f"weighting={row.weighting}",
            f"trainer.max_steps={row.steps}", "module.optim.lr=2e-3",  # this report's budget: the former default run
            f"val_every={every}", f"module.evaluation.nll_every={every}",
            "module.evaluation.nll_subset=32", f"checkpoint_every={every}", f"sample_every={row.steps}",
            # the ODE protocol its rows were measured with, pinned against later default changes (flows inherit it)
            "module.evaluation.method=rk4", "module.evaluation.steps=50",
            "trainer.log_every_n_steps=5", "extras.print_config=false", *_common(row), f"hydra.run.dir={run}"]


def dequant_cmd(row: Row, run: Path, score_run: Path, steps: int) -> list[str]:
    # the same bound protocol as the uniform row (no ε-correction in the reported bound), so rows pair
    return [sys.executable, str(project_root() / "train_dequant.py"),
            f"score_ckpt={score_run / 'checkpoints' / 'last.ckpt'}",
            f"trainer.max_steps={steps}", f"val_every={max(steps // 2, 10)}", f"checkpoint_every={steps}",
            "trainer.log_every_n_steps=5", "module.evaluation.truncation_correction=false",
            *_common(row), f"hydra.run.dir={run}"]


def sample_cmd(run: Path, out: Path, n: int) -> list[str]:
    # probability-flow ODE, RK4 50 steps (200 NFE), sample i from seed i: the training run's sample grid settings
    return [sys.executable, str(project_root() / "sample.py"), f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
            "sampler=ode",
            "sampler.method=rk4", "sampler.steps=50", f"num_samples={n}", "batch_size=200", "progress=false",
            f"hydra.run.dir={out}"]


def run_done(run: Path) -> bool:
    """A run folder is finished when its ``metrics.json`` holds the test ODE bits/dim."""
    f = run / "metrics.json"
    if not f.is_file():
        return False
    try:
        return "test/bpd_ode" in json.loads(f.read_text())
    except (json.JSONDecodeError, OSError):
        return False


def samples_done(folder: Path) -> bool:
    return (folder / "samples.npz").is_file()


def _call(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=project_root(), env=env, stdout=f, stderr=subprocess.STDOUT)
    with (log.parent / TIMINGS).open("a") as f:  # every stage's own wall time, over all invocations
        f.write(json.dumps({"stage": log.stem, "seconds": round(time.time() - t0, 1), "exit": rc}) + "\n")
    if rc != 0:
        raise RuntimeError(f"command failed with exit {rc} (log: {log}): {' '.join(cmd)}")


TIMINGS = "timings.jsonl"


def stage_seconds(runs: Path) -> float:
    """Sum of the recorded stage wall times (``runs/timings.jsonl``), over every invocation."""
    f = runs / TIMINGS
    if not f.is_file():
        return 0.0
    return sum(json.loads(line)["seconds"] for line in f.read_text().splitlines() if line.strip())


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def progress(t0: float, text: str) -> None:
    """One flushed console line ``[reproduce +M:SS] text`` (``M:SS`` since ``t0``): a log file shows progress."""
    print(f"[reproduce +{_minutes(time.time() - t0)}] {text}", flush=True)


def do_row(row: Row, out: Path, budget: Budget, runner=_call, t0: float | None = None) -> list[str]:
    """Train, dequantize, sample one row, skipping each finished stage, with a :func:`progress` line when each
    stage starts and ends (``t0``: the start of the whole command; default now). Returns the stages run."""
    t0 = time.time() if t0 is None else t0
    done: list[str] = []
    runs = out / "runs"
    score, vd, smp = runs / row.name, runs / f"{row.name}_vd", runs / f"{row.name}_samples"
    stages = [
        ("train", run_done(score), lambda: train_cmd(row, score), runs / f"{row.name}.log"),
        ("dequant", run_done(vd), lambda: dequant_cmd(row, vd, score, row.dequant_steps or budget.dequant_steps),
         runs / f"{row.name}_vd.log"),
        ("samples", samples_done(smp), lambda: sample_cmd(score, smp, row.num_samples or budget.num_samples),
         runs / f"{row.name}_samples.log"),
    ]
    for stage, finished, cmd, log in stages:
        if finished:
            progress(t0, f"{row.name}: {stage} finished earlier, reused")
            continue
        progress(t0, f"{row.name}: {stage} started (log {log})")
        start = time.time()
        try:
            runner(cmd(), log)
        except Exception:
            progress(t0, f"{row.name}: {stage} FAILED after {_minutes(time.time() - start)}")
            raise
        progress(t0, f"{row.name}: {stage} done in {_minutes(time.time() - start)}")
        done.append(stage)
    return done


PLAN = "plan.json"


def describe(b: Budget) -> str:
    text = (f"{b.steps} score steps, {'all' if b.test_subset is None else b.test_subset} test images, "
            f"{b.dequant_steps} flow steps, {b.num_samples} samples")
    return text + (f", mnist5k pair at {b.mnist_steps} steps" if b.mnist_steps else "")


def _metrics(run: Path) -> dict:
    try:
        value = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_plan(out: Path, budget: Budget) -> str | None:
    """Record ``budget`` in ``out/plan.json``, or refuse a folder of runs made with another budget: its rows would be
    reused and reported under this budget. Returns the reason to refuse (``None``: go on). A folder of an earlier
    release (no ``plan.json``) is judged by its finished score runs: ``train/steps`` and their test images."""
    where = out / PLAN
    advice = (f"Rerun with the budget that folder was made with, or give another --out (e.g. --out "
              f"{out.parent / f'{out.name}-steps{budget.steps}'}).")
    if where.is_file():
        try:
            stored = Budget(**json.loads(where.read_text())["budget"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{where} is unreadable ({e}): cannot tell which budget the runs in {out} have. {advice}"
        if stored != budget:
            return (f"{out} holds runs of another budget ({describe(stored)}) than this command's "
                    f"({describe(budget)}). {advice}")
        return None
    for row in plan(budget):
        run = out / "runs" / row.name
        if not run_done(run):
            continue
        steps, n = _metrics(run).get("train/steps"), None
        if (run / "test_per_example.npz").is_file():
            with np.load(run / "test_per_example.npz") as z:
                n = len(z["index"])
        if (isinstance(steps, (int, float)) and int(steps) != row.steps) or \
                (row.test_subset is not None and n is not None and n != row.test_subset):
            return (f"{out} holds {row.name} trained for {steps} score steps ({n} test images), but this command's "
                    f"budget is {describe(budget)}. {advice}")
    where.write_text(json.dumps({"budget": asdict(budget), "rows": [r.name for r in plan(budget)]}, indent=2))
    return None


# ---------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Paired:
    """``mean(a_i - b_i) ± s.e.`` over ``n`` shared images."""

    mean: float
    se: float
    n: int

    @property
    def z(self) -> float:
        return self.mean / self.se if self.se > 0 else (math.inf if self.mean else 0.0) * (1 if self.mean >= 0 else -1)

    def text(self, unit: str = "") -> str:
        return f"{self.mean:+.4f} ± {self.se:.4f}{unit} (z = {self.z:+.1f}, n = {self.n})"


def paired(a: dict[int, float], b: dict[int, float]) -> Paired:
    """Per-image differences ``a - b`` over the images both hold (dicts image index -> value)."""
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        raise ValueError(f"paired comparison needs >= 2 shared images, got {len(common)}")
    d = np.array([a[i] - b[i] for i in common], dtype=np.float64)
    return Paired(float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size)), int(d.size))


def mean_se(v: dict[int, float]) -> tuple[float, float]:
    """Mean ± standard error over images (:func:`scoreflow.likelihood.mean_and_se`: NaN for one image)."""
    from scoreflow.likelihood import mean_and_se

    return mean_and_se(list(v.values()))


def verdict(diffs: list[Paired], expect_negative: bool = True, z: float = Z_SIGNIFICANT) -> str:
    """``holds`` if every difference has the expected sign beyond ``z`` s.e.; ``does not hold`` if any has the
    opposite sign beyond ``z`` s.e.; otherwise (or with nothing to compare) ``inconclusive``."""
    if not diffs:
        return "inconclusive"
    s = -1.0 if expect_negative else 1.0
    zs = [s * d.z for d in diffs]
    if any(v < -z for v in zs):
        return "does not hold"
    if all(v > z for v in zs):
        return "holds"
    return "inconclusive"


def combine(verdicts: list[str]) -> str:
    if "does not hold" in verdicts:
        return "does not hold"
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "inconclusive"


# ---------------------------------------------------------------- results of one row
@dataclass
class RowResult:
    row: Row
    ode: dict[int, float]  # uniform dequantization, per test image
    bound: dict[int, float]
    ode_vd: dict[int, float] = field(default_factory=dict)  # variational dequantization
    bound_vd: dict[int, float] = field(default_factory=dict)
    kid: tuple[float, float] | None = None  # (KID, s.e.) of the samples against the test images
    loss_var: dict[str, float] = field(default_factory=dict)  # estimator variances (see loss_variance)
    seconds: float = math.nan
    steps: int | None = None  # score steps the run took (its metrics.json's train/steps); None: unknown


def per_image(run: Path, filename: str = "test_per_example.npz") -> tuple[dict[int, float], dict[int, float]]:
    """``(ODE, bound)`` bits/dim per test image from a run's ``test_per_example.npz`` (or ``evaluate.py``'s
    ``per_example.npz``; mean over repeats; a quantity the file lacks gives an empty dict)."""
    z = np.load(run / filename)
    idx = np.asarray(z["index"]).astype(int).ravel()

    def col(name: str) -> dict[int, float]:
        if name not in z:
            return {}
        v = np.asarray(z[name], dtype=np.float64).reshape(len(idx), -1)
        return {int(i): float(np.nanmean(r)) for i, r in zip(idx, v, strict=True) if not np.isnan(r).all()}

    return col("bpd_ode"), col("bpd_bound")


# ---------------------------------------------------------------- the claims
@dataclass(frozen=True)
class Claim:
    number: int
    text: str
    verdict: str
    evidence: str


CLAIM_TEXT = {
    1: "the bound is at least the NLL in every setting",
    2: "a lower bound from a change of weighting gives a lower NLL",
    3: "likelihood weighting alone improves NLL and bound (vs original)",
    4: "LW + IS improves NLL and bound over the baseline in every setting, with slightly worse sample quality",
    5: "variational dequantization improves NLL and bound in every setting",
}


def _settings(r: RowResult) -> list[tuple[str, dict[int, float], dict[int, float]]]:
    out = [("uniform", r.ode, r.bound)]
    if r.ode_vd:
        out.append(("variational", r.ode_vd, r.bound_vd))
    return out


def claims(results: list[RowResult]) -> list[Claim]:
    by = {(r.row.data, r.row.sde, r.row.weighting): r for r in results}
    groups = sorted({(r.row.data, r.row.sde) for r in results})
    out = []

    # (1) bound - ODE > 0 for every row and dequantization
    ds, ev = [], []
    for r in results:
        for deq, ode, bnd in _settings(r):
            d = paired(bnd, ode)
            ds.append(d)
            ev.append(f"{r.row.name}/{deq} {d.mean:+.4f}±{d.se:.4f}")
    out.append(Claim(1, CLAIM_TEXT[1], verdict(ds, expect_negative=False), "bound − ODE: " + "; ".join(ev)))

    # (2) among weightings of one SDE/dequantization: where one bound is significantly lower, its NLL is lower
    ds2, ev2 = [], []
    for g in groups:
        ws = [w for w in WEIGHTINGS if (*g, w) in by]
        for i, a in enumerate(ws):
            for b in ws[i + 1:]:
                for (deq, oa, ba), (_, ob, bb) in zip(_settings(by[(*g, a)]), _settings(by[(*g, b)]), strict=False):
                    db = paired(ba, bb)
                    if abs(db.z) <= Z_SIGNIFICANT:
                        continue
                    lo, hi = (a, b) if db.mean < 0 else (b, a)
                    do = paired(oa, ob) if lo == a else paired(ob, oa)
                    ds2.append(do)
                    ev2.append(f"{g[0]}/{g[1]}/{deq}: bound {lo}<{hi} by {abs(db.mean):.4f}±{db.se:.4f}, "
                               f"ODE {lo}−{hi} {do.mean:+.4f}±{do.se:.4f}")
    out.append(Claim(2, CLAIM_TEXT[2], verdict(ds2), "; ".join(ev2) or "no pair of weightings with significantly "
                                                                    "different bounds"))

    # (3) likelihood vs original, (4) lw_is vs original: NLL and bound lower
    for num, w in ((3, "likelihood"), (4, "lw_is")):
        ds3, ev3 = [], []
        for g in groups:
            if (*g, w) not in by or (*g, "original") not in by:
                continue
            for (deq, o1, b1), (_, o0, b0) in zip(_settings(by[(*g, w)]), _settings(by[(*g, "original")]),
                                                  strict=False):
                do, db = paired(o1, o0), paired(b1, b0)
                ds3 += [do, db]
                ev3.append(f"{g[0]}/{g[1]}/{deq}: ODE {do.mean:+.4f}±{do.se:.4f}, bound {db.mean:+.4f}±{db.se:.4f}")
        v = verdict(ds3)
        text = f"{w} − original: " + "; ".join(ev3)
        if num == 4:
            sq = []
            for g in groups:
                a, b = by.get((*g, w)), by.get((*g, "original"))
                if a and b and a.kid and b.kid:
                    se = math.hypot(a.kid[1], b.kid[1])
                    sq.append(Paired(a.kid[0] - b.kid[0], se, 0))  # independent samples: not paired
                    text += (f"; KID {g[0]}/{g[1]}: lw_is {a.kid[0]:.4f}±{a.kid[1]:.4f} vs original "
                             f"{b.kid[0]:.4f}±{b.kid[1]:.4f}")
            vs = verdict(sq, expect_negative=False) if sq else "inconclusive (no sample-quality number)"
            text += f". Sample quality worse with LW+IS: {vs}"
            v = f"{v} (NLL/bound); sample quality worse: {vs}"
        out.append(Claim(num, CLAIM_TEXT[num], v, text))

    # (5) variational − uniform < 0 for NLL and bound, every row
    ds5, ev5 = [], []
    for r in results:
        if not r.ode_vd:
            continue
        do, db = paired(r.ode_vd, r.ode), paired(r.bound_vd, r.bound)
        ds5 += [do, db]
        ev5.append(f"{r.row.name}: ODE {do.mean:+.4f}±{do.se:.4f}, bound {db.mean:+.4f}±{db.se:.4f}")
    out.append(Claim(5, CLAIM_TEXT[5], verdict(ds5), "variational − uniform: " + ("; ".join(ev5) or "no rows")))
    return out


# ---------------------------------------------------------------- sample quality
def kid(x: np.ndarray, y: np.ndarray, n_blocks: int = 10, seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance's estimator (Binkowski et al. 2018: unbiased MMD² with the cubic polynomial
    kernel ``(x·y/d + 1)^3``) between feature rows ``x [n, d]`` and ``y [m, d]``, as mean ± s.e. over
    ``n_blocks`` disjoint random blocks."""
    rng = np.random.default_rng(seed)
    x, y = rng.permutation(np.asarray(x, np.float64)), rng.permutation(np.asarray(y, np.float64))
    d = x.shape[1]
    vals = []
    for xb, yb in zip(np.array_split(x, n_blocks), np.array_split(y, n_blocks), strict=True):
        kxx, kyy, kxy = ((xb @ xb.T) / d + 1) ** 3, ((yb @ yb.T) / d + 1) ** 3, ((xb @ yb.T) / d + 1) ** 3
        n, m = len(xb), len(yb)
        vals.append((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    v = np.array(vals)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


def _data_cfg(data: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(project_root() / "conf"), version_base=None):
        return compose("train", overrides=[f"data={data}"])


def data_num_levels(data: str) -> int:
    """The quantization levels ``K`` of the ``conf/data`` preset ``data``."""
    return int(_data_cfg(data).data.num_levels)


def test_images(data: str) -> np.ndarray:
    """The test split as ``[N, D]`` values in ``[0, 1]`` (level / (K - 1))."""
    from scoreflow.tasks.build import build_data

    cfg = _data_cfg(data)
    src = build_data(cfg)
    ds = src.load()["test"]
    k = np.stack([np.asarray(ds[i][0], np.float64) for i in range(len(ds))])
    return k.reshape(len(k), -1) / (cfg.data.num_levels - 1)


def sample_features(folder: Path, num_levels: int) -> np.ndarray:
    z = np.load(folder / "samples.npz")
    k = np.asarray(z["samples_levels"], np.float64)
    return k.reshape(len(k), -1) / (num_levels - 1)


# ---------------------------------------------------------------- training-loss variance (with and without IS)
def loss_variance(ckpt: Path, n: int = 1024, seed: int = 0) -> dict[str, float]:
    """Variance over examples of the likelihood-weighted DSM loss of a checkpoint's EMA model on ``n`` training
    images, with uniform times (``likelihood``) and with importance-sampled times (``lw_is``, normalized so both
    estimate the same objective): the paper's 98.48 -> 0.068 comparison, on our model."""
    import torch

    from scoreflow.losses import dsm_loss
    from scoreflow.tasks.build import build_data
    from scoreflow.tasks.common import module_from_checkpoint
    from scoreflow.weighting import ImportanceSampledLikelihood, LikelihoodWeighting

    module, cfg, _ = module_from_checkpoint(ckpt, use_ema=True)
    module.eval()
    ds = build_data(cfg).load()["train"]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(ds), (n,), generator=g)
    k = torch.stack([torch.as_tensor(ds[int(i)][0]) for i in idx])
    y, _ = module.to_model_space(k, g)
    out = {}
    for name, ts in (("likelihood", LikelihoodWeighting(module.sde, module.eps)),
                     ("lw_is", ImportanceSampledLikelihood(module.sde, module.eps, normalize=True))):
        t, w = ts.sample(n, generator=g, device=y.device, dtype=y.dtype)
        z = torch.randn(y.shape, generator=g)
        with torch.no_grad():
            per = dsm_loss(module.score_model, module.sde, y, t, noise=z, form="eps", reduce=module.loss_reduce)
        v = (w * per).double()
        out[name] = float(v.var())
        out[name + "_mean"] = float(v.mean())
    return out


# ---------------------------------------------------------------- plots
def _csv(run: Path) -> dict[str, list[tuple[int, float]]]:
    import csv

    cols: dict[str, list[tuple[int, float]]] = {}
    f = run / "csv" / "metrics.csv"
    if not f.is_file():
        return cols
    with f.open() as fh:
        for rec in csv.DictReader(fh):
            for key, v in rec.items():
                if key in ("epoch", "step") or v in ("", None):
                    continue
                cols.setdefault(key, []).append((int(float(rec["step"])), float(v)))
    return cols


def _save(fig, path: Path) -> Path:
    """Lay out, write (80 dpi) and close a report figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_curves(results: list[RowResult], out: Path) -> Path:
    """Validation bound and ODE bits/dim against steps, one panel per SDE, one colour per weighting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SDES), figsize=(5 * len(SDES), 3.6), squeeze=False)
    colors = dict(zip(WEIGHTINGS, ("C0", "C1", "C2"), strict=True))
    for ax, sde in zip(axes[0], SDES, strict=True):
        for r in results:
            if r.row.data != "digits" or r.row.sde != sde:
                continue
            c = _csv(out / "runs" / r.row.name)
            for key, ls in (("val/bpd_bound", "-"), ("val/bpd_ode", "--")):
                if key in c:
                    s, v = zip(*c[key], strict=True)
                    ax.plot(s, v, ls, color=colors[r.row.weighting], label=f"{r.row.weighting} {key[8:]}")
        ax.set(title=f"digits, {sde}", xlabel="step", ylabel="bits/dim (validation)")
        if ax.get_legend_handles_labels()[0]:  # a short run may have nothing to plot
            ax.legend(fontsize=7)
    return _save(fig, out / "bpd_vs_step.png")


def plot_loss_variance(results: list[RowResult], out: Path) -> Path:
    """Left: rolling variance of the logged training loss per weighting (VP). Right: the per-example variance of
    the likelihood-weighted loss with uniform vs importance-sampled times on each final model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        if r.row.data != "digits":
            continue
        c = _csv(out / "runs" / r.row.name).get("train/loss", [])
        if len(c) > 10:
            s, v = np.array(c).T
            w = 10
            rv = [np.var(v[i - w:i], ddof=1) for i in range(w, len(v) + 1)]
            a0.semilogy(s[w - 1:], rv, label=r.row.name.removeprefix("digits_"))
    a0.set(title="variance of the logged batch loss (10 logs)", xlabel="step")
    if a0.get_legend_handles_labels()[0]:  # a short run may have nothing to plot
        a0.legend(fontsize=7)
    names = [r.row.name.removeprefix("digits_") for r in results if r.loss_var]
    lv = [r.loss_var for r in results if r.loss_var]
    x = np.arange(len(names))
    a1.bar(x - 0.2, [d["likelihood"] for d in lv], 0.4, label="uniform t (likelihood)")
    a1.bar(x + 0.2, [d["lw_is"] for d in lv], 0.4, label="importance-sampled t (lw_is)")
    a1.set_yscale("log")
    a1.set_xticks(x, names, rotation=30, fontsize=7)
    a1.set(title="per-example variance of the LW loss, final model")
    if a1.get_legend_handles_labels()[0]:  # a short run may have nothing to plot
        a1.legend(fontsize=7)
    return _save(fig, out / "loss_variance.png")


def plot_samples(results: list[RowResult], out: Path, n: int = 36) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(2.2 * len(results), 2.5), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        z = np.load(out / "runs" / f"{r.row.name}_samples" / "samples.npz")
        k = np.asarray(z["samples_levels"], np.float64)[:n, 0]
        side = int(math.ceil(math.sqrt(len(k))))
        h, w = k.shape[1:]
        grid = np.zeros((side * (h + 1), side * (w + 1)))
        for i, im in enumerate(k):
            rr, cc = divmod(i, side)
            grid[rr * (h + 1):rr * (h + 1) + h, cc * (w + 1):cc * (w + 1) + w] = im / max(k.max(), 1)
        ax.imshow(grid, cmap="gray")
        ax.set_title(r.row.name.replace("_", " ", 1), fontsize=7)
        ax.axis("off")
    return _save(fig, out / "samples.png")


# ---------------------------------------------------------------- the report
def row_table(results: list[RowResult]) -> str:
    lines = ["| row | steps | n | ODE bpd (uniform) | bound bpd (uniform) | ODE bpd (variational) | bound bpd "
             "(variational) | KID (pixels) ×1e3 | LW-loss var: uniform t / IS t | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def ms(v: dict[int, float]) -> str:
        if not v:
            return "–"
        m, s = mean_se(v)
        return f"{m:.4f} ± {s:.4f}"

    for r in results:
        k = f"{1e3 * r.kid[0]:.2f} ± {1e3 * r.kid[1]:.2f}" if r.kid else "missing"
        lv = f"{r.loss_var['likelihood']:.3g} / {r.loss_var['lw_is']:.3g}" if r.loss_var else "–"
        # the run's own steps (metrics.json), never the plan's alone: a reused run may have another budget
        steps = f"{r.row.steps} (planned; not recorded)" if r.steps is None else \
            str(r.steps) if r.steps == r.row.steps else f"{r.steps} (planned {r.row.steps})"
        lines.append(f"| {r.row.name} | {steps} | {len(r.ode)} | {ms(r.ode)} | {ms(r.bound)} | {ms(r.ode_vd)} "
                     f"| {ms(r.bound_vd)} | {k} | {lv} | {r.seconds:.0f} |")
    return "\n".join(lines)


def claims_table(cs: list[Claim]) -> str:
    lines = ["| # | observation (ScoreFlow §5.3) | here |", "|---|---|---|"]
    lines += [f"| {c.number} | {c.text} | **{c.verdict}** |" for c in cs]
    return "\n".join(lines)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def command_line(argv: list[str]) -> str:
    """This invocation as a shell command (``python -m scoreflow.tasks.reproduce ARGS``, arguments as given)."""
    return shlex.join(["python", "-m", "scoreflow.tasks.reproduce", *argv])


def write_report(path: Path, results: list[RowResult], cs: list[Claim], *, command: str, wall_s: float,
                 budget: Budget, plots: dict[str, str], failed: dict[str, str] | None = None,
                 resumed: bool = False, stage_s: float = 0.0, jobs: int = 2, cores: int | None = None,
                 by_make: bool = False) -> Path:
    """Write the Markdown report. ``command``: the command line as run (:func:`command_line`; ``by_make``: run by a
    ``make`` target); ``jobs``: rows run at a time; ``cores``: the CPU cores available (default: this machine's)."""
    mode = "full" if budget == FULL else "QUICK" if budget == QUICK else "test"
    cores = available_cores() if cores is None else cores
    at_once = f"{jobs} row{'s' if jobs != 1 else ''} at a time, one thread each"
    if resumed:
        when = (f"this invocation took {wall_s / 60:.1f} min but resumed earlier ones (finished stages were reused, "
                "not rerun), so it is not the command's cost; " + (
                    f"the stages' own wall times recorded in `runs/{TIMINGS}` sum to {stage_s / 60:.1f} min (stages "
                    f"of rows run in parallel overlap; this invocation: {cores} cores, {at_once})" if stage_s > 0
                    else "the stages that ran earlier recorded no times"))
    else:
        when = f"wall time {wall_s / 60:.1f} min from scratch on this machine ({cores} cores, {at_once})"
    parts = [
        f"# The paper's five claims at CPU scale ({mode} mode)",
        "",
        f"Command: `{command}`{' (run by `make`)' if by_make else ''} — {when}. Budget (`plan.json`): "
        f"{budget.steps} score steps, {budget.dequant_steps} variational-dequantization steps after each score model, "
        f"{'all' if budget.test_subset is None else budget.test_subset} test images, {budget.num_samples} samples per "
        "row. Seeds: training `seed=42` (train.py), flow `seed=0` (train_dequant.py), evaluation seed 0 (per-image "
        "seeds of `lit/per_image.py`), samples from seeds 0..N−1.",
        "",
        "Every row is evaluated on the same test images with the same per-image dequantization noise, probes and "
        "bound times, so differences are **paired per image** (mean difference ± s.e. of the differences, z = mean/"
        f"s.e.). A claim holds when every comparison it makes has the predicted sign with |z| > {Z_SIGNIFICANT:g}, "
        f"does not hold when one has the opposite sign with |z| > {Z_SIGNIFICANT:g}, and is inconclusive otherwise. "
        "The variational bound is reported without the ε-correction, like the uniform one, so the two pair.",
        "",
        "## Claims",
        "",
        claims_table(cs),
        "",
    ]
    parts += [f"{c.number}. **{c.verdict}** — {c.evidence}" for c in cs]
    parts += [
        "",
        "## Rows (mean ± s.e. over test images)",
        "",
        row_table(results),
        "",
        "Sample quality: KID (unbiased MMD² with the cubic polynomial kernel, Binkowski et al. 2018) between the "
        "row's samples (probability-flow ODE, RK4 50 steps, quantized to the data's levels) and the test images, in "
        "raw pixel space (64-d for 8×8 digits): a small-data stand-in for Inception features, which mean nothing on "
        "8×8 images; lower is better; ± over 10 disjoint blocks. Samples are independent across rows, so the "
        "sample-quality comparison is unpaired. LW-loss variance: per-example variance of the likelihood-weighted "
        "DSM loss on 1024 training images with the final EMA model, with uniform vs importance-sampled times "
        "(normalized to the same expectation).",
        "",
    ]
    parts += [f"![{k}]({v})" for k, v in plots.items()]
    if failed:
        parts += ["", "## Rows that failed (left out of every claim above)", ""]
        parts += [f"- {name}: {err}" for name, err in failed.items()]
    path.write_text("\n".join(parts) + "\n")
    return path


# ---------------------------------------------------------------- main
def collect(row: Row, out: Path, ref: np.ndarray | None, num_levels: int) -> RowResult:
    runs = out / "runs"
    ode, bnd = per_image(runs / row.name)
    r = RowResult(row, ode, bnd)
    if run_done(runs / f"{row.name}_vd"):
        r.ode_vd, r.bound_vd = per_image(runs / f"{row.name}_vd")
    smp = runs / f"{row.name}_samples"
    if ref is not None and samples_done(smp):
        r.kid = kid(sample_features(smp, num_levels), ref)
    m = _metrics(runs / row.name)
    if isinstance(m.get("wall_time_s"), (int, float)):
        r.seconds = float(m["wall_time_s"])
    if isinstance(m.get("train/steps"), (int, float)):
        r.steps = int(m["train/steps"])
    cache = runs / row.name / "loss_variance.json"
    if cache.is_file():
        r.loss_var = json.loads(cache.read_text())
    elif row.data == "digits":
        r.loss_var = loss_variance(runs / row.name / "checkpoints" / "last.ckpt")
        cache.write_text(json.dumps(r.loss_var))
    return r


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="300 steps, 100 test images, 100 flow steps, no mnist5k")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: reports/reproduce-small[-quick] under the project root: the current "
                        "directory when it holds train.py and conf/, else the checkout scoreflow was installed from)")
    p.add_argument("--jobs", type=int, default=2, help="rows trained at a time (one thread each)")
    p.add_argument("--steps", type=int, default=None,
                   help="a test budget of N score steps (16 test images, N/3 flow steps, 40 samples); a folder of "
                        "runs of another budget is refused")
    a = p.parse_args(argv)
    t0 = time.time()
    root = project_root()
    if not (root / "train.py").is_file():
        print(f"error: no train.py in {Path.cwd()} or in {ROOT} (where scoreflow was installed from): run this from "
              "the project root of a scoreflow checkout", file=sys.stderr)
        return 2
    budget = QUICK if a.quick else FULL
    if a.steps:
        budget = Budget(a.steps, 16, max(a.steps // 3, 5), 40, 0)
    out = (a.out or default_out(a.quick, root)).resolve()  # absolute: the stages run in the project root
    out.mkdir(parents=True, exist_ok=True)
    if (refused := check_plan(out, budget)) is not None:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    rows = plan(budget)
    jobs = max(1, a.jobs)
    progress(t0, f"{len(rows)} rows ({describe(budget)}), {jobs} at a time on {available_cores()} cores; "
                 f"project root {root}; runs in {out / 'runs'}")
    failed: dict[str, str] = {}

    skipped: list[str] = []

    def one(row: Row) -> None:
        try:
            stages = do_row(row, out, budget, t0=t0)
            if len(stages) < 3:
                skipped.append(row.name)
            print(f"[reproduce] {row.name}: {'ran ' + ', '.join(stages) if stages else 'already done'}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported; the other rows go on
            failed[row.name] = str(e)
            print(f"[reproduce] {row.name}: FAILED: {e}", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, rows))
    rows = [r for r in rows if r.name not in failed]
    import torch

    torch.set_num_threads(1)
    results = []
    refs: dict[str, tuple[np.ndarray, int]] = {}
    for row in rows:
        progress(t0, f"{row.name}: collecting results (per-image values, KID, loss variance)")
        if row.data not in refs:
            ref = test_images(row.data)
            refs[row.data] = (ref, 17 if row.data == "digits" else 256)
        results.append(collect(row, out, *refs[row.data]))
    cs = claims(results)
    progress(t0, "plots and report")
    plots = {"bits/dim against steps": plot_curves(results, out).name,
             "training-loss variance": plot_loss_variance(results, out).name,
             "samples": plot_samples(results, out).name}
    plots = {k: f"{out.name}/{v}" for k, v in plots.items()}
    report = write_report(out.parent / f"{out.name}.md", results, cs, command=command_line(argv),
                          wall_s=time.time() - t0, budget=budget, plots=plots, failed=failed, resumed=bool(skipped),
                          stage_s=stage_seconds(out / "runs"), jobs=jobs, by_make=bool(os.environ.get("MAKELEVEL")))
    print(claims_table(cs))
    print(f"[reproduce] report: {report} ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
