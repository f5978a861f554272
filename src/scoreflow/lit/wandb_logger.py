"""Lightning's ``WandbLogger`` without the one line of noise it costs every run (``conf/logger/wandb.yaml``)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """Lightning's logger, but wandb is not handed its retired ``anonymous`` setting unless one is asked for:
    Lightning passes ``anonymous=None`` to ``wandb.init`` by default, and wandb (>= 0.19) answers every run with
    "WARNING The anonymous setting has no effect and will be removed in a future version." Same arguments, same
    runs, same class name (what ``isinstance`` and our name checks see)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


def finish_wandb_run(exit_code: int = 0, *, summary: dict[str, Any] | None = None, preempted: bool = False) -> bool:
    """Close this process's active W&B run, if any, with ``exit_code`` (what the process exits with: 0, 1, or
    128 + signal for a run stopped by a signal, ``preempted``, which W&B then shows as pre-empted, not finished).
    ``summary``: run-level values added to the run's summary (no history row). Returns whether a run was closed.

    Lightning's ``WandbLogger`` never finishes its run, and reuses ``wandb.run`` while one is active: without this
    every job of an in-process sweep after the first logged into the first job's run (its curves, config and test
    numbers overwritten), and a stopped run was recorded as finished with exit code 0."""
    import sys

    wandb = sys.modules.get("wandb")  # never imported: no run to close
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return False
    try:
        if summary:
            run.summary.update(summary)
        if preempted:
            run.mark_preempting()
    finally:
        run.finish(exit_code=exit_code)
    return True
