"""Test bits/dim of several runs, paired per image against the first.

    python bench/compare_runs.py outputs/bf16/s42_fp32 outputs/bf16/s42_bf16 outputs/recipe/s3600_seed1

Each argument is a ``train.py``/``evaluate.py`` run folder with a ``test_per_example.npz`` (``evaluate.py`` writes
``per_example.npz``: give that file's folder with ``--file per_example.npz``). The runs were evaluated with the same
per-image seeds (dequantization draw, probe, bound times), so the differences are paired: ``Δ = mean(run_i - base_i)
± s.e.`` over the images both hold. A difference of one training run against another is only meaningful next to
what a change of seed alone does, so give a second seed of the base as one of the runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scoreflow.tasks.reproduce import mean_se, paired, per_image


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders; the first is the base of the paired differences")
    p.add_argument("--file", default="test_per_example.npz", help="the per-image file inside each run folder")
    args = p.parse_args(argv)
    files = [r / args.file for r in args.runs]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        print(f"error: no per-image results at {', '.join(missing)} (a finished train.py run writes "
              f"{args.file} into its run folder)", file=sys.stderr)
        return 2
    data = [per_image(r, args.file) for r in args.runs]
    width = max(len(str(r)) for r in args.runs)
    print(f"{'run':<{width}}  {'ODE bits/dim':>17}  {'bound bits/dim':>17}  paired vs {args.runs[0]}")
    for run, (ode, bound) in zip(args.runs, data, strict=True):
        cells = []
        for v in (ode, bound):
            m, se = mean_se(v) if v else (float("nan"), float("nan"))
            cells.append(f"{m:.4f} ± {se:.4f}")
        diffs = ""
        if run is not args.runs[0]:
            parts = []
            for name, v, b in (("ODE", ode, data[0][0]), ("bound", bound, data[0][1])):
                if len(set(v) & set(b)) >= 2:
                    parts.append(f"{name} {paired(v, b).text()}")
            diffs = "; ".join(parts)
        print(f"{str(run):<{width}}  {cells[0]:>17}  {cells[1]:>17}  {diffs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
