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
