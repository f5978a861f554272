"""Exponential moving average of the weights as a Lightning callback.

Lightning's ``WeightAveraging`` swaps weights only around validation *epochs* and has no warm-up, so a
sample-grid hook that runs at the end of validation would see raw weights, and a short run with
decay 0.9999 would be dominated by the initial weights. This callback:

* updates after every optimizer step with ``decay_n = min(decay, (1 + n) / (10 + n))`` when
  ``warmup=True`` (the ramp of score_sde_pytorch) or the fixed ``decay`` otherwise;
* swaps the EMA weights in for the *whole* validation / test / predict run (``on_*_start`` to
  ``on_*_end``), so every metric, sample grid and "best" checkpoint uses EMA weights;
* stores its state in the checkpoint (``checkpoint["ema"]``) so resume continues exactly and
  ``evaluate.py``/``sample.py`` can rebuild the EMA model from the checkpoint alone.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class EMA(Callback):
    def __init__(self, decay: float = 0.9999, warmup: bool = True, every_n_steps: int = 1):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.every_n_steps = every_n_steps
        self.num_updates = 0
        self.shadow: list[torch.Tensor] | None = None
        self._backup: list[torch.Tensor] | None = None
        self._last_step = -1

    @staticmethod
    def _params(pl_module: pl.LightningModule) -> list[torch.Tensor]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.shadow is None:
            self.shadow = [p.detach().clone() for p in self._params(pl_module)]
        else:  # restored from a checkpoint: move to the module's device
            self.shadow = [s.to(p.device) for s, p in zip(self.shadow, self._params(pl_module))]

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:  # no optimizer step happened (skipped batch)
            return
        self._last_step = step
        d = self.current_decay()
        params = self._params(pl_module)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - d)
        self.num_updates += 1

    # ------------------------------------------------------------------ swapping
    @torch.no_grad()
    def swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.shadow is None or self._backup is not None:
            return
        params = self._params(pl_module)
        self._backup = [p.detach().clone() for p in params]
        for p, s in zip(params, self.shadow):
            p.copy_(s)

    @torch.no_grad()
    def swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._backup is None:
            return
        for p, b in zip(self._params(pl_module), self._backup):
            p.copy_(b)
        self._backup = None

    def on_validation_start(self, trainer, pl_module):
        self.swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module):
        self.swap_out(pl_module)

    def on_test_start(self, trainer, pl_module):
        self.swap_in(pl_module)

    def on_test_end(self, trainer, pl_module):
        self.swap_out(pl_module)

    def on_predict_start(self, trainer, pl_module):
        self.swap_in(pl_module)

    def on_predict_end(self, trainer, pl_module):
        self.swap_out(pl_module)

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # the checkpoint's state_dict must hold the *raw* weights even if saved while swapped in
        if self._backup is not None:
            names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
            for n, b in zip(names, self._backup):
                checkpoint["state_dict"][n] = b.detach().clone()
        names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        checkpoint["ema"] = {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "last_step": self._last_step,
            "shadow": dict(zip(names, [s.detach().cpu().clone() for s in self.shadow or []])),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ema")
        if state is None:
            return
        self.num_updates = state["num_updates"]
        self._last_step = state["last_step"]
        names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        missing = [n for n in names if n not in state["shadow"]]
        if missing:
            raise KeyError(f"EMA state in checkpoint lacks parameters: {missing[:5]}")
        self.shadow = [state["shadow"][n].clone() for n in names]


def ema_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The module state dict with EMA weights substituted (for evaluation from a checkpoint)."""
    sd = dict(checkpoint["state_dict"])
    ema = checkpoint.get("ema")
    if ema is None:
        raise KeyError("checkpoint has no EMA state; pass use_ema=false to use the raw weights")
    sd.update(ema["shadow"])
    return sd
