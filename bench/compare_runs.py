"""Test bits/dim of several runs, paired per image against the first.

    python bench/compare_runs.py outputs/bf16/s42_fp32 outputs/bf16/s42_bf16 outputs/recipe/s3600_seed1

Each argument is a ``train.py``/``evaluate.py`` run folder with a ``test_per_example.npz`` (``evaluate.py`` writes
``per_example.npz``: give that file's folder with ``--file per_example.npz``). The runs were evaluated with the same
per-image seeds (dequantization draw, probe, bound times), so the differences are paired: ``Δ = mean(run_i - base_i)
± s.e.`` over the images both hold. A difference of one training run against another is only meaningful next to
what a change of seed alone does, so give a second seed of the base as one of the runs.

Only like is paired with like. What a run evaluated is read from its per-image file (``meta``: data, split,
evaluation seed, protocol) or, for a file written before it had one, from the run folder: ``evaluate.py``'s
``metrics.json`` (its ``protocol`` entry); ``train.py``'s ``metrics.json`` (the protocol line) and
``.hydra/config.yaml`` (``data``, ``module.evaluation.seed``). Against the first run (the base):

* other **data** (the dataset or its split settings; ``root``, ``path``, ``layout`` and the training-only ``hflip``
  do not count) or another **split**: refused (exit 2), whatever the flags; image i of one is not image i of the
  other, so a paired difference means nothing.
* another **evaluation seed** or **protocol** (solver, bound estimator, dequantization, eps, repeats): paired, with
  a ``warning:`` line on stderr and the row marked ``[not like with like: ...]``. The mean difference is then that
  of the models *and* of the protocols (or it carries independent Monte-Carlo noise: a larger s.e.), which is what
  a protocol study wants but not a model comparison at matched noise. ``--strict`` refuses these instead.
* what cannot be read (an older file without ``meta`` and a folder without those records): a ``warning:`` line and
  the row marked ``[unchecked: ...]``; ``--strict`` refuses it.
* other **images** (a run evaluated on more or fewer of them: ``num_images``): a ``warning:`` line; each column is
  the mean over its own run's images and the paired difference is over the images both hold.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scoreflow.tasks.reproduce import mean_se, paired, per_image

# keys of a data config that say where the files are or how training augments them, not which images are evaluated
NOT_DATA_IDENTITY = ("root", "path", "layout", "hflip")


@dataclass
class Identity:
    """What a run's per-image values were measured on (``None``: no record of it)."""

    data: dict[str, Any] | None = None
    split: str | None = None
    seed: int | None = None
    protocol: str | dict[str, Any] | None = None


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _hydra_config(run: Path) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def identity(run: Path, filename: str) -> Identity:
    """The :class:`Identity` of ``run/filename``: its ``meta`` entry, else the run folder's records."""
    with np.load(run / filename) as z:
        if "meta" in z.files:
            m = json.loads(str(z["meta"].item()))
            return Identity(m.get("data"), m.get("split"), m.get("seed"), m.get("protocol"))
    metrics = _json(run / "metrics.json")
    proto = metrics.get("protocol")
    if isinstance(proto, dict):  # evaluate.py: its metrics.json records all of it
        from scoreflow.tasks.likelihood_eval import per_example_meta

        m = per_example_meta(proto, proto.get("repeats"))
        return Identity(m["data"], m["split"], m["seed"], m["protocol"])
    ident = Identity(protocol=proto if isinstance(proto, str) else None,
                     split="test" if filename == "test_per_example.npz" else None)  # only a test phase writes it
    cfg = _hydra_config(run)
    if isinstance(cfg.get("data"), dict):
        ident.data = {k: v for k, v in cfg["data"].items() if k != "root"}
    seed = ((cfg.get("module") or {}).get("evaluation") or {}).get("seed")
    if isinstance(seed, int):
        ident.seed = seed
    return ident


def _data_name(data: dict[str, Any]) -> str:
    name = str(data.get("_target_", "?")).rsplit(".", 1)[-1]
    return f"{name} {data['name']}" if isinstance(data.get("name"), str) else name


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: value}


