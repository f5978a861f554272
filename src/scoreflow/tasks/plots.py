"""``plots/bpd_vs_step.png`` of a training run: bound and ODE bits/dim against steps, with the loss.

Read from the run's own ``csv/metrics.csv`` (the CSV logger, on in every logger config but ``none``), so
the same figure can be redrawn for any finished run: ``python -m scoreflow.tasks.plots RUN_DIR``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from pathlib import Path
from typing import Any

from scoreflow.visualize import log_image

log = logging.getLogger(__name__)


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` from a Lightning CSV log (empty cells skipped, NaN kept)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for k, v in row.items():
                if k in ("epoch", "step") or v in (None, ""):
                    continue
                try:
                    series.setdefault(k, []).append((int(float(step)), float(v)))
                except ValueError:
                    continue
    return series


def draw(series: dict[str, list[tuple[int, float]]], final: dict[str, float], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for key, label, style, c in (("val/bpd_bound", "val bound", "o-", "C0"), ("val/bpd_ode", "val ODE", "s-", "C1")):
        pts = series.get(key, [])
        if pts:
            ax.plot(*zip(*pts), style, color=c, ms=3, label=label)
    last_step = max((s for pts in series.values() for s, _ in pts), default=0)
    for key, label, marker, c in (("test/bpd_bound", "test bound", "o", "C0"), ("test/bpd_ode", "test ODE", "s", "C1")):
        v = final.get(key)
        if v is not None and math.isfinite(v):
            ax.plot([last_step], [v], marker, color=c, mfc="none", ms=8, label=f"{label} {v:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    loss = series.get("train/loss", [])
    if loss:
        ax2 = ax.twinx()
        ax2.plot(*zip(*loss), color="0.6", lw=0.8, label="train loss")
        ax2.set_ylabel("train loss", color="0.4")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper right")
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def bpd_plot(out: str | Path, final: dict[str, float] | None = None, loggers: list[Any] | None = None,
             step: int | None = None) -> str:
    """Draw ``<out>/plots/bpd_vs_step.png``; log it to W&B / TensorBoard loggers (at ``step``, the run's last,
    where the test values are). Returns what to print."""
    out = Path(out)
    src = out / "csv" / "metrics.csv"
    # no CSV (logger=none, or a run too short to log): the figure holds the final test values only
    series = read_metrics_csv(src) if src.is_file() else {}
    try:
        name = out.name if len(out.name) <= 70 else out.name[:67] + "..."  # sweep folders hold every override
        title = name if series else f"{name} (no csv/metrics.csv)"
        path = draw(series, final or {}, out / "plots" / "bpd_vs_step.png", title=title)
    except Exception as e:  # noqa: BLE001 - a figure must never fail a finished run
        log.warning("plots/bpd_vs_step.png not written: %s", e)
        return f"none ({type(e).__name__}: {e})"
    for lg in loggers or []:
        try:
            log_image(lg, "plots/bpd_vs_step", path, step)
        except Exception as e:  # noqa: BLE001
            log.warning("could not log %s to %s: %s", path.name, type(lg).__name__, e)
    return str(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Redraw plots/bpd_vs_step.png of a training run folder.")
    p.add_argument("run_dir")
    args = p.parse_args(argv)
    import json

    if not (Path(args.run_dir) / "csv" / "metrics.csv").is_file():  # it drew an empty plot into any folder
        p.error(f"{args.run_dir} is not a training run folder: it has no csv/metrics.csv (the folder train.py "
                "prints, e.g. outputs/train/<date>/)")
    metrics_path = Path(args.run_dir) / "metrics.json"
    final = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    print(bpd_plot(args.run_dir, {k: v for k, v in final.items() if isinstance(v, (int, float))}))


if __name__ == "__main__":
    main()
