"""The "best" checkpoint by a monitored validation metric, never chosen on a non-finite value.

Lightning's ``ModelCheckpoint`` maps a NaN score to +inf and, while it holds fewer than ``save_top_k`` files,
keeps it: a diverged run ended with ``best-<step>.ckpt`` scored inf. Here a non-finite score is skipped
(and said once), so ``best-*.ckpt`` only ever holds a model whose validation bound was a number.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class BestCheckpoint(ModelCheckpoint):
    def _save_monitor_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        current = monitor_candidates.get(self.monitor)
        if current is not None and not bool(torch.isfinite(torch.as_tensor(current)).all()):
            if not getattr(self, "_said_non_finite", False):
                log.warning("%s=%s at step %d: no 'best' checkpoint is chosen on a non-finite score",
                            self.monitor, float(current), trainer.global_step)
                self._said_non_finite = True
            return
        super()._save_monitor_checkpoint(trainer, monitor_candidates)
