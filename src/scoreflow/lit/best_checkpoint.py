"""The "best" checkpoint by a monitored validation metric, never chosen on a non-finite value.

Lightning's ``ModelCheckpoint`` maps a NaN score to +inf and, while it holds fewer than ``save_top_k`` files,
keeps it: a diverged run ended with ``best-<step>.ckpt`` scored inf. Here a non-finite score is skipped
(and said once), so ``best-*.ckpt`` only ever holds a model whose validation bound was a number.

A resumed run adopts the ``best-*`` files of its folder that the restored state does not know: a run stopped
between its periodic ``last.ckpt`` and the validation after it left a ``best`` file written after that checkpoint
(Lightning does not redo that validation on resume). Its score, stored in the file, competes with the known ones:
the best ``save_top_k`` stay, the others are removed, so the folder holds one set of ``best`` files, not a stale
``best-10.ckpt`` beside ``best-40.ckpt`` or a ``best-15-v1.ckpt`` beside ``best-15.ckpt``.
"""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path

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

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.global_step and self.dirpath and self.monitor and self.save_top_k != 0:
            self._adopt_unknown_files(trainer)

    def _stored_score(self, path: Path) -> float | None:
        """The score this callback gave ``path`` when it wrote it (in the file's own callback state)."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, pickle.UnpicklingError):
            return None
        state = (ckpt.get("callbacks") or {}).get(self.state_key) or {}
        score = next((v for k, v in (state.get("best_k_models") or {}).items() if Path(k).name == path.name), None)
        return None if score is None or not math.isfinite(float(score)) else float(score)

    def _adopt_unknown_files(self, trainer: pl.Trainer) -> None:
        prefix = (self.filename or "").split("{", 1)[0]
        if not prefix:
            return  # no way to tell this callback's files from the others in the folder
        known = {Path(p).resolve(): float(v) for p, v in self.best_k_models.items() if Path(p).is_file()}
        found = {}
        for path in sorted(Path(self.dirpath).glob(f"{prefix}*{self.FILE_EXTENSION}")):
            if path.resolve() not in known and (score := self._stored_score(path)) is not None:
                found[path.resolve()] = score
        if not found:
            return
        merged = {**known, **found}
        order = sorted(merged, key=merged.__getitem__, reverse=self.mode == "max")
        keep = order if self.save_top_k < 0 else order[:self.save_top_k]
        for path in order[len(keep):]:
            self._remove_checkpoint(trainer, str(path))
        log.info("resume: %s written after the checkpoint this run resumed from; kept as the best: %s",
                 ", ".join(p.name for p in found), ", ".join(f"{p.name} ({merged[p]:.4f})" for p in keep))
        self.best_k_models = {str(p): torch.tensor(merged[p]) for p in keep}
        self.best_model_path, self.best_model_score = str(keep[0]), torch.tensor(merged[keep[0]])
        self.kth_best_model_path, self.kth_value = str(keep[-1]), torch.tensor(merged[keep[-1]])
