"""Our EMA callback (``scoreflow.lit.ema.EMA``) against Lightning's ``WeightAveraging`` (issue 13, point 4).

The question was whether ``lightning.pytorch.callbacks.WeightAveraging`` with an averaging function for the
score_sde ramp ``min(decay, (1 + n) / (10 + n))`` can replace our callback. It could only if it gave
bit-identical EMA weights, had the EMA weights in place for the whole validation / test / predict run
(the sample grid included), resumed exactly and kept old checkpoints (``checkpoint["ema"]``) loading.

The first group of tests pins what our callback guarantees. The second pins what ``WeightAveraging`` does
instead (Lightning 2.6.6); when one of those fails after a Lightning upgrade, revisit the decision written in
the docstring of ``scoreflow/lit/ema.py``.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from scoreflow.lit.ema import EMA, ema_state_dict

DECAY = 0.999
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step`", "ignore:.*treespec, LeafSpec")
RELEASE_CKPT = Path(__file__).parents[1] / "data" / "release-53daf68_digits_tiny.ckpt"


def ramp(n: int, decay: float = DECAY) -> float:
    return min(decay, (1 + n) / (10 + n))


class Tiny(pl.LightningModule):
    """Manual optimization like ``ScoreLitModule``: batches whose index is in ``skip`` take no optimizer step
    (as a non-finite loss does there). ``trace`` holds the trainable weights after every optimizer step."""

    def __init__(self, skip: tuple[int, ...] = ()):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        self.skip = set(skip)
        self.batches = 0
        self.trace: list[list[torch.Tensor]] = []
        self.raw: dict[str, bool] = {}  # module hook -> held the raw weights
        self.init = self.weights()

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters()]

    def training_step(self, batch, batch_idx):
        i, self.batches = self.batches, self.batches + 1
        if i in self.skip:
            return
        opt = self.optimizers()
        loss = ((self.net(batch[0]) - batch[1]) ** 2).mean()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.trace.append(self.weights())

    def is_raw(self) -> bool:
        return same(self.weights(), self.trace[-1])

    def validation_step(self, batch, batch_idx):
        self.raw["validation_step"] = self.is_raw()

    def on_validation_epoch_end(self):  # runs after the callbacks' on_validation_epoch_end
        self.raw["on_validation_epoch_end"] = self.is_raw()

    def test_step(self, batch, batch_idx):
        self.raw["test_step"] = self.is_raw()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["batches"] = self.batches

    def on_load_checkpoint(self, checkpoint):
        self.batches = checkpoint["batches"]


def loader() -> DataLoader:
    # one batch per epoch, always the same: resuming mid-run replays the same data
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=8)


def trainer(tmp_path: Path, callbacks: list[Callback], max_steps: int, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def hand_ema(init: list[torch.Tensor], trace: list[list[torch.Tensor]], first_n: int = 0) -> list[torch.Tensor]:
    shadow = [t.clone() for t in init]
    for n, weights in enumerate(trace, start=first_n):
        shadow = [torch.lerp(s, w, 1.0 - ramp(n)) for s, w in zip(shadow, weights)]
    return shadow


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class RampWA(WeightAveraging):
    """The closest ``WeightAveraging`` gets to our EMA: the ramp as ``avg_fn`` (a ``lerp``, like ours), only
    the parameters averaged, and with ``seed=True`` the initial weights put in as the first "average" (without
    it, ``AveragedModel`` *copies* the weights at the first update, so the initial weights never enter)."""

    def __init__(self, seed: bool):
        self.seed = seed
        offset = 1 if seed else 0

        def avg_fn(avg: torch.Tensor, new: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
            return torch.lerp(avg, new, 1.0 - ramp(int(num_averaged) - offset))

        super().__init__(use_buffers=False, avg_fn=avg_fn)

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if self.seed and self._average_model is not None:
            self._average_model.update_parameters(pl_module)  # n_averaged 0 -> 1: copies the initial weights

    def average(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self._average_model.module.parameters()]


class Probe(Callback):
    """Records, at each evaluation hook, whether the module holds its raw training weights."""

    HOOKS = (
        "on_validation_start",
        "on_validation_epoch_start",
        "on_validation_epoch_end",
        "on_validation_end",
        "on_test_start",
        "on_test_epoch_start",
        "on_test_epoch_end",
        "on_test_end",
    )

    def __init__(self):
        self.raw: dict[str, bool] = {}

    def __getattribute__(self, name):
        if name in Probe.HOOKS:

            def hook(trainer, pl_module, *args):
                self.raw[name] = pl_module.is_raw()

            return hook
        return super().__getattribute__(name)


class SaveOnTrainEnd(Callback):
    """Like ``FinalCheckpoint`` in ``tasks/train.py`` (listed after the config's callbacks)."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)


class SaveAtStep(Callback):
    """Like ``PreemptionCheckpoint`` / the periodic ``last.ckpt``: a checkpoint mid-run, after the EMA update."""

    def __init__(self, path: Path, step: int):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and not self.path.exists():
            trainer.save_checkpoint(self.path)


# ---------------------------------------------------------------------------------------------- ours


def test_ours_is_the_ramp_average_over_optimizer_steps_only(tmp_path):
    model, ema = Tiny(skip=(2, 5)), EMA(decay=DECAY, warmup=True)
    trainer(tmp_path, [ema], max_steps=6).fit(model, loader())
    assert model.batches == 8 and len(model.trace) == 6  # two batches skipped: no optimizer step, no update
    assert ema.num_updates == 6
    assert same(ema.shadow, hand_ema(model.init, model.trace))  # bit-identical, initial weights included
    assert same(model.weights(), model.trace[-1])  # the raw weights are back after training


def test_ours_swaps_in_for_the_whole_validation_and_test_run(tmp_path):
    # probes before and after the EMA callback: every callback and module hook of the run sees EMA weights,
    # whatever the callback order (only the EMA callback's own *_start / *_end hooks bound the run)
    model, before, after = Tiny(), Probe(), Probe()
    t = trainer(tmp_path, [before, EMA(decay=DECAY), after], max_steps=3, val_check_interval=1)
    t.fit(model, loader(), loader())
    t.test(model, loader(), verbose=False)
    assert not any(v for k, v in before.raw.items() if not k.endswith("_start"))
    assert not any(v for k, v in after.raw.items() if not k.endswith("_end"))
    assert len(before.raw) == len(after.raw) == 8
    assert model.raw == {"validation_step": False, "on_validation_epoch_end": False, "test_step": False}
    assert model.is_raw()  # and the raw weights are back afterwards


def test_ours_resumes_exactly_and_checkpoints_keep_raw_and_ema(tmp_path):
    straight, ema = Tiny(skip=(1,)), EMA(decay=DECAY)
    trainer(tmp_path, [ema], max_steps=6).fit(straight, loader())

    first, ema1 = Tiny(skip=(1,)), EMA(decay=DECAY)
    t1 = trainer(tmp_path, [ema1, SaveOnTrainEnd(tmp_path / "last.ckpt")], max_steps=3)
    t1.fit(first, loader())
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert same(list(ckpt["state_dict"].values()), first.trace[-1])  # raw weights under "state_dict"
    assert same(list(ema_state_dict(ckpt).values()), ema1.shadow)  # EMA weights under "ema"

    resumed, ema2 = Tiny(skip=(1,)), EMA(decay=DECAY)
    trainer(tmp_path, [ema2], max_steps=6).fit(resumed, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert ema2.num_updates == ema.num_updates == 6
    assert same(resumed.weights(), straight.weights())
    assert same(ema2.shadow, ema.shadow)


def test_release_checkpoint_loads_through_ema_state_dict():
    ckpt = torch.load(RELEASE_CKPT, map_location="cpu", weights_only=False)
    sd = ema_state_dict(ckpt)
    shadow = ckpt["ema"]["shadow"]
    assert set(sd) == set(ckpt["state_dict"]) and ckpt["ema"]["num_updates"] == 3
    assert all(sd[k] is shadow[k] for k in shadow)
    assert any(not torch.equal(shadow[k], ckpt["state_dict"][k]) for k in shadow)


# --------------------------------------------------------------------------- Lightning's WeightAveraging


def test_weight_averaging_ramp_matches_ours_only_when_seeded_with_the_initial_weights(tmp_path):
    ours, ema = Tiny(skip=(2,)), EMA(decay=DECAY)
    trainer(tmp_path, [ema], max_steps=5).fit(ours, loader())

    plain, wa = Tiny(skip=(2,)), RampWA(seed=False)
    trainer(tmp_path, [wa], max_steps=5).fit(plain, loader())
    assert all(same(a, b) for a, b in zip(plain.trace, ours.trace, strict=True))  # the same training run
    assert int(wa._average_model.n_averaged) == 5  # updates once per optimizer step (skipped batch: none)
    # the first update copies the weights after step 1: the initial weights never enter the average
    assert same(wa.average(), hand_ema(ours.trace[0], ours.trace[1:], first_n=1))
    assert not same(wa.average(), ema.shadow)

    seeded, wa = Tiny(skip=(2,)), RampWA(seed=True)
    trainer(tmp_path, [wa], max_steps=5).fit(seeded, loader())
    assert same(wa.average(), ema.shadow)  # bit-identical once setup() is overridden to seed it


def test_weight_averaging_hooks():
    # swaps around the validation *epoch* only; no swap for the validation/test/predict run; average copied at the end
    def own(hook: str) -> bool:
        return getattr(WeightAveraging, hook) is not getattr(Callback, hook)

    assert own("on_validation_epoch_start") and own("on_validation_epoch_end") and own("on_train_end")
    assert not any(
        own(f"on_{stage}_{when}") for stage in ("validation", "test", "predict") for when in ("start", "end")
    )
    assert not any(own(f"on_{stage}_epoch_start") for stage in ("test", "predict"))


def test_weight_averaging_swaps_only_around_the_validation_epoch_and_never_for_test(tmp_path):
    # the sample grid (SampleGrid.on_validation_epoch_end) comes after the EMA callback in conf/callbacks
    model, before, after = Tiny(), Probe(), Probe()
    t = trainer(tmp_path, [before, RampWA(seed=True), after], max_steps=3, val_check_interval=1)
    t.fit(model, loader(), loader())
    assert after.raw == {
        "on_validation_start": True,
        "on_validation_epoch_start": False,
        "on_validation_epoch_end": True,  # WeightAveraging swapped back first: the sample grid sees raw weights
        "on_validation_end": True,
    }
    assert before.raw["on_validation_epoch_start"] is True  # and a callback before it misses the swap-in
    # the module's own on_validation_epoch_end runs after all callbacks: raw weights too
    assert model.raw == {"validation_step": False, "on_validation_epoch_end": True}
    # at on_train_end the average is copied over the module for good: the raw weights are gone ...
    assert not model.is_raw()
    t.test(model, loader(), verbose=False)
    assert not model.raw["test_step"]  # ... which is the only reason test sees EMA weights: nothing is swapped
    assert not model.is_raw()


def test_weight_averaging_resumes_exactly_from_a_mid_run_checkpoint(tmp_path):
    straight, wa = Tiny(skip=(1,)), RampWA(seed=True)
    trainer(tmp_path, [wa, SaveAtStep(tmp_path / "mid.ckpt", 3)], max_steps=6).fit(straight, loader())
    straight_avg, straight_raw = wa.average(), straight.trace[-1]  # (before on_train_end overwrote the module)

    resumed, wa2 = Tiny(skip=(1,)), RampWA(seed=True)
    trainer(tmp_path, [wa2], max_steps=6).fit(resumed, loader(), ckpt_path=tmp_path / "mid.ckpt")
    assert int(wa2._average_model.n_averaged) == int(wa._average_model.n_averaged) == 7  # seed + 6 steps
    assert same(wa2.average(), straight_avg) and same(resumed.trace[-1], straight_raw)


def test_weight_averaging_final_checkpoint_is_not_an_exact_resume_point(tmp_path):
    first, wa = Tiny(), RampWA(seed=True)
    trainer(tmp_path, [wa, SaveOnTrainEnd(tmp_path / "last.ckpt")], max_steps=3).fit(first, loader())
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert "ema" not in ckpt and "current_model_state" in ckpt and "averaging_state" in ckpt
    # "state_dict" holds the average, and the "raw" weights it resumes from are the average too
    assert same(list(ckpt["state_dict"].values()), wa.average())
    assert same(list(ckpt["current_model_state"].values()), wa.average())
    assert not same(list(ckpt["current_model_state"].values()), first.trace[-1])
    with pytest.raises(KeyError):
        ema_state_dict(ckpt)


def test_weight_averaging_drops_the_ema_of_an_old_checkpoint_on_resume(tmp_path):
    first, ema = Tiny(), EMA(decay=DECAY)
    trainer(tmp_path, [ema, SaveOnTrainEnd(tmp_path / "ours.ckpt")], max_steps=3).fit(first, loader())

    resumed, wa = Tiny(), RampWA(seed=True)
    with pytest.warns(UserWarning, match="not created with WeightAveraging"):
        trainer(tmp_path, [wa], max_steps=3).fit(resumed, loader(), ckpt_path=tmp_path / "ours.ckpt")
    # the average restarts from the raw weights of the checkpoint; checkpoint["ema"] is ignored
    assert same(wa.average(), first.trace[-1])
    assert not same(wa.average(), ema.shadow)
