"""Sample quality of several runs: KID in pixel space against the test split, as ``make reproduce-small`` scores it.

    python bench/sample_kid.py outputs/recipe/s3600_seed{42,1,2} outputs/tlabel/t_seed{42,1,2} --num-samples 400

For each run folder, ``sample.py`` draws ``--num-samples`` samples from ``checkpoints/last.ckpt`` (EMA weights,
probability-flow ODE, RK4 50 steps, sample i from seed i; kept in ``<run>/samples_kid_<n>/`` and reused), quantized
to the data's levels; KID is the unbiased MMD² with the cubic polynomial kernel between their pixels and the
test images' (lower is better; ± over 10 disjoint blocks). Samples of different runs are independent, so
differences between runs are unpaired: compare them to the spread over training seeds of one configuration.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from scoreflow.tasks.reproduce import data_num_levels, kid, sample_cmd, sample_features, samples_done, test_images

KID_BLOCKS = 10  # disjoint blocks the KID is averaged over (its ± is their standard error)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="train.py run folders (with checkpoints/last.ckpt)")
    p.add_argument("--num-samples", type=int, default=400)
    p.add_argument("--data", default="digits", help="the conf/data preset whose test split is the reference")
    p.add_argument("--num-levels", type=int, default=None,
                   help="the samples' quantization levels; default: the --data preset's (digits 17, mnist5k 256)")
    args = p.parse_args(argv)
    if args.num_samples < 2 * KID_BLOCKS:  # else a block of 0-1 samples: 0/0 in its unbiased MMD², KID nan ± nan
        p.error(f"--num-samples must be at least {2 * KID_BLOCKS} (got {args.num_samples}): KID is averaged over "
                f"{KID_BLOCKS} disjoint blocks and its unbiased MMD² needs at least 2 samples per block")
    missing = [str(r) for r in args.runs if not (r / "checkpoints" / "last.ckpt").is_file()]
    if missing:
        print(f"error: no checkpoints/last.ckpt in {', '.join(missing)}", file=sys.stderr)
        return 2
    ref = test_images(args.data)
    if args.num_levels is None:  # the data's own: samples and reference on one scale (17 for mnist5k gave 3.8e6)
        args.num_levels = data_num_levels(args.data)
    rows = []
    for run in args.runs:
        folder = run / f"samples_kid_{args.num_samples}"
        if not samples_done(folder):
            print(f"[sample_kid] sampling {args.num_samples} from {run} ...", flush=True)
            subprocess.run(sample_cmd(run, folder, args.num_samples), check=True, stdout=subprocess.DEVNULL)
        rows.append((run, kid(sample_features(folder, args.num_levels), ref, n_blocks=KID_BLOCKS)))
    width = max(len(str(r)) for r, _ in rows)
    print(f"{'run':<{width}}  KID x 1e3 (pixels, vs {len(ref)} test images)")
    for run, (m, se) in rows:
        print(f"{str(run):<{width}}  {1e3 * m:7.2f} ± {1e3 * se:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
