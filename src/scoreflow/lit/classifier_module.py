"""``ClassifierLitModule``: training of a time-dependent classifier ``p_t(y | x_t)`` (Song et al. 2021, App. I.1).

training_step = dequantize -> scale (exactly as :class:`~scoreflow.lit.module.ScoreLitModule`, so the
classifier sees the score model's space) -> ``t ~ U[eps, T]`` -> ``x_t ~ p_0t(. | x_0)`` -> cross-entropy.
Averaged over the batch this is a Monte-Carlo estimate of the paper's "mixture of cross-entropy losses over
different time steps". Validation reports the same mixture loss and the accuracy at a few fixed ``t``.
All randomness of a step comes from a generator seeded by ``(seed, rank, batch index)``, as in ScoreLitModule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from scoreflow.data.base import random_hflip
from scoreflow.dequantization import Dequantizer, to_model_space
from scoreflow.lit.datamodule import StreamPosition, batch_number
from scoreflow.lit.module import TRAIN_INPUTS, seed_global_rngs, step_seed
from scoreflow.lit.optim import GuardedOptimization, OptimizerFactory
from scoreflow.lit.settings import OptimConfig
from scoreflow.nets.classifier import NoiseConditionalClassifier


def fixed_time_key(split: str, name: str, t: float) -> str:
    """``val/acc_t0.1``: a metric at the fixed time ``t``."""
    return f"{split}/{name}_t{t:g}"


class ClassifierLitModule(StreamPosition, GuardedOptimization):
    """Training and evaluation of a noise-conditional classifier.

    Args:
        classifier: ``classifier(x_t, t) -> logits`` (holds the SDE).
        dequantizer: maps integer levels into ``(0, 1)``; ``None`` for continuous data.
        num_levels: K for discrete data, ``None`` for continuous data.
        scale, shift: data enter the SDE as ``scale * x + shift``; must equal the score model's.
        eps: smallest training time (``None``: the SDE's default).
        eval_times: fixed times at which validation and test report accuracy and cross-entropy.
        optim: Adam settings, linear warmup steps and global-norm clip: an :class:`OptimConfig` or a mapping of its
            fields (the score model's optimization, with its NaN guard).
        optimizer: ``factory(params, lr=...)`` replacing the built-in Adam (``module.optimizer``).
        hflip: random horizontal flips of training images.
        train_input: ``"dequantized"`` (``x = (k + u) / K``) or ``"levels"`` (``x = k / (K - 1)``, no noise): the
            input space of the score model it will guide (``module.train_input`` of its run); a classifier of the
            other space guides from inputs it never saw (the dequantization noise, 1/K, is comparable to the noise
            at the smallest sampling times).
        max_bad_steps: consecutive non-finite steps tolerated before the run stops.
        seed: base seed of the per-step generators.
    """

    def __init__(
        self,
        classifier: NoiseConditionalClassifier,
        dequantizer: Dequantizer | None,
        *,
        num_levels: int | None,
        scale: float = 2.0,
        shift: float = -1.0,
        eps: float | None = None,
        eval_times: Sequence[float] = (0.01, 0.1, 0.5, 0.9),
        optim: OptimConfig | dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        hflip: bool = False,
        train_input: str = "dequantized",
        max_bad_steps: int = 20,
        seed: int = 0,
    ):
        super().__init__()
        self._init_guard()
        if (num_levels is None) != (dequantizer is None):
            raise ValueError(
                f"num_levels={num_levels} and dequantizer={type(dequantizer).__name__} do not fit: discrete data "
                "need a dequantizer, continuous data (num_levels=None) must use dequantization=none"
            )
        if train_input not in TRAIN_INPUTS:
            raise ValueError(f"train_input must be one of {', '.join(TRAIN_INPUTS)}, got {train_input!r}")
        if train_input == "levels" and num_levels is None:
            raise ValueError("train_input='levels' needs discrete data (num_levels); continuous data are their own "
                             "input")
        self.train_input = train_input
        self.classifier = classifier
        self.sde = classifier.sde
        self.dequantizer = dequantizer
        self.num_levels = num_levels
        self.scale, self.shift = float(scale), float(shift)
        self.eps = self.sde.check_eps(self.sde.default_eps if eps is None else float(eps))
        self.eval_times = tuple(float(self.sde.check_eps(t)) for t in eval_times)
        self.optim_cfg = OptimConfig.from_mapping(optim)
        self.optimizer_factory = optimizer
        self.hflip = hflip
        self.max_bad_steps = max_bad_steps
        self.seed = seed
        self.batches_seen = 0  # training batches drawn so far; checkpointed (ScoreDataModule resumes from it)
        self.config_dict: dict[str, Any] | None = None  # the run's resolved config, saved in checkpoints
        self.config_choices: dict[str, str] = {}  # the Hydra options it was composed of (model=ddpmpp, ...)
        self._sums: dict[str, list[Tensor]] = {}

    # ------------------------------------------------------------------ maths
    def _generator(self, index: int, salt: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(step_seed(self.seed, self.global_rank, index, salt))
        return g

    def noised(self, k: Tensor, t: Tensor | None, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(x_t, t)`` for data ``k``; ``t = None`` draws ``t ~ U[eps, T]`` per example."""
        if self.train_input == "levels":  # the score model's input space: k / (K - 1), no noise
            x0 = self.scale * (k.float() / (self.num_levels - 1)) + self.shift
        else:
            x0 = to_model_space(k, self.dequantizer, self.num_levels, self.scale, self.shift, g)[0]
        if t is None:
            u = torch.rand(x0.shape[0], generator=g, device=x0.device, dtype=x0.dtype)
            t = self.eps + u * (self.sde.T - self.eps)
        z = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        return self.sde.perturb(x0, t, z), t

    def cross_entropy(self, k: Tensor, y: Tensor, t: Tensor | None, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Per-example ``-log p_t(y | x_t)`` and correctness, both ``[B]``."""
        x_t, t = self.noised(k, t, g)
        logits = self.classifier(x_t, t)
        return F.cross_entropy(logits, y, reduction="none"), (logits.argmax(dim=-1) == y).float()

    # ------------------------------------------------------------------ training
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        k, y = batch
        index = self.batches_seen
        self.batches_seen += 1
        seed_global_rngs(step_seed(self.seed, self.global_rank, index, 1), self.device)  # dropout
        g = self._generator(index, 0)
        if self.hflip:
            k = random_hflip(k, g)
        ce, correct = self.cross_entropy(k, y, None, g)
        loss = ce.mean()  # Monte-Carlo mixture of cross-entropies over t ~ U[eps, T] (App. I.1)
        if self.guarded_step(loss, index) is not None or self._skipped:  # a step ended, taken or skipped
            self.log_step("train/acc", correct.mean())

    # ------------------------------------------------------------------ evaluation
    def _start_eval(self, split: str) -> None:
        """Every metric of ``split`` at zero on every rank (a rank may hold no image: its padding batch), so that
        every rank reduces the same sums."""
        keys = [f"{split}/loss", f"{split}/acc", *(fixed_time_key(split, n, t) for t in self.eval_times
                                                   for n in ("acc", "loss"))]
        self._sums = {k: [torch.zeros((), device=self.device), torch.zeros((), device=self.device)] for k in keys}

    def _eval_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, split: str, salt: int) -> None:
        k, y = batch
        loader = self.trainer.val_dataloaders if split == "val" else self.trainer.test_dataloaders
        number = batch_number(loader, batch_idx)
        if number is None:  # a padding batch: this rank holds no image
            return
        g = torch.Generator(device=self.device)  # fixed per batch: the same noise at every validation,
        g.manual_seed(step_seed(self.seed, 0, number, salt))  # as rank 0 of one process draws it
        ce, correct = self.cross_entropy(k, y, None, g)
        self._accumulate(f"{split}/loss", ce)
        self._accumulate(f"{split}/acc", correct)
        for t in self.eval_times:
            tt = torch.full((k.shape[0],), t, device=k.device)
            ce, correct = self.cross_entropy(k, y, tt, g)
            self._accumulate(fixed_time_key(split, "acc", t), correct)
            self._accumulate(fixed_time_key(split, "loss", t), ce)

    def _accumulate(self, key: str, values: Tensor) -> None:
        s = self._sums.setdefault(key, [values.new_zeros(()), values.new_zeros(())])
        s[0] += values.detach().sum()
        s[1] += values.numel()

    def _log_means(self) -> None:
        keys = sorted(self._sums)
        stacked = torch.stack([torch.stack(self._sums[k]) for k in keys])  # [n, 2]: sums and counts
        if self.trainer.world_size > 1:  # exact means over every rank's examples
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        self.log_dict({k: (s / n).float() for k, (s, n) in zip(keys, stacked)}, sync_dist=False)
        self._sums = {}

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val", salt=2)

    def on_validation_epoch_end(self) -> None:
        if self._sums:
            self._log_means()
            self.log_optimizer_step_axis()

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test", salt=3)

    def on_test_epoch_end(self) -> None:
        if self._sums:
            self._log_means()

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scoreflow"] = {"kind": "classifier", **self.stream_state(), **self.guard_state(),
                                    "config": self.config_dict, "choices": dict(self.config_choices)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("scoreflow", {})
        self.load_stream_state(state)
        self.load_guard_state(state, int(checkpoint.get("global_step", 0)))
