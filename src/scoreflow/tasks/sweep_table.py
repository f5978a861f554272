"""One table over a sweep folder: ``python -m scoreflow.tasks.sweep_table multirun/train/<date>``.

A run is a folder with ``.hydra/overrides.yaml``; it *finished* if it has ``metrics.json``, else it is listed
as failed (with the last line of its log). Test metrics are used where a run has them, else its last
validation metrics (``test=false``), and the table says which. Runs whose overrides differ only by
``seed=`` form one row: mean ± sample standard deviation over the seeds, and ``n``. Rows are sorted by
bits/dim (ODE, then bound), best first. Writes ``sweep_table.md`` and ``sweep_table.csv`` into the folder
(or ``--out``). Exit code 2 when the folder is missing or holds no run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import yaml

# (metric without its split, column title, format)
COLUMNS = [("bpd_ode", "bpd ODE", ".4f"), ("bpd_bound", "bpd bound", ".4f"), ("nfe", "NFE", ".0f")]
EXTRA = [("train/steps", "steps", ".0f"), ("train/wall_time_s", "train s", ".0f")]
SEED_KEYS = ("seed",)


def find_runs(sweep_dir: Path) -> list[Path]:
    """Every run folder under ``sweep_dir`` (a folder holding ``.hydra/overrides.yaml``)."""
    return sorted(p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml"))


def read_run(run: Path) -> dict[str, Any]:
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        return _run(str(run), overrides, None) | {"reason": _last_log_line(run)}
    return _run(str(run), overrides, json.loads(metrics_path.read_text()))


def _run(run: str, overrides: list[str], metrics: dict[str, Any] | None) -> dict[str, Any]:
    """A run's row: its group (the overrides but the seed), status, and the metrics of its best split."""
    key = tuple(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in SEED_KEYS)
    row: dict[str, Any] = {"run": run, "overrides": list(overrides), "group": " ".join(key) or "(defaults)"}
    if metrics is None:
        return {**row, "status": "failed"}
    protocol = metrics.get("protocol")
    if isinstance(protocol, dict) and protocol.get("split"):  # evaluate.py: the split it was asked for
        split, row["evaluated"] = str(protocol["split"]), True
    else:  # train.py: its test phase, else (test=false) its last validation
        split = "test" if any(k.startswith("test/bpd") for k in metrics) else "val"
    values = {name: metrics.get(f"{split}/{name}") for name, _, _ in COLUMNS}
    # metrics.json writes a NaN or infinite value as null: present but not a number (absent: not computed)
    row["nonfinite"] = [name for name, _, _ in COLUMNS if f"{split}/{name}" in metrics and _num(values[name]) is None]
    values.update({k: metrics.get(k) for k, _, _ in EXTRA})
    if values["train/wall_time_s"] is None and "train/steps" in metrics:  # a training run of an earlier release
        values["train/wall_time_s"] = metrics.get("wall_time_s")  # the command's wall time
    return {**row, "status": "ok", "split": split, **values}


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One dict per finished run: ``run`` (folder name), ``overrides`` (one string) and its ``metrics.json``."""
    out = []
    for run in find_runs(Path(sweep_dir)):
        if (run / "metrics.json").is_file():
            overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) or []
            metrics = json.loads((run / "metrics.json").read_text())
            out.append({"run": run.name, "overrides": " ".join(overrides), **metrics})
    return out


def format_table(rows: list[dict[str, Any]], title: str = "sweep") -> str:
    """The markdown table of :func:`collect`'s rows (seeds grouped, sorted)."""
    runs = [_run(r["run"], r["overrides"].split(), r) for r in rows]
    return markdown(group_rows(runs), [], title)


LOG_PREFIX = re.compile(r"^\[[^\]]*\]\[[^\]]*\]\[[^\]]*\] - ")  # Hydra's "[time][module][LEVEL] - "


def _last_log_line(run: Path) -> str:
    logs = sorted(run.glob("*.log"))
    lines = [ln for ln in (logs[0].read_text(errors="replace").splitlines() if logs else []) if ln.strip()]
    for ln in lines:  # the error screen of scoreflow's entry points starts with this
        if "usage error:" in ln or "run failed:" in ln:
            return ln.split(": ", 2)[-1][:160]
    for ln in reversed(lines):  # stopped by a signal after its checkpoint (scoreflow.lit.preemption)
        if "checkpoint written to" in ln and " at step " in ln:
            return "stopped: " + LOG_PREFIX.sub("", ln).split(": checkpoint written", 1)[0] + \
                " (checkpoint written: rerun the sweep to resume)"
    return LOG_PREFIX.sub("", lines[-1])[:160] if lines else "no metrics.json and no log"


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def drop_common(runs: list[dict[str, Any]]) -> list[str]:
    """Remove the overrides every run shares from the row labels (shown once above the table); return them."""
    if len(runs) < 2:
        return []
    common = [o for o in runs[0]["overrides"] if all(o in r["overrides"] for r in runs[1:])]
    for r in runs:
        rest = [o for o in r["overrides"] if o not in common and o.split("=", 1)[0].lstrip("+~") not in SEED_KEYS]
        r["group"] = " ".join(rest) or "(defaults)"
    return common