def _differences(base: Any, other: Any, limit: int = 4) -> str:
    """``key a vs b`` for the (first few) entries that differ: dicts by key, protocol lines by comma-part."""
    if isinstance(base, dict) and isinstance(other, dict):
        a, b = _flat(base), _flat(other)
        parts = [f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif isinstance(base, str) and isinstance(other, str):
        a, b = base.split(", "), other.split(", ")
        parts = ([f"'{x}' vs '{y}'" for x, y in zip(a, b, strict=True) if x != y] if len(a) == len(b)
                 else [f"'{base}' vs '{other}'"])
    else:
        parts = [f"recorded by different tools ({type(base).__name__} vs {type(other).__name__})"]
    return "; ".join(parts[:limit]) + (f"; {len(parts) - limit} more" if len(parts) > limit else "")


def check(base: Identity, other: Identity) -> tuple[list[str], dict[str, str], list[str]]:
    """``(refused, not_like_with_like, unchecked)``: what differs from the base (a phrase naming both values, the
    base's first; the second keyed by the field) and the fields with no record on one side."""
    refused: list[str] = []
    unlike: dict[str, str] = {}
    unchecked: list[str] = []
    if base.data is None or other.data is None:
        unchecked.append("data")
    else:
        a, b = ({k: v for k, v in d.items() if k not in NOT_DATA_IDENTITY} for d in (base.data, other.data))
        if a != b:
            if _data_name(a) != _data_name(b):  # named already: the detail is the rest
                a, b = ({k: v for k, v in d.items() if k != "_target_"} for d in (a, b))
            refused.append(f"different data: {_data_name(base.data)} vs {_data_name(other.data)} "
                           f"({_differences(a, b)})")
    if base.split is None or other.split is None:
        unchecked.append("split")
    elif base.split != other.split:
        refused.append(f"different splits: {base.split} vs {other.split}")
    if base.seed is None or other.seed is None:
        unchecked.append("evaluation seed")
    elif base.seed != other.seed:
        unlike["evaluation seed"] = f"evaluation seed {base.seed} vs {other.seed}"
    if base.protocol is None or other.protocol is None:
        unchecked.append("protocol")
    elif base.protocol != other.protocol:
        unlike["protocol"] = f"protocol: {_differences(base.protocol, other.protocol)}"
    return refused, unlike, unchecked


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders; the first is the base of the paired differences")
    p.add_argument("--file", default="test_per_example.npz", help="the per-image file inside each run folder")
    p.add_argument("--strict", action="store_true",
                   help="refuse (exit 2) a run whose evaluation seed or protocol differs from the first run's, or "
                        "whose data, split, seed or protocol has no record, instead of pairing it with a warning")
    args = p.parse_args(argv)
    files = [r / args.file for r in args.runs]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        print(f"error: no per-image results at {', '.join(missing)} (a finished train.py run writes "
              f"{args.file} into its run folder)", file=sys.stderr)
        return 2
    base = args.runs[0]
    ids = [identity(r, args.file) for r in args.runs]
    errors, warnings, marks = [], [], {}
    for run, ident in zip(args.runs[1:], ids[1:], strict=True):
        refused, unlike, unchecked = check(ids[0], ident)
        if args.strict:
            refused += [*unlike.values(), *[f"no record of its {', '.join(unchecked)} to check"] * bool(unchecked)]
            unlike, unchecked = {}, []
        errors += [f"error: {run} cannot be paired with the base {base}: {why}" for why in refused]
        warnings += [f"warning: {run} vs the base {base}: {why}; paired anyway, so the difference is not that of "
                     "the models alone at matched noise (--strict refuses this)" for why in unlike.values()]
        if unchecked:
            warnings.append(f"warning: cannot check that {run} evaluated the same {', '.join(unchecked)} as the base "
                            f"{base}: no record in {args.file} (meta) or in the run folders (metrics.json, "
                            ".hydra/config.yaml)")
        marks[run] = "".join(f" [{label}: {', '.join(fields)}]" for label, fields in
                             (("not like with like", list(unlike)), ("unchecked", unchecked)) if fields)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        print("Per-image differences pair image i of one run with image i of the other: compare runs evaluated on "
              "the same data and split.", file=sys.stderr)
        return 2
    data = [per_image(r, args.file) for r in args.runs]
    for run, (ode, bound) in zip(args.runs[1:], data[1:], strict=True):
        for name, v, b in (("ODE", ode, data[0][0]), ("bound", bound, data[0][1])):
            if v and b and set(v) != set(b):  # the columns below are over each run's own images
                warnings.append(f"warning: {run} holds {len(v)} images for the {name}, the base {base} {len(b)}: "
                                f"each column is the mean over its own run's images, the paired difference over the "
                                f"{len(set(v) & set(b))} both hold")
    if warnings:
        print("\n".join(warnings), file=sys.stderr)
    width = max(len(str(r)) for r in args.runs)
    print(f"{'run':<{width}}  {'ODE bits/dim':>17}  {'bound bits/dim':>17}  paired vs {base}")
    for run, (ode, bound) in zip(args.runs, data, strict=True):
        cells = []
        for v in (ode, bound):
            m, se = mean_se(v) if v else (None, None)
            cells.append("-" if m is None else f"{m:.4f} ± {se:.4f}")  # "-": not evaluated (was "nan ± nan")
        diffs = ""
        if run is not base:
            parts = []
            for name, v, b in (("ODE", ode, data[0][0]), ("bound", bound, data[0][1])):
                if len(set(v) & set(b)) >= 2:
                    parts.append(f"{name} {paired(v, b).text()}")
            diffs = "; ".join(parts) + marks.get(run, "")
        print(f"{str(run):<{width}}  {cells[0]:>17}  {cells[1]:>17}  {diffs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
