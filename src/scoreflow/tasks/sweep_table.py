"""One table over a sweep directory: ``python -m scoreflow.tasks.sweep_table multirun/train/<date>``.

One row per run: its overrides (from ``.hydra/overrides.yaml``) and its test metrics (``metrics.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

COLUMNS = [
    ("test/bpd_ode", "bpd ODE"),
    ("test/bpd_ode_se", "±"),
    ("test/bpd_bound", "bpd bound"),
    ("test/bpd_bound_se", "±"),
    ("test/nfe", "NFE"),
    ("train/steps", "steps"),
    ("wall_time_s", "time s"),
]


def collect(sweep_dir: str | Path) -> list[dict]:
    rows = []
    for metrics_path in sorted(Path(sweep_dir).rglob("metrics.json")):
        run = metrics_path.parent
        ov_path = run / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(ov_path.read_text()) if ov_path.exists() else []
        rows.append({"run": run.name, "overrides": " ".join(overrides), **json.loads(metrics_path.read_text())})
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "no runs with metrics.json found"
    head = ["overrides"] + [c[1] for c in COLUMNS]
    body = []
    for r in rows:
        cells = [r["overrides"] or r["run"]]
        for key, _ in COLUMNS:
            v = r.get(key)
            cells.append(
                "-" if v is None else (f"{v:.0f}" if key in ("test/nfe", "train/steps", "wall_time_s") else f"{v:.4f}")
            )
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("sweep_dir")
    args = p.parse_args(argv)
    print(format_table(collect(args.sweep_dir)))


if __name__ == "__main__":
    main()