def group_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group of finished runs (differing only by seed): mean and sd of every metric, sorted."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r["status"] == "ok":
            groups.setdefault((r["group"], r["split"]), []).append(r)
    rows = []
    for (group, split), members in groups.items():
        row: dict[str, Any] = {"group": group, "split": split, "n": len(members),
                               "evaluated": any(m.get("evaluated") for m in members)}
        for name in [c[0] for c in COLUMNS] + [e[0] for e in EXTRA]:
            vals = [v for v in (_num(m.get(name)) for m in members) if v is not None and math.isfinite(v)]
            row[name] = sum(vals) / len(vals) if vals else None
            row[name + "_sd"] = _sd(vals)
            # a diverged seed is not averaged in silence: the cell says how many of the n runs are not finite
            row[name + "_nonfinite"] = sum(name in m.get("nonfinite", ()) or
                                           (_num(m.get(name)) is not None and not math.isfinite(m[name]))
                                           for m in members)
        rows.append(row)
    return sorted(rows, key=_sort_key)


def _sd(vals: list[float]) -> float | None:
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def _sort_key(row: dict[str, Any]) -> tuple:
    def val(k: str) -> float:
        v = row.get(k)
        return v if v is not None and math.isfinite(v) else math.inf

    return (row["split"] != "test", val("bpd_ode"), val("bpd_bound"), row["group"])


def _cell(row: dict[str, Any], name: str, fmt: str) -> str:
    v, sd, bad = row.get(name), row.get(name + "_sd"), row.get(name + "_nonfinite", 0)
    note = f" ({bad} of {row['n']} non-finite)" if bad else ""
    if v is None:
        return "non-finite" + note if bad else "-"
    return (f"{v:{fmt}} ± {sd:{fmt}}" if sd is not None else f"{v:{fmt}}") + note


def markdown(rows: list[dict[str, Any]], failed: list[dict[str, Any]], title: str) -> str:
    head = ["overrides", "split", "n"] + [c[1] for c in COLUMNS] + [e[1] for e in EXTRA]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['group']}`", r["split"], str(r["n"])]
        cells += [_cell(r, n, f) for n, _, f in COLUMNS] + [_cell(r, n, f) for n, _, f in EXTRA]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r["split"] == "val" and not r.get("evaluated") for r in rows):
        lines += ["", "split `val` of a training run: no test metrics (test=false); the last validation (bound on "
                  "`val_subset` images, ODE on `nll_subset`)."]
    if any(r["n"] > 1 for r in rows):
        lines += ["", "n > 1: runs differing only by seed; mean ± sample standard deviation over the seeds (a spread, "
                  "not a standard error: divide by √n for that; each run's ± over images is in its metrics.json). "
                  "A seed whose value is not finite is left out of the mean and counted in the cell."]
    if failed:
        lines += ["", f"**{len(failed)} failed or unfinished run(s)** (no metrics.json):", ""]
        lines += [f"- `{Path(f['run']).name}`: {f['reason']}" for f in failed]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]], failed: list[dict[str, Any]]) -> None:
    names = [c[0] for c in COLUMNS] + [e[0] for e in EXTRA]
    fields = ["overrides", "split", "n", "status"] + [x for n in names for x in (n, n + "_sd", n + "_nonfinite")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({"overrides": r["group"], "split": r["split"], "n": r["n"], "status": "ok",
                        **{k: r.get(k) for k in fields if k not in ("overrides", "split", "n", "status")}})
        for r in failed:
            w.writerow({"overrides": r["group"], "status": "failed", "n": 1})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="a multirun folder, e.g. multirun/train/2026-11-27_12-00-00")
    p.add_argument("--out", help="where to write sweep_table.md / .csv (default: the sweep folder)")
    args = p.parse_args(argv)
    sweep = Path(args.sweep_dir)
    if not sweep.is_dir():
        print(f"sweep_table: {sweep} is not a folder (give the multirun/<task>/<date> folder of a sweep)",
              file=sys.stderr)
        return 2
    runs = [read_run(r) for r in find_runs(sweep)]
    if not runs:
        print(f"sweep_table: no runs under {sweep} (no .hydra/overrides.yaml found)", file=sys.stderr)
        return 2
    text, rows = report(sweep, runs, Path(args.out) if args.out else sweep)
    print(text)
    return 1 if not rows else 0


def report(sweep: Path, runs: list[dict[str, Any]], out: Path) -> tuple[str, list[dict[str, Any]]]:
    """The table of ``runs`` (:func:`read_run`), written to ``out``/sweep_table.{md,csv}; the text and the rows."""
    common = drop_common(runs)
    rows = group_rows(runs)
    failed = [r for r in runs if r["status"] == "failed"]
    text = markdown(rows, failed, f"{sweep} ({len(runs)} runs, {len(failed)} failed)")
    if common:
        text = text.replace("\n\n", f"\n\nevery run: `{' '.join(common)}`\n\n", 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_table.md").write_text(text)
    write_csv(out / "sweep_table.csv", rows, failed)
    return text + f"\nwritten: {out / 'sweep_table.md'}, {out / 'sweep_table.csv'}", rows


if __name__ == "__main__":
    sys.exit(main())
